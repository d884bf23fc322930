"""Build a large simulated site to ask whether the fused model reads the interaction with more patients.

On the four CPTAC/TCGA sites no model reads the generator's radiology–pathology
interaction x (README, "What the fused model reads"): the sites have 34–96
patients each. This driver builds one **simulated** site of ``n`` patients from
the same generator (``sites/simulate.py``, same geometry and parameters) so that
``oncofed cv`` can train on it and report "follows x" with far more patients:

* labels: (time days, event, slide count) drawn jointly, with replacement, from
  the four cohorts' real labels pooled (so the follow-up and event rate are the
  cohorts'); patient ids ``SCALE-00001``...; these are not real patients;
* every patient has both modalities (``missing: none``), so the observable
  oracle equals the oracle;
* ``fold_scale``: ``n_folds`` test folds of (near-)equal size, seeded.

Usage::

    python -m simulations.scale_study --n 2000 --out .oncofed/scale
    oncofed cv --sites-dir .oncofed/scale --sites scale-2000 --folds fold_scale --fold-ids 0 \\
        --label event --set train.select_metric=cindex --methods fused,coxph --out results/scale

Nothing here is a clinical result: the embeddings and the patients are simulated.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from sites.builtin import site_config
from sites.cptac_tcga import LABELS_DIR, CohortLabels, content_from_labels, site_labels
from sites.simulate import rng_for
from sites.writer import write_site

SOURCE_SITES = ("cptac-pda", "cptac-ucec", "cptac-ccrcc", "tcga-kirc")
FOLD_COLUMN = "fold_scale"


def pooled_labels(sites: tuple[str, ...] = SOURCE_SITES, labels_dir: Path = LABELS_DIR) -> CohortLabels:
    """The real labels of ``sites`` concatenated (times in days); folds are dropped (set to 0)."""
    parts = [site_labels(site_config(name), labels_dir) for name in sites]
    return CohortLabels(
        patient_ids=[f"{name}:{pid}" for name, lab in zip(sites, parts) for pid in lab.patient_ids],
        time=np.concatenate([lab.time for lab in parts]),
        event=np.concatenate([lab.event for lab in parts]),
        fold=np.zeros(sum(len(lab.time) for lab in parts), dtype=np.int64),
        n_slides=np.concatenate([lab.n_slides for lab in parts]),
        n_folds=1,
    )


def resampled_labels(source: CohortLabels, n: int, n_folds: int, seed: int) -> CohortLabels:
    """``n`` label rows drawn with replacement from ``source`` (time, event and slide count
    kept together), new ids ``SCALE-00001``..., and ``n_folds`` seeded test folds whose
    sizes differ by at most one."""
    if n < 2 * n_folds:
        raise ValueError(f"n={n} is too small for {n_folds} folds (need at least {2 * n_folds})")
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, not {n_folds}")
    rng = rng_for(seed, "scale-study", n, "labels")
    pick = rng.integers(0, len(source.time), size=n)
    fold = np.empty(n, dtype=np.int64)
    fold[rng.permutation(n)] = np.arange(n) % n_folds
    return CohortLabels(
        patient_ids=[f"SCALE-{i + 1:05d}" for i in range(n)],
        time=source.time[pick].copy(),
        event=source.event[pick].copy(),
        fold=fold,
        n_slides=source.n_slides[pick].copy(),
        n_folds=n_folds,
    )


def build_scale_site(out_dir: str | Path, n: int, n_folds: int = 5, seed: int = 0,
                     labels_dir: Path = LABELS_DIR) -> Path:
    """Write the site folder ``<out_dir>/scale-<n>`` (atomically, validated) and return its path."""
    name = f"scale-{n}"
    labels = resampled_labels(pooled_labels(labels_dir=labels_dir), n, n_folds, seed)
    content, _ = content_from_labels(
        name, "SIMULATED (labels resampled from "
              + ", ".join(site_config(s)["cohort"] for s in SOURCE_SITES) + ")",
        labels, {}, seed,
        description=(f"{n} SIMULATED patients: (time days, event, slide count) drawn with "
                     "replacement from the four CPTAC/TCGA cohorts' real labels; radiology and "
                     "pathology embeddings SIMULATED by sites/simulate.py; every patient has "
                     "both modalities. For method studies only, not real patients."),
        source="labels resampled from PietroCaforio/parachute data/labels_splits (MIT); "
               "embeddings SIMULATED by sites/simulate.py",
        missing="none", label_file="resampled: " + ", ".join(SOURCE_SITES),
        fold_column=FOLD_COLUMN,
    )
    return write_site(content, Path(out_dir) / name)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, required=True, help="number of simulated patients")
    ap.add_argument("--out", required=True, help="folder to write the site folder scale-<n> into")
    ap.add_argument("--folds", type=int, default=5, help="number of test folds (column fold_scale)")
    ap.add_argument("--seed", type=int, default=0, help="generator and resampling seed")
    args = ap.parse_args(argv)
    path = build_scale_site(args.out, args.n, args.folds, args.seed)
    print(f"wrote {path} ({args.n} simulated patients, {args.folds} folds in {FOLD_COLUMN})")


if __name__ == "__main__":
    main()
