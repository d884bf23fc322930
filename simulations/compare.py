"""``oncofed compare``: centralised vs local-only vs federated, on identical folds.

For each fold k (a fold every site has), every arm trains on the same training
patients and is tested on the same test patients, with the same budget:

* **centralised** — one model on the pooled training data of all sites
  (``train_local`` with site-stratified batches), ``rounds × local-epochs`` epochs;
* **local-only** — one model per site on its own training data, same epochs;
* **federated** — the real ServerApp and ClientApp (run in-process, no Ray:
  ``simulations.local_grid``), ``rounds`` rounds of ``local-epochs`` epochs, the
  configured server optimiser; its final model is then scored like the others.

No arm selects an epoch or round (no test-fold peeking; equal budgets). Scores on
the test patients, computed exactly here (a simulation holds every site): Harrell's
C with pairs compared within each site (stratified; the primary number, since
training uses within-site risk sets), Harrell's C over all test patients, and the
mean of per-site C-indices; the federated arm also reports the server's
pooled-from-counts C-index of its last round.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from client.client_app import app as client_app
from shared_model.atomic import atomic_write_bytes
from server.server_app import app as server_app
from shared_model.batch import SiteTensors
from shared_model.config import Config, load_config
from shared_model.metrics import site_cindices
from shared_model.runconfig import oncofed_home, parse_overrides, settings_from_run_config
from shared_model.specs import specs_from_json
from shared_model.train import TrainPart, build_on_device, predict_rows, train_local
from simulations.cv import first_folds
from simulations.local_grid import run_local
from sites import load_site, union_specs
from sites.loader import require_distinct_names
from sites.problems import SiteValidationError
from sites.types import SiteData, simulated_data_note


def _scores(sites: dict[str, SiteData], test: dict[str, np.ndarray], risk: dict[str, np.ndarray]) -> dict:
    """C-index within sites (stratified, the primary number), pooled, mean of sites, per site."""
    c = site_cindices({s: (sites[s].time[test[s]], sites[s].event[test[s]], risk[s]) for s in risk})
    defined = [v for v in c["per_site"].values() if v is not None]
    return {"cindex": c["cindex"], "cindex_pooled": c["cindex_pooled"],
            "cindex_mean_of_sites": float(np.mean(defined)) if defined else None, "cindex_per_site": c["per_site"]}


def _train_on(sites: dict[str, SiteData], names: Sequence[str], specs, train: dict, cfg: Config,
              epochs: int, seed: int) -> tuple[torch.nn.Module, dict[str, SiteTensors]]:
    model = build_on_device(specs, cfg, seed)
    tensors = {s: SiteTensors.for_training(sites[s], specs, train[s], cfg.train.standardize_embeddings) for s in names}
    parts = [TrainPart(tensors[s], train[s]) for s in names]
    train_local(model, parts, cfg.train, epochs=epochs, early_stopping=False, seed=seed)
    return model, tensors


def fold_split_name(sites: dict[str, SiteData], column: str, k: int) -> str:
    """The run-config split string of the k-th split of ``column`` (``fold_x=<id>`` or ``split_x``)."""
    return next(iter(sites.values())).splits(column)[k].name


def federated_run_config(names: Sequence[str], split_name: str, work_dir: Path, run_name: str, *, rounds: int,
                         local_epochs: int, optimizer: str, overrides: str, seed: int) -> dict[str, Any]:
    """The federated arm's run config (its nodes are given their site folders directly)."""
    return {
        "sites": ",".join(names), "results-dir": str(work_dir), "run-name": run_name,
        "num-server-rounds": rounds, "local-epochs": local_epochs, "seed": seed, "min-sites": len(names),
        "split": split_name, "server-optimizer": optimizer, "model-overrides": overrides, "node-wait-timeout": 5.0,
    }


def compare_fold(sites: dict[str, SiteData], site_paths: dict[str, Path], column: str, k: int, *,
                 rounds: int, local_epochs: int, optimizer: str, overrides: str, seed: int,
                 work_dir: Path) -> dict[str, Any]:
    names = list(sites)
    split_name = fold_split_name(sites, column, k)
    split = {s: sites[s].resolve_split(split_name) for s in names}
    train = {s: split[s].train for s in names}
    test = {s: split[s].test for s in names}
    cfg = load_config(overrides={**parse_overrides(overrides), "train.seed": seed})
    specs = union_specs([sites[s].spec for s in names])
    epochs = rounds * local_epochs
    out: dict[str, Any] = {"fold": k}

    t0 = time.perf_counter()
    model, tensors = _train_on(sites, names, specs, train, cfg, epochs, seed)
    risk = {s: predict_rows(model, tensors[s], test[s])[0] for s in names if len(test[s])}
    out["centralised"] = {**_scores(sites, test, risk), "seconds": time.perf_counter() - t0}

    t0 = time.perf_counter()
    risk = {}
    for s in names:
        m, t = _train_on(sites, [s], union_specs([sites[s].spec]), train, cfg, epochs, seed)
        if len(test[s]):
            risk[s] = predict_rows(m, t[s], test[s])[0]
    out["local"] = {**_scores(sites, test, risk), "seconds": time.perf_counter() - t0}

    t0 = time.perf_counter()
    run_name = f"compare-fold{k}"
    run_config = federated_run_config(names, split_name, work_dir, run_name, rounds=rounds,
                                      local_epochs=local_epochs, optimizer=optimizer, overrides=overrides, seed=seed)
    # each node reads its own folder, wherever it lies (as the other arms do)
    run_local(server_app, client_app, [{"site-dir": str(site_paths[s])} for s in names],
              run_config_overrides=run_config)
    run_dir = work_dir / run_name
    state = torch.load(run_dir / "final_model.pt", map_location="cpu")
    fspecs = specs_from_json((run_dir / "final_model_spec.json").read_text())
    fmodel = build_on_device(fspecs, cfg, seed)
    fmodel.load_state_dict(state)
    risk = {}
    for s in names:
        if len(test[s]):
            t = SiteTensors.for_training(sites[s], fspecs, train[s], cfg.train.standardize_embeddings)
            risk[s] = predict_rows(fmodel, t, test[s])[0]
    last = json.loads((run_dir / "rounds.json").read_text())[-1]
    out["federated"] = {**_scores(sites, test, risk), "seconds": time.perf_counter() - t0,
                        "cindex_pooled_from_counts": (last.get("pooled") or {}).get("cindex_harrell")}
    return out


@dataclass(frozen=True)
class ComparePlan:
    """What ``oncofed compare`` will run, checked before any arm trains."""

    sites: dict[str, SiteData]
    paths: dict[str, Path]
    column: str
    n_folds: int
    rounds: int
    local_epochs: int
    optimizer: str
    overrides: str
    seed: int


class CompareArgumentError(ValueError):
    """A bad argument or site, found before any arm trains (the CLI reports it in one line, exit 2)."""


def plan_compare(site_paths: Sequence[Path], column: str, *, rounds: int = 20, local_epochs: int = 1,
                 optimizer: str = "fedavg", overrides: str = "", seed: int = 0,
                 max_folds: int | None = None) -> ComparePlan:
    """Load the sites and check every argument; raises ``CompareArgumentError`` naming what is wrong."""
    try:
        if not site_paths:
            raise ValueError("give at least one site (--sites)")
        sites = {p.name: load_site(p) for p in site_paths}
        require_distinct_names(list(sites.values()))
        n_folds = first_folds(min(len(s.splits(column)) for s in sites.values()), max_folds)
        for k in range(n_folds):  # every site has each split, before any arm trains
            name = fold_split_name(sites, column, k)
            for site in sites.values():
                site.resolve_split(name)
        # the federated arm's settings are refused now, not after the other arms of fold 0 trained
        settings_from_run_config(federated_run_config(
            list(sites), fold_split_name(sites, column, 0), Path("."), "check", rounds=rounds,
            local_epochs=local_epochs, optimizer=optimizer, overrides=overrides, seed=seed))
    except (ValueError, KeyError, SiteValidationError) as exc:
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise CompareArgumentError(text) from exc
    return ComparePlan(sites, {p.name: Path(p) for p in site_paths}, column, n_folds, rounds=rounds,
                       local_epochs=local_epochs, optimizer=optimizer, overrides=overrides, seed=seed)


def run_compare(site_paths: Sequence[Path], column: str, *, out_dir: Path | None = None, log=None,
                **settings: Any) -> dict[str, Any]:
    """Check the arguments (``plan_compare``, which takes ``settings`` and holds their defaults:
    rounds, local_epochs, optimizer, overrides, seed, max_folds), then run every arm on every
    fold (``run_plan``)."""
    return run_plan(plan_compare(site_paths, column, **settings), out_dir=out_dir, log=log)


def run_plan(plan: ComparePlan, *, out_dir: Path | None = None, log=None) -> dict[str, Any]:
    """Run the three arms on each fold of a checked plan; write compare.md / compare.json to ``out_dir``."""
    log = log or (lambda msg: print(msg, flush=True))
    sites, paths, column, n_folds = plan.sites, plan.paths, plan.column, plan.n_folds
    rounds, local_epochs, optimizer, overrides, seed = (plan.rounds, plan.local_epochs, plan.optimizer,
                                                        plan.overrides, plan.seed)
    folds = []
    with tempfile.TemporaryDirectory(prefix="oncofed-compare-") as tmp:
        for k in range(n_folds):
            r = compare_fold(sites, paths, column, k, rounds=rounds, local_epochs=local_epochs,
                             optimizer=optimizer, overrides=overrides, seed=seed, work_dir=Path(tmp))
            folds.append(r)
            log(f"[compare] fold {k}: " + "  ".join(
                f"{arm} C={r[arm]['cindex']:.3f}" for arm in ("centralised", "local", "federated")
                if r[arm]["cindex"] is not None))
    table = {}
    for arm in ("centralised", "local", "federated"):
        entry = {}
        for key in ("cindex", "cindex_pooled", "cindex_mean_of_sites"):
            vals = [f[arm][key] for f in folds if f[arm][key] is not None]
            entry[key] = (float(np.mean(vals)), float(np.std(vals))) if vals else None
        table[arm] = entry
    note = simulated_data_note({s: v.spec.cohort for s, v in sites.items() if v.spec.simulated})
    lines = [f"# oncofed compare — sites {', '.join(sites)}; folds `{column}` ({n_folds}); "
             f"{rounds} rounds × {local_epochs} local epoch(s), server optimiser {optimizer}; seed {seed}", ""]
    if note:
        lines += [note, ""]
    lines += ["C-index on the held-out patients, mean ± std over folds. *Within sites*: pairs compared "
              "inside each hospital (stratified Harrell's C, the primary number); *pooled*: all pairs.", "",
              "| arm | C-index, within sites | C-index, pooled | C-index, mean of sites |", "|---|---|---|---|"]
    for arm, e in table.items():
        f = lambda v: "—" if v is None else f"{v[0]:.3f} ± {v[1]:.3f}"  # noqa: E731
        lines.append(f"| {arm} | {f(e['cindex'])} | {f(e['cindex_pooled'])} | {f(e['cindex_mean_of_sites'])} |")
    c, fd = table["centralised"]["cindex"], table["federated"]["cindex"]
    if c and fd:
        diffs = [f["federated"]["cindex"] - f["centralised"]["cindex"] for f in folds
                 if f["federated"]["cindex"] is not None and f["centralised"]["cindex"] is not None]
        lines += ["", f"Federated − centralised (within-site C): {fd[0] - c[0]:+.3f} "
                  f"(per fold: {', '.join(f'{d:+.3f}' for d in diffs)})"]
    text = "\n".join(lines)
    result = {"table": table, "folds": folds, "column": column, "rounds": rounds,
              "local_epochs": local_epochs, "optimizer": optimizer, "seed": seed}
    if out_dir is not None:
        atomic_write_bytes(Path(out_dir) / "compare.md", (text + "\n").encode())
        atomic_write_bytes(Path(out_dir) / "compare.json", json.dumps(result, indent=2, default=float).encode())
    log(text)
    return result


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="centralised vs local-only vs federated on identical folds")
    p.add_argument("--sites-dir", default=str(oncofed_home() / "sites"))
    p.add_argument("--sites", default="cptac-pda,cptac-ucec,cptac-ccrcc,tcga-kirc")
    p.add_argument("--folds", default="fold_parachute")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--server-optimizer", default="fedavg")
    p.add_argument("--set", action="append", default=[], help="model/train override, e.g. train.lr=0.001")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-folds", type=int, default=None)
    p.add_argument("--out", default=None)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    paths = [Path(args.sites_dir) / s.strip() for s in args.sites.split(",") if s.strip()]
    out = Path(args.out) if args.out else Path("results") / f"compare-{args.folds}"
    try:
        plan = plan_compare(paths, args.folds, rounds=args.rounds, local_epochs=args.local_epochs,
                            optimizer=args.server_optimizer, overrides=";".join(args.set), seed=args.seed,
                            max_folds=args.max_folds)
    except CompareArgumentError as exc:  # bad arguments or sites: one line, exit 2
        print(f"oncofed compare: error: {exc}", file=sys.stderr)
        return 2
    run_plan(plan, out_dir=out)  # a failure while training is not a usage error: its traceback shows
    print(f"\n[compare] results written to {out}")
    return 0
