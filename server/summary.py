"""``summary.md`` of a federated run: last round per site, pooled, mean of sites."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.plots import format_p_value, kaplan_meier_problem
from shared_model.atomic import atomic_write_bytes
from sites.types import simulated_data_note


def _f(v: Any) -> str:
    return "—" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def write_summary(run_dir: Path, settings, strategy, history: list[dict[str, Any]], seconds: float) -> Path:
    last = history[-1]
    p = last.get("pooled") or {}
    mean = (last.get("mean_of_sites") or {}).get("mean", {})
    note = simulated_data_note({s.site: s.cohort for s in sorted(strategy.sites.values(), key=lambda s: s.site)
                                if s.simulated})
    has_km = (Path(run_dir) / "km_final.png").exists()
    lines = [
        f"# oncofed run `{Path(run_dir).name}`",
        "",
        f"{len(strategy.sites)} sites, {last['round']} rounds, server optimiser "
        f"`{settings.server_optimizer}`, {settings.local_epochs} local epoch(s) per round, "
        f"seed {settings.seed}; {seconds:.1f} s.",
        "",
    ]
    if note:
        lines += [note + " See sites/FORMAT.md.", ""]
    lines += [
        f"## Round {last['round']} — held-out patients",
        "",
        "| site | embeddings | n train | n test | events | C-index | status AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in sorted(last["sites"].items()):
        lines.append(
            f"| {name} | {'simulated' if s.get('simulated') else 'real'} | {_f(s.get('n_train'))} | "
            f"{_f(s.get('n_test'))} | {_f(s.get('n_events'))} | {_f(s.get('cindex'))} | {_f(s.get('auc'))} |"
        )
    lines += [
        f"| **mean of sites** | | | | | {_f(mean.get('cindex_harrell'))} | {_f(mean.get('auc_status'))} |",
        f"| **pooled (all test patients)** | | {_f(last.get('n_train'))} | {_f(p.get('n'))} | "
        f"{_f(p.get('n_events'))} | {_f(p.get('cindex_harrell'))} | {_f(p.get('auc_status'))} |",
        "",
        f"Pooled C-index with pairs compared within each site (stratified, from the same counts): "
        f"{_f(p.get('cindex_harrell_within_sites'))}. "
        f"Pooled Uno's C: {_f(p.get('cindex_uno'))}; log-rank p between pooled risk groups: "
        f"{format_p_value(p.get('logrank_p'))}; hazard ratio high vs low risk: {_f(p.get('hazard_ratio'))} "
        f"(95 % CI {_f(p.get('hazard_ratio_ci_low'))}–{_f(p.get('hazard_ratio_ci_high'))}).",
        "",
        "The pooled values are computed by the server from summed per-site counts on a shared grid "
        "(server/EVALUATION.md): no exact risk score, exact time or identifier left a site, but at this "
        "grid's resolution most non-empty cells hold one patient, so a site's counts are a coarsened, "
        "de-identified table of its test patients (EVALUATION.md §4), not an anonymous aggregate.",
        "",
        "Files: `metrics_per_round.csv`, `rounds.json`, `pooled/round_NNN.json`, "
        + ("`km_final.png`, " if has_km else "")
        + "`cindex_per_round.png`, `final_model.pt`, `checkpoint.pt`, `config.json`."
        + ("" if has_km else
           f" No Kaplan–Meier plot: {kaplan_meier_problem(p)}."),
        "",
    ]
    path = Path(run_dir) / "summary.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path
