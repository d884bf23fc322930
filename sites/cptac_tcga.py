"""The four PARACHUTE cohorts (CPTAC-PDA, CPTAC-UCEC, CPTAC-CCRCC, TCGA-KIRC) as site folders.

Real: patients, overall-survival times (days), events and the PARACHUTE test
folds, read from ``sites/data/cptac_tcga_labels`` (PietroCaforio/parachute,
MIT). **Simulated**: the radiology (CT per-slice 1024-d tokens) and pathology
(768-d slide vectors) embeddings, from :mod:`sites.simulate`, since the real
embeddings are not public. MMIST-ccRCC rows with ``TCGA-`` ids form TCGA-KIRC,
those with ``C3L-``/``C3N-`` ids CPTAC-CCRCC. CPTAC-PDA has one label row per
slide: the patient's slide count is its number of pathology vectors.

Patient-level missingness written into the files (``missing="default"``) is a
documented, seeded pattern per site (``sites/builtin.yaml``); ``missing="none"``
writes every modality for every patient.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sites.layout import SiteLayout
from sites.simulate import GENERATOR_VERSION, SimulatedCohort, load_params, rng_for, simulate_cohort
from sites.types import ModalitySpec, SiteSpec
from sites.writer import SiteContent

LABELS_DIR = Path(__file__).parent / "data" / "cptac_tcga_labels"
LABELS_SOURCE = ("labels and folds: PietroCaforio/parachute data/labels_splits (MIT); "
                 "radiology and pathology embeddings: SIMULATED by sites/simulate.py")


@dataclass(frozen=True)
class CohortLabels:
    """One cohort's real labels, one row per patient (order of first appearance in the file)."""

    patient_ids: list[str]
    time: np.ndarray  # float64 days
    event: np.ndarray  # int8
    fold: np.ndarray  # int64 PARACHUTE test-fold id
    n_slides: np.ndarray  # int64 slide rows per patient (1 unless the file has slide_id)
    n_folds: int


def read_labels(file: str, id_prefixes: tuple[str, ...] | None = None,
                labels_dir: Path = LABELS_DIR) -> CohortLabels:
    """Read a PARACHUTE ``k=all.tsv`` label file, one patient per ``case_id``.

    Checks that a patient's rows agree on time, event and folds and that every
    patient is in the test set of exactly one ``fold_k`` column (raises
    ``ValueError`` naming the file and patients otherwise).
    """
    path = labels_dir / file
    df = pd.read_csv(path, sep="\t", dtype={"case_id": str})
    if id_prefixes:
        df = df[df["case_id"].str.startswith(id_prefixes)]
    if df.empty:
        raise ValueError(f"{path}: no patient with id prefix {id_prefixes}")
    fold_cols = sorted((c for c in df.columns if c.startswith("fold_")), key=lambda c: int(c[5:]))
    ev = df["OS_event"].map(lambda v: {"true": 1, "false": 0, "1": 1, "0": 0}.get(str(v).strip().lower()))
    if ev.isna().any():
        bad = df.loc[ev.isna(), "case_id"].tolist()
        raise ValueError(f"{path}: OS_event not 0/1/True/False for {bad}")
    df = df.assign(_event=ev.astype(int), _time=pd.to_numeric(df["OS_days"], errors="raise"))
    per = df.groupby("case_id", sort=False)
    n_distinct = per[["_event", "_time", *fold_cols]].nunique().max(axis=1)
    inconsistent = n_distinct.index[n_distinct > 1].tolist()
    if inconsistent:
        raise ValueError(f"{path}: rows of one patient disagree on time/event/folds: {inconsistent}")
    first = per.first()
    is_test = first[fold_cols].apply(lambda s: s.str.strip().str.lower() == "test")
    n_test = is_test.sum(axis=1)
    if (n_test != 1).any():
        bad = n_test[n_test != 1]
        raise ValueError(f"{path}: every patient must be 'test' in exactly one fold column; "
                         f"not so for {dict(bad)}")
    fold = is_test.to_numpy().argmax(axis=1)
    n_slides = per.size().to_numpy() if "slide_id" in df.columns else np.ones(len(first), int)
    return CohortLabels(
        patient_ids=first.index.astype(str).tolist(),
        time=first["_time"].to_numpy(np.float64),
        event=first["_event"].to_numpy(np.int8),
        fold=np.asarray(fold, dtype=np.int64),
        n_slides=np.asarray(n_slides, dtype=np.int64),
        n_folds=len(fold_cols),
    )


def missing_pattern(ids: list[str], pattern: dict[str, float], site: str, seed: int
                    ) -> dict[str, set[str]]:
    """Patients lacking each modality under a seeded pattern {modality: fraction}.

    Exactly round(fraction * N) patients lack each listed modality; the sets of
    different modalities are disjoint, so no patient loses every modality.
    """
    rng = rng_for(seed, site, "missing-pattern")
    order = [ids[i] for i in rng.permutation(len(ids))]
    out: dict[str, set[str]] = {}
    start = 0
    for modality in sorted(pattern):
        if not 0 <= pattern[modality] <= 1:  # a negative count would slice from the end
            raise ValueError(f"{site}: missing fraction of {modality!r} must be in [0, 1], got {pattern[modality]}")
        k = int(round(pattern[modality] * len(ids)))
        if start + k > len(ids):
            raise ValueError(f"{site}: missing fractions {pattern} sum to more than 1")
        out[modality] = set(order[start : start + k])
        start += k
    return out


def site_labels(cfg: dict[str, Any], labels_dir: Path = LABELS_DIR) -> CohortLabels:
    """The labels of the built-in site whose ``sites/builtin.yaml`` entry is ``cfg``
    (its ``label_file``, kept to its ``id_prefixes`` when given)."""
    return read_labels(cfg["label_file"], tuple(cfg.get("id_prefixes") or ()) or None, labels_dir)


def build_content(name: str, cfg: dict[str, Any], seed: int = 0, missing: str = "default",
                  labels_dir: Path = LABELS_DIR) -> tuple[SiteContent, SimulatedCohort]:
    """The content of one CPTAC/TCGA site folder (simulated embeddings around real labels)."""
    labels = site_labels(cfg, labels_dir)
    if missing == "default":
        pattern = {k: float(v) for k, v in (cfg.get("missing") or {}).items()}
    elif missing == "none":
        pattern = {}
    else:
        raise ValueError(f"missing must be 'default' or 'none', not {missing!r}")
    return content_from_labels(
        name, cfg["cohort"], labels, pattern, seed,
        description=(f"{cfg['cohort']}: REAL patients, overall-survival times (days), events and "
                     "PARACHUTE folds; radiology and pathology embeddings are SIMULATED "
                     "(sites/simulate.py), not real image features."),
        source=LABELS_SOURCE,
        missing=missing, label_file=cfg["label_file"],
    )


def content_from_labels(name: str, cohort_name: str, labels: CohortLabels, pattern: dict[str, float],
                        seed: int, description: str, source: str, missing: str, label_file: str,
                        fold_column: str = "fold_parachute") -> tuple[SiteContent, SimulatedCohort]:
    """A simulated site folder's content around given labels (times in days).

    ``pattern`` {modality: fraction} is the seeded missingness (:func:`missing_pattern`);
    ``labels.fold`` becomes the patients' ``fold_column``; ``missing`` (the pattern's name)
    and ``label_file`` (where the labels come from) are recorded in the provenance.
    """
    unknown = sorted(set(pattern) - {"radiology", "pathology"})
    if unknown:  # a misspelt key would build a site without gaps while its provenance claims them
        raise ValueError(f"{name}: missing pattern names unknown modalities {unknown}; "
                         "a simulated CPTAC/TCGA site has 'radiology' and 'pathology'")
    params = load_params()
    cohort = simulate_cohort(name, labels.patient_ids, labels.time, labels.event,
                             labels.n_slides, seed, params)
    lacking = missing_pattern(labels.patient_ids, pattern, name, seed)

    rad = ModalitySpec("radiology", "sequence", params.radiology_dim, (),
                       "SIMULATED CT per-slice embeddings (MedImageInsight-like), "
                       f"{params.n_slices_min}-{params.n_slices_max} slices")
    path = ModalitySpec("pathology", "vector", params.pathology_dim, (),
                        "SIMULATED WSI slide embeddings (TITAN-like), one vector per slide")
    n_missing = {m: len(s) for m, s in lacking.items()}
    spec = SiteSpec(
        name=name,
        cohort=cohort_name,
        time_unit="days",
        tasks=("survival",),
        modalities=(rad, path),
        simulated=True,
        description=description,
        source=source,
    )
    layout = SiteLayout(
        spec=spec,
        patients="patients.csv",
        oracle_risk="oracle_risk.csv",
        modality_paths={"radiology": "radiology/", "pathology": "pathology.npz"},
        provenance={
            "embeddings": "simulated",
            "generator": "sites.simulate",
            "generator_version": GENERATOR_VERSION,
            "seed": int(seed),
            "missing": missing,
            "patients_lacking": n_missing,
            "oracle_c_index": round(float(cohort.latent.oracle_c), 4),
            "outcome_noise_sigma": round(float(cohort.latent.sigma), 4),
            "label_file": label_file,
        },
    )
    patients = pd.DataFrame({
        "patient_id": labels.patient_ids,
        "time": labels.time,
        "event": labels.event.astype(int),
        fold_column: labels.fold,
    })
    radiology = {p: a for p, a in cohort.radiology.items() if p not in lacking.get("radiology", ())}
    pathology = {p: a for p, a in cohort.pathology.items() if p not in lacking.get("pathology", ())}
    content = SiteContent(
        layout=layout,
        patients=patients,
        tokens={"radiology": radiology, "pathology": pathology},
        oracle_risk=pd.Series(cohort.oracle_risk, index=labels.patient_ids),
        oracle_parts={mods: pd.Series(part, index=labels.patient_ids)
                      for mods, part in cohort.oracle_parts.items()},
    )
    return content, cohort
