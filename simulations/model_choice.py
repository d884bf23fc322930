"""Score a model configuration on held-out *training* patients — for choosing settings
without ever looking at a test fold.

For every outer fold of ``--folds`` and every site, the fold's training patients are
split (stratified by event, fixed seed) into an inner-training part and an inner
hold-out (``--holdout``, default 25 %); the model trains on the inner-training part
with ``train_selected`` (its own validation split carved from it, and the optional
``train.refit``, as in ``oncofed cv``)
and is scored on the inner hold-out: Harrell's C with pairs compared within sites,
and status AUC (where labelled), beside the generator's oracle C (and the observable-oracle
C, see ``SiteData.observable_oracle_risk``) on the same patients for simulated sites. The outer
test fold is never loaded into the model.

    python -m simulations.model_choice --sites cptac-pda,cptac-ucec,cptac-ccrcc,tcga-kirc \\
        --folds fold_parachute --label event --set train.select_metric=cindex

``--method coxph`` / ``rf`` scores a classical baseline of ``oncofed cv`` on the same
hold-out patients instead (fitted on the whole inner-training part), so a setting can be
compared with the baselines without a test fold. ``--method ensemble:N`` scores the
``ensemble:N`` method of ``oncofed cv`` (N fused models, seeds ``--seed`` .. ``--seed``+N-1,
predictions averaged) and, on the same patients, each of its members alone, so the gain of
averaging is a paired comparison.

Prints one line per fold and the mean ± std; this is how the defaults in
``shared_model/defaults.yaml`` marked "chosen on held-out training patients" were chosen.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import torch

from shared_model.config import load_config
from shared_model.runconfig import oncofed_home
from shared_model.train import carve_validation
from simulations.cv import (CLASSICAL_METHODS, FoldSpec, average_members, cli_overrides, cli_sites_and_folds,
                            ensemble_members, ensemble_size, fold_metrics, oracle_metrics, run_classical,
                            run_neural, training_seed_problem)
from sites.types import SiteData

HOLDOUT_SEED = 123


def score_fold(sites: dict[str, SiteData], fold: FoldSpec, *, overrides: dict[str, Any], holdout: float,
               seed: int, method: str = "fused") -> dict[str, Any]:
    """Train on the inner-training part of ``fold``'s training patients; score the inner hold-out.

    ``sites``: name -> site (already relabelled); ``fold``: from :func:`simulations.cv.make_folds`.
    The inner-training part and the hold-out stand in for a fold's training and test patients of
    ``oncofed cv``, and the method is fitted by the same function: ``fused`` (the model of
    ``overrides``) by :func:`simulations.cv.run_neural` (``train_selected`` with its own
    validation split), ``ensemble:N`` by N such runs (:func:`simulations.cv.ensemble_members`)
    averaged by :func:`simulations.cv.average_members` (the row adds ``member_holdout_cindex``,
    each member's C on the same hold-out), ``coxph`` / ``rf`` by
    :func:`simulations.cv.run_classical`. The hold-out split depends only on the fold
    (``HOLDOUT_SEED``), so every method is scored on the same patients.
    """
    problem = method_problem(method) or holdout_problem(holdout)
    if problem:
        raise ValueError(problem)
    held, inner = {}, {}
    for name, site in sites.items():
        train_rows = fold.train[name]
        if len(train_rows) < 4:
            continue
        inner[name], held[name] = carve_validation(site.event, train_rows, holdout, HOLDOUT_SEED)
    t0 = time.perf_counter()
    scored_sites, split = {s: sites[s] for s in held}, FoldSpec(fold.index, inner, held)
    members = None
    if method == "fused":
        risk, prob, info = run_neural(scored_sites, split, load_config(overrides=overrides), seed)
    elif method in CLASSICAL_METHODS:
        risk, prob, info = run_classical(method, scored_sites, split, seed)
    else:
        members = ensemble_members(scored_sites, split, load_config(overrides=overrides), seed,
                                   ensemble_size(method))
        risk, prob, info = average_members(members, seed)
    scores = fold_metrics(sites, held, risk, prob)
    row = {"fold": fold.index, "method": method, "holdout_cindex": scores["cindex"], "holdout_auc": scores["auc"],
           "oracle_cindex": None, "observable_oracle_cindex": None}
    if members:
        row["member_holdout_cindex"] = [fold_metrics(sites, held, m[0], m[1])["cindex"] for m in members]
    return {**row, **oracle_metrics(sites, held, list(held)), **info, "seconds": time.perf_counter() - t0}


def method_problem(method: str) -> str | None:
    """Why ``method`` cannot be scored (None: it can). A malformed ``ensemble:N`` raises
    ``ValueError`` (:func:`simulations.cv.ensemble_size`)."""
    if method == "fused" or method in CLASSICAL_METHODS or ensemble_size(method):
        return None
    return f"unknown method {method!r}: expected fused, ensemble:N or one of {', '.join(CLASSICAL_METHODS)}"


def holdout_problem(holdout: float) -> str | None:
    """Why ``holdout`` is not a usable hold-out fraction (None if it is): 0 or less leaves no
    hold-out to score, 1 or more leaves one training patient per stratum."""
    if not 0.0 < holdout < 1.0:
        return f"--holdout must be a fraction strictly between 0 and 1, got {holdout}"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sites-dir", default=str(oncofed_home() / "sites"))
    p.add_argument("--sites", required=True)
    p.add_argument("--folds", required=True, help="outer fold column, e.g. fold_parachute")
    p.add_argument("--label", default="status", choices=("status", "event"))
    p.add_argument("--set", action="append", default=[], help="config override, e.g. train.lr=0.001")
    p.add_argument("--holdout", type=float, default=0.25)
    p.add_argument("--fold-ids", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="fused",
                   help="fused (the model of --set, default), ensemble:N (N fused seeds averaged, and each "
                        f"member alone) or a classical baseline of oncofed cv: {', '.join(CLASSICAL_METHODS)}")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    problem = method_problem(args.method) or holdout_problem(args.holdout)  # before any site is read
    if problem:
        p.error(problem)
    torch.set_num_threads(args.threads)
    overrides = cli_overrides(args.set)
    problem = training_seed_problem(None, overrides)
    if problem:
        p.error(problem)
    sites, folds = cli_sites_and_folds(args.sites_dir, args.sites, args.folds, args.label, args.fold_ids)
    ids = [f.index for f in folds]
    rows = []
    for fold in folds:
        row = score_fold(sites, fold, overrides=overrides, holdout=args.holdout, seed=args.seed,
                         method=args.method)
        print(json.dumps(row), flush=True)
        rows.append(row)
    c = [r["holdout_cindex"] for r in rows if r["holdout_cindex"] is not None]
    a = [r["holdout_auc"] for r in rows if r["holdout_auc"] is not None]
    extra = f"; hold-out status AUC {np.mean(a):.3f} ± {np.std(a):.3f}" if a else ""
    o = [r["observable_oracle_cindex"] for r in rows if r["observable_oracle_cindex"] is not None]
    extra += f"; observable-oracle C {np.mean(o):.3f}" if o else ""
    paired = [r for r in rows if r.get("member_holdout_cindex") and r["holdout_cindex"] is not None
              and None not in r["member_holdout_cindex"]]  # folds where the ensemble and every member have a C
    if paired:
        per_member = np.mean([r["member_holdout_cindex"] for r in paired], axis=0)
        gain = [r["holdout_cindex"] - np.mean(r["member_holdout_cindex"]) for r in paired]
        extra += (f"; members alone {', '.join(f'{c:.3f}' for c in per_member)} (mean {per_member.mean():.3f}); "
                  f"ensemble - members' mean per fold {', '.join(f'{g:+.3f}' for g in gain)} "
                  f"(folds {[r['fold'] for r in paired]})")
    label = args.method if args.method in CLASSICAL_METHODS else f"{args.method} {overrides or 'defaults'}"
    if not c:  # never a "nan ± nan" line with exit 0
        print(f"[model-choice] {label}: the hold-out C-index is undefined on every fold {ids} "
              "(too few comparable pairs in the hold-out)", file=sys.stderr)
        return 1
    print(f"[model-choice] {label}: hold-out C (within sites) "
          f"{np.mean(c):.3f} ± {np.std(c):.3f}{extra} over folds {ids}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
