"""Validation score after every epoch, from the starting model on — on training patients only.

For each outer fold of ``--folds`` the model is set up exactly as ``oncofed cv``'s fused
run sets it up (:func:`simulations.cv.training_parts`: the validation rows carved from the
fold's *training* patients, inputs standardised with their statistics; the linear warm
start when ``train.linear_warm_start`` is on) and trained for ``--epochs`` epochs without
early stopping. Epoch 0 is the starting model (with the warm start: the penalised linear
model alone). The score is the selection metric of ``train.select_metric`` on the
validation rows, with ``train.epoch_average`` as in selection. No test patient is used.

    python -m simulations.validation_curve --sites-dir .oncofed/scale --sites scale-2000 \\
        --folds fold_scale --fold-ids 0 --label event --epochs 20 \\
        --set train.select_metric=cindex --set train.linear_warm_start=true

Prints one line per fold and epoch and the mean curve over folds; ``--out`` writes them
as JSON (with ``simulated``: what is simulated at the sites, "" for real data). Answers "does training improve on where it starts, and when does it stop?".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from shared_model.atomic import atomic_write_bytes
from shared_model.config import Config, load_config
from shared_model.runconfig import oncofed_home
from shared_model.train import model_builder, train_local, validation_score, warm_started
from simulations.cv import FoldSpec, cli_overrides, cli_sites_and_folds, training_parts
from sites.types import SiteData, simulated_data_note


def fold_curve(sites: dict[str, SiteData], fold: FoldSpec, cfg: Config, epochs: int, seed: int
               ) -> dict[str, Any]:
    """Validation scores [epochs + 1] of one fold (index 0 = the starting model) and train losses."""
    if epochs < 1:
        raise ValueError(f"--epochs must be at least 1, not {epochs}")
    # every epoch is scored; nothing stops early and no epoch is excluded
    train_cfg = dataclasses.replace(cfg.train, min_epochs=1, early_stopping_patience=epochs + 1)
    specs, parts, _ = training_parts(sites, fold, cfg, seed)
    if not any(p.has_validation for p in parts):
        raise ValueError(f"fold {fold.index}: no validation rows could be carved from its training patients")
    model = warm_started(model_builder(specs, cfg, seed)(), parts, train_cfg)
    metric, start = validation_score(model, parts, train_cfg.select_metric)
    if start is None:
        # the validation labels alone decide this (no comparable pair / one status class), so
        # no epoch would be scored either
        raise ValueError(
            f"fold {fold.index}: the validation {metric} is undefined on the validation rows carved "
            f"from its training patients (no comparable pair, or one status class); use a larger "
            f"train.val_fraction or another train.select_metric")
    result = train_local(model, parts, train_cfg, epochs=epochs, seed=seed)
    scores = [start] + [rec.get(f"val_{metric}") for rec in result.history]
    undefined = [e for e, s in enumerate(scores) if s is None]
    if undefined:
        raise ValueError(f"fold {fold.index}: the validation {metric} is undefined at epoch(s) {undefined}")
    return {"fold": fold.index, "metric": metric, "val": [float(s) for s in scores],
            "train_loss": [float(rec["train_loss"]) for rec in result.history]}


def curves(sites: dict[str, SiteData], folds: Sequence[FoldSpec], cfg: Config, epochs: int, seed: int,
           log=print) -> dict[str, Any]:
    """:func:`fold_curve` for every fold, plus the mean curve over folds and its best epoch."""
    per_fold = []
    for fold in folds:
        c = fold_curve(sites, fold, cfg, epochs, seed)
        per_fold.append(c)
        log(f"fold {c['fold']} val {c['metric']}: " + " ".join(f"{s:.3f}" for s in c["val"]))
    mean = np.mean([c["val"] for c in per_fold], axis=0)
    best = int(np.argmax(mean))
    log(f"mean over {len(per_fold)} folds (epoch 0 = start): " + " ".join(f"{s:.3f}" for s in mean))
    log(f"start {mean[0]:.3f}; best epoch {best} ({mean[best]:.3f}); last epoch {mean[-1]:.3f}")
    return {"metric": per_fold[0]["metric"], "seed": seed, "epochs": epochs, "folds": per_fold,
            "mean": [float(v) for v in mean], "best_epoch": best}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites-dir", default=str(oncofed_home() / "sites"))
    ap.add_argument("--sites", required=True, help="comma-separated site folder names (several = pooled)")
    ap.add_argument("--folds", required=True, help="fold column, e.g. fold_parachute")
    ap.add_argument("--label", choices=("status", "event"), default="status")
    ap.add_argument("--fold-ids", default=None, help="comma-separated fold indices (default: all)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="override, e.g. train.lr=1e-4")
    ap.add_argument("--out", default=None, help="write the curves as JSON here")
    args = ap.parse_args(argv)
    cfg = load_config(None, cli_overrides(args.set))
    sites, folds = cli_sites_and_folds(args.sites_dir, args.sites, args.folds, args.label, args.fold_ids)
    try:
        out = curves(sites, folds, cfg, args.epochs, args.seed)
    except ValueError as exc:  # an undefined validation score or no validation rows: say which fold
        raise SystemExit(f"validation_curve: {exc}") from exc
    note = simulated_data_note({n: s.spec.cohort for n, s in sites.items() if s.spec.simulated})
    out.update(sites=list(sites), folds_column=args.folds, label=args.label, overrides=args.set, simulated=note)
    if note:
        print(note)
    if args.out:
        atomic_write_bytes(Path(args.out), (json.dumps(out, indent=1) + "\n").encode("utf-8"))
        print(f"written {args.out}")


if __name__ == "__main__":
    main()
