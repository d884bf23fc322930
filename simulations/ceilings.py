"""How well a model *could* do on simulated sites: the generator's ceilings on each test fold.

No model is trained. For each test fold of ``--folds`` the within-site Harrell C (pairs
compared within a site, as ``oncofed cv`` reports ``cindex``) of a perfect reader of:

* ``oracle`` — the generator's whole latent risk eta (``SiteData.oracle_risk``), which
  no model can reach where a patient lacks a modality;
* ``observable`` — E[eta | the parts the patient's observed modalities reveal, its site]
  (``SiteData.observable_oracle_risk``): every part it can reveal read exactly, every
  other part at its site mean. The ceiling of any model given what the patients have;
* ``observable, no interaction`` — the same with only the single-modality parts readable
  (for the built-in generator r and p, the interaction x at its site mean): a perfect
  linear reader;
* ``<m> alone`` — only the part modality m reveals by itself, on the test patients who
  have m (the patients a ``single:m`` model scores: its ceiling, as ``oncofed cv``
  reports it for that model).

    python -m simulations.ceilings --sites cptac-pda,cptac-ucec,cptac-ccrcc,tcga-kirc \\
        --folds fold_parachute --out simulations/reports/final15/ceilings

Prints a table (mean ± std over folds, std with ``ddof=0`` as ``oncofed cv``) and writes
``ceilings.json`` and ``ceilings.md`` under ``--out``. These numbers describe the
simulation, not any patient: the embeddings (and at a ``SIMULATED`` cohort the patients)
are simulated.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from shared_model.atomic import atomic_write_bytes
from shared_model.metrics import site_cindices
from shared_model.runconfig import oncofed_home
from simulations.cv import FoldSpec, cli_sites_and_folds, mean_std
from sites.types import SiteData, simulated_data_note

Reader = Callable[[SiteData], np.ndarray]


def readers(sites: dict[str, SiteData]) -> dict[str, Reader]:
    """Name -> risk [N] of a perfect reader (see module docstring), from the sites' oracle
    parts; NaN for a patient the reader does not score (``<m> alone``: patients without m).

    Raises ``ValueError`` naming the site when a site has no oracle parts (a real site)."""
    lacking = [n for n, s in sites.items() if s.oracle_parts is None or s.oracle_risk is None]
    if lacking:
        raise ValueError(f"sites {lacking} have no oracle parts (oracle_risk.csv with part:* columns): "
                         "ceilings exist only for simulated sites")
    keys = sorted({k for s in sites.values() for k in s.oracle_parts})
    singles = [k for k in keys if len(k) == 1]
    out: dict[str, Reader] = {
        "oracle": lambda s: s.oracle_risk,
        "observable": lambda s: s.observable_oracle_risk(),
    }
    if len(singles) < len(keys):
        out["observable, no interaction"] = lambda s: s.observable_oracle_risk(
            [k for k in singles if k in s.oracle_parts])
    for (m,) in singles:
        out[f"{m} alone"] = lambda s, m=m: _alone(s, m)
    return out


def _alone(site: SiteData, modality: str) -> np.ndarray:
    """A perfect reader of the part ``modality`` reveals by itself; NaN where the patient lacks it."""
    if (modality,) not in site.oracle_parts:
        return np.full(len(site), np.nan)
    risk = site.observable_oracle_risk([(modality,)])
    return np.where(site.presence_matrix((modality,))[:, 0], risk, np.nan)


def fold_ceilings(sites: dict[str, SiteData], folds: Sequence[FoldSpec]) -> dict[str, list[float | None]]:
    """Reader name -> within-site C on each fold's test patients that the reader scores
    (None where undefined)."""
    out: dict[str, list[float | None]] = {}
    for name, read in readers(sites).items():
        risk = {n: read(s) for n, s in sites.items()}
        per_fold = []
        for f in folds:
            scored = {}
            for n in sites:
                rows = f.test.get(n, np.zeros(0, dtype=np.int64))
                rows = rows[np.isfinite(risk[n][rows])]
                scored[n] = (sites[n].time[rows], sites[n].event[rows], risk[n][rows])
            per_fold.append(site_cindices(scored)["cindex"])
        out[name] = per_fold
    return out


def summarise(per_fold: dict[str, list[float | None]]) -> dict[str, dict[str, Any]]:
    """Mean ± std (ddof=0, :func:`simulations.cv.mean_std`) over the folds where the C is
    defined (None when it is nowhere), and the per-fold values."""
    out = {}
    for name, vals in per_fold.items():
        stats = mean_std(vals)
        out[name] = {"mean": None if stats is None else stats[0], "std": None if stats is None else stats[1],
                     "folds": vals}
    return out


def render(summary: dict[str, dict[str, Any]], header: str) -> str:
    lines = [header, "", "| perfect reader of | C-index (within sites) | per fold |", "|---|---|---|"]
    for name, r in summary.items():
        per = ", ".join("—" if x is None else f"{x:.3f}" for x in r["folds"])
        both = "—" if r["mean"] is None else f"{r['mean']:.3f} ± {r['std']:.3f}"
        lines.append(f"| {name} | {both} | {per} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites-dir", default=str(oncofed_home() / "sites"))
    ap.add_argument("--sites", required=True, help="comma-separated simulated site folder names")
    ap.add_argument("--folds", required=True, help="fold column, e.g. fold_parachute")
    ap.add_argument("--fold-ids", default=None, help="comma-separated fold indices (default: all)")
    ap.add_argument("--out", default=None, help="folder for ceilings.json and ceilings.md")
    args = ap.parse_args(argv)
    sites, folds = cli_sites_and_folds(args.sites_dir, args.sites, args.folds, "event", args.fold_ids)
    summary = summarise(fold_ceilings(sites, folds))
    note = simulated_data_note({n: s.spec.cohort for n, s in sites.items() if s.spec.simulated})
    header = (f"# Ceilings of {', '.join(sites)} on {args.folds} ({len(folds)} test folds)\n\n{note}\n\n"
              "Perfect readers of the generator's latent risk; a part a patient's modalities cannot "
              "reveal enters at its site mean (`python -m simulations.ceilings`).")
    text = render(summary, header)
    print(text)
    if args.out:
        out = Path(args.out)
        payload = {"sites": list(sites), "folds_column": args.folds, "folds": [f.index for f in folds],
                   "simulated": note, "ceilings": summary}
        atomic_write_bytes(out / "ceilings.json", (json.dumps(payload, indent=1) + "\n").encode("utf-8"))
        atomic_write_bytes(out / "ceilings.md", text.encode("utf-8"))
        print(f"written {out}/ceilings.json, ceilings.md")


if __name__ == "__main__":
    main()
