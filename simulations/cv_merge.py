"""``oncofed cv-merge``: combine the ``results.json`` of CV runs split over processes or machines.

A long CV (e.g. HANCOCK's 10 folds) can be run as several ``oncofed cv --fold-ids``
/ ``--methods`` processes; this command joins their per-fold rows into one
mean ± std table, as if one command had run them all. The inputs must describe
the same experiment (sites, fold column, label, protocol), and two inputs that hold the same
method must have the same resolved config (threads and device aside); runs of different training seeds
(``--seed`` / ``--seeds``) are combined, each fold averaged over its seeds. Inputs
are read in order and a later input's row replaces an earlier one for the same
method, fold and seed (each replacement is reported). Which input every row came from, and each
input's resolved config, are kept in the merged ``results.json``. The inputs' paired
comparisons (``fused`` − method, per fold) are carried over where the merged rows of
both methods on that fold are exactly that input's (:func:`simulations.cv_paired.merge_paired`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from shared_model.config import flatten_keys
from simulations.cv import write_results
from simulations.cv_paired import merge_paired

SAME = ("sites", "folds_column", "label")
HARDWARE = ("train.num_threads", "train.device")  # may differ between the merged runs


def config_differences(a: dict[str, Any] | None, b: dict[str, Any] | None) -> list[str]:
    """Dotted keys whose resolved values differ between two runs' configs (hardware aside)."""
    fa, fb = flatten_keys(a), flatten_keys(b)
    return sorted(k for k in set(fa) | set(fb) if k not in HARDWARE and fa.get(k) != fb.get(k))


def _run_methods(run: dict[str, Any]) -> set[str]:
    return {r["method"] for r in run["rows"]}


def _load(path: Path) -> dict[str, Any]:
    file = path / "results.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"cv-merge: {file} does not exist (expected an `oncofed cv --out` folder holding results.json)")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"cv-merge: {file} is not valid JSON ({err})") from None
    missing = [k for k in ("sites", "folds_column", "label", "rows") if k not in data]
    if missing:
        raise ValueError(f"cv-merge: {file} lacks {missing}; not an `oncofed cv` results.json")
    data["_file"] = str(file)
    return data


def merge_results(paths: Sequence[Path], out_dir: Path | None, log=print) -> dict[str, Any]:
    """Merge CV results (folders or results.json files, in order) and write the table to ``out_dir``."""
    if not paths:
        raise ValueError("cv-merge: give at least one results folder")
    runs = [_load(Path(p)) for p in paths]
    first = runs[0]
    for run in runs[1:]:
        for key in SAME:
            if run.get(key) != first.get(key):
                raise ValueError(
                    f"cv-merge: {run['_file']} has {key}={run.get(key)!r} but {first['_file']} has "
                    f"{first.get(key)!r}; only runs of the same experiment can be merged"
                )
    config_notes = []
    for i, run in enumerate(runs):
        for other in runs[:i]:
            diff = config_differences(other.get("config"), run.get("config"))
            if not diff:
                continue
            shared = sorted(_run_methods(run) & _run_methods(other))
            if shared:  # one table row would average two different models
                raise ValueError(
                    f"cv-merge: {run['_file']} and {other['_file']} both hold {shared} but were run with "
                    f"different settings ({', '.join(diff[:8])}); merge runs of one configuration")
            config_notes.append(f"`{other['_file']}` and `{run['_file']}` (no method in common) differ in "
                                f"{', '.join(diff[:8])}.")
        if run.get("protocol") and first.get("protocol") and run["protocol"] != first["protocol"]:
            raise ValueError(f"cv-merge: {run['_file']} has protocol {run['protocol']!r} but {first['_file']} "
                             f"has {first['protocol']!r}")
    rows: dict[tuple[str, int, int], dict[str, Any]] = {}
    methods: list[str] = []
    for run in runs:
        for m in run.get("methods") or sorted({r["method"] for r in run["rows"]}):
            if m not in methods:
                methods.append(m)
        for r in run["rows"]:
            seed = int(r.get("seed", run.get("seed", 0)))  # rows before --seeds carry the run's seed
            key = (r["method"], int(r["fold"]), seed)
            if key in rows:
                log(f"[cv-merge] {r['method']} fold {r['fold']} seed {seed}: {rows[key]['source']} "
                    f"replaced by {run['_file']}")
            rows[key] = {**r, "seed": seed, "source": run["_file"]}
    protocols = {run.get("protocol") for run in runs} - {None}
    result = {
        "sites": first["sites"],
        "simulated": sorted({s for run in runs for s in run.get("simulated", [])}),
        "cohorts": {k: v for run in runs for k, v in (run.get("cohorts") or {}).items()},
        "folds_column": first["folds_column"],
        "folds": sorted({k[1] for k in rows}),
        "label": first["label"],
        "seed": min(k[2] for k in rows),
        "seeds": sorted({k[2] for k in rows}),
        "methods": methods,
        "rows": sorted(rows.values(), key=lambda r: (r["method"], r["fold"], r["seed"])),
        "protocol": protocols.pop() if len(protocols) == 1 else None,
        "inputs": [{"file": run["_file"], "config": run.get("config"),
                    "rows": sorted(f"{r['method']}/{r['fold']}" for r in run["rows"])} for run in runs],
    }
    result["paired"] = merge_paired(runs, result["rows"], log)
    counts = {m: sum(1 for k in rows if k[0] == m) for m in methods}
    expected = len(result["folds"]) * len(result["seeds"])
    uneven = {m: n for m, n in counts.items() if n != expected}
    notes = [f"Merged by `oncofed cv-merge` from {len(runs)} runs: "
             + "; ".join(f"`{run['_file']}`" for run in runs) + ".", ""]
    if uneven:
        notes += [f"**Not every method ran on every fold and seed:** {uneven} of {expected} "
                  f"(fold, seed) runs.", ""]
    if config_notes:
        notes += ["**Inputs with different settings:** " + " ".join(config_notes), ""]
    text = write_results(result, out_dir, notes)
    log(text)
    return result


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cv-merge", help="merge the results of CV runs split over processes (--fold-ids)")
    p.add_argument("inputs", nargs="+", help="`oncofed cv --out` folders or their results.json, in order")
    p.add_argument("--out", required=True, help="output folder for the merged results.md / results.json")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    merge_results([Path(p) for p in args.inputs], Path(args.out))
    print(f"\n[cv-merge] results written to {args.out}")
    return 0
