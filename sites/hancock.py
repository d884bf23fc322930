"""The HANCOCK head-and-neck cohort (763 real patients) as a site folder.

Source: ``sites/data/hancock`` = the ``features/`` folder of
ankilab/HANCOCK_MultimodalDataset (Dörrich et al., Nature Communications
16:7163, 2025; Apache-2.0) and the official in-distribution split
``dataset_split_in.json`` (611 train / 152 test). Everything here is real;
only the encoding is ours:

* **Labels.** ``time`` = days_to_last_information; ``event`` = 1 for *every*
  death (overall survival: "deceased not tumor specific" patients are events of
  the survival task). ``status`` = HANCOCK's official survival-status task:
  living 0, "deceased tumor specific" 1, "deceased" (cause unknown, 9 patients)
  1, "deceased not tumor specific" unlabelled (empty cell, -1 in memory).
* **Folds.** ``split_official`` (train/test from the JSON) and ``fold_cv10``
  (10 folds stratified on survival_status_with_cause, seeded, so that they are
  stratified for both the tumour-specific and the all-deaths labels).
* **Tabular modalities** clinical, pathological, blood, icd, tma_cell_density:
  one row per patient in the source file (absent = modality missing), NaN kept.
  The label-encoded *nominal* columns (HANCOCK's own NOMINAL_FEATURES list:
  smoking_status, primary_tumor_site, histologic_type, hpv_association_p16,
  grading, resection_status, resection_status_carcinoma_in_situ) are one-hot
  encoded (``column=code``; a NaN stays NaN in every one-hot column); binary,
  discrete and ordinal columns (pT_stage, pN_stage) stay numeric.
* **TMA texture** = a *bag* of the stains the patient has (<= 8 instances);
  each instance is the stain's 512-d texture vector followed by an 8-d one-hot
  stain identity (dim 520). A bag needs no imputation for a missing stain, and
  the one-hot keeps which stain an instance is, which permutation-invariant MIL
  pooling would otherwise lose.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sites.layout import SiteLayout
from sites.simulate import rng_for
from sites.types import ModalitySpec, SiteSpec
from sites.writer import SiteContent

DATA_DIR = Path(__file__).parent / "data" / "hancock"
STAINS = ("CD163", "CD3", "CD56", "CD68", "CD8", "HE", "MHC1", "PDL1")
TEXTURE_DIM = 512
#: HANCOCK's NOMINAL_FEATURES (feature_extraction/extract_tabular_features.py): label-encoded
#: with sklearn's LabelEncoder, so the integer codes carry no order -> one-hot.
NOMINAL_COLUMNS = (
    "smoking_status", "primary_tumor_site", "histologic_type", "hpv_association_p16",
    "grading", "resection_status", "resection_status_carcinoma_in_situ",
)
TABULAR_FILES = {
    "clinical": "clinical.csv",
    "pathological": "pathological.csv",
    "blood": "blood.csv",
    "icd": "icd_codes.csv",
    "tma_cell_density": "tma_cell_density.csv",
}
STATUS_CODES = {
    "living": 0,
    "deceased tumor specific": 1,
    "deceased": 1,  # cause unknown: counted as deceased, as in the official task
    "deceased not tumor specific": -1,  # excluded from the status task
}
SOURCE = ("HANCOCK multimodal dataset, ankilab/HANCOCK_MultimodalDataset features/ (Apache-2.0); "
          "Dörrich et al., Nature Communications 16:7163 (2025); official split "
          "dataset_split_in.json via zz9tf/multimodal-fusion (MIT)")


def _read_ids_csv(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, dtype={"patient_id": str})
    if not df["patient_id"].is_unique:
        raise ValueError(f"{path}: duplicate patient_id {df['patient_id'][df['patient_id'].duplicated()].tolist()}")
    return df.set_index("patient_id")


def one_hot_nominal(df: pd.DataFrame, columns: tuple[str, ...] = NOMINAL_COLUMNS) -> pd.DataFrame:
    """Replace each nominal column present in ``df`` by ``<col>=<code>`` 0/1 columns.

    Codes are the distinct non-NaN values, ascending. A NaN cell becomes NaN in
    every one-hot column of that feature. Other columns keep their place.
    """
    out = {}
    for c in df.columns:
        if c not in columns:
            out[c] = df[c].astype(np.float64)
            continue
        v = df[c]
        codes = sorted(pd.unique(v.dropna()))
        for code in codes:
            label = int(code) if float(code).is_integer() else code
            col = (v == code).astype(np.float64)
            col[v.isna()] = np.nan
            out[f"{c}={label}"] = col
    return pd.DataFrame(out, index=df.index)


def stratified_folds(labels: pd.Series, k: int, seed: int, key: str = "hancock-cv") -> np.ndarray:
    """Fold id (0..k-1) per row: each class shuffled (seeded) and dealt round-robin.

    The dealing continues across classes (largest first), so fold sizes differ
    by at most one and every class is spread as evenly as possible.
    """
    rng = rng_for(seed, key)
    fold = np.full(len(labels), -1, dtype=np.int64)
    values = labels.to_numpy()
    classes = sorted(pd.unique(values), key=lambda c: (-np.sum(values == c), str(c)))
    pos = 0
    for c in classes:
        members = np.flatnonzero(values == c)
        members = members[rng.permutation(len(members))]
        fold[members] = (pos + np.arange(len(members))) % k
        pos += len(members)
    return fold


def build_content(name: str, cfg: dict[str, Any], seed: int = 0, missing: str = "default",
                  data_dir: Path | None = None) -> SiteContent:
    """The content of the HANCOCK site folder.

    ``missing`` is accepted for symmetry with the simulated sites but changes
    nothing: HANCOCK's gaps are real and always kept.
    """
    if missing not in ("default", "none"):
        raise ValueError(f"missing must be 'default' or 'none', not {missing!r}")
    data_dir = Path(data_dir) if data_dir is not None else Path(__file__).parent / cfg["data_dir"]
    targets = _read_ids_csv(data_dir / "targets.csv")
    ids = targets.index.tolist()
    cause = targets["survival_status_with_cause"].str.strip()
    unknown = sorted(set(cause) - set(STATUS_CODES))
    if unknown:
        raise ValueError(f"{data_dir / 'targets.csv'}: unknown survival_status_with_cause {unknown}")
    split_path = data_dir / "dataset_split_in.json"
    split_doc = json.loads(split_path.read_text(encoding="utf-8"))
    split_names = {"training": "train", "test": "test"}
    bad = [d for d in split_doc if d.get("dataset") not in split_names]
    if bad:
        raise ValueError(f"{split_path}: patient {bad[0].get('patient_id')!r} has dataset {bad[0].get('dataset')!r} "
                         f"(expected 'training' or 'test'; {len(bad)} such entries)")
    split_map = {str(d["patient_id"]): split_names[d["dataset"]] for d in split_doc}
    if set(split_map) != set(ids):
        raise ValueError(f"{split_path}: patients differ from targets.csv")

    patients = pd.DataFrame({
        "patient_id": ids,
        "time": targets["days_to_last_information"].to_numpy(np.float64),
        "event": (targets["survival_status"].str.strip() == "deceased").astype(int).to_numpy(),
        "status": cause.map(STATUS_CODES).to_numpy(),
        "split_official": [split_map[p] for p in ids],
        "fold_cv10": stratified_folds(cause, int(cfg.get("cv_folds", 10)), seed),
    })

    tables: dict[str, pd.DataFrame] = {}
    specs: list[ModalitySpec] = []
    paths: dict[str, str] = {}
    descriptions = {
        "clinical": "sex, primarily_metastasis, smoking_status (one-hot), age_at_initial_diagnosis",
        "pathological": "pathology report: invasion flags, site/type/grading/HPV/resection "
                        "(one-hot), lymph nodes, infiltration depth, pT/pN stage (ordinal codes)",
        "blood": "16 haematology values (HANCOCK-imputed)",
        "icd": "40 binary ICD-10 code columns",
        "tma_cell_density": "CD3/CD8 cell densities, tumour centre (_z) and invasion front (_inv)",
    }
    for mod, file in TABULAR_FILES.items():
        df = _read_ids_csv(data_dir / file)
        unknown_ids = sorted(set(df.index) - set(ids))
        if unknown_ids:
            raise ValueError(f"{data_dir / file}: patients not in targets.csv: {unknown_ids[:5]}")
        df = one_hot_nominal(df)
        df = df.loc[[p for p in ids if p in df.index]]
        tables[mod] = df
        specs.append(ModalitySpec(mod, "tabular", df.shape[1], tuple(df.columns), descriptions[mod]))
        paths[mod] = f"{mod}.csv"

    stains: dict[str, dict[str, np.ndarray]] = {}
    for s in STAINS:
        with np.load(data_dir / f"tma_tile_dtr_256_{s}.npz") as z:
            stains[s] = {k: z[k] for k in z.files}
    bags: dict[str, np.ndarray] = {}
    for pid in ids:
        rows = []
        for j, s in enumerate(STAINS):
            vec = stains[s].get(pid)
            if vec is None:
                continue
            if vec.shape != (TEXTURE_DIM,):
                raise ValueError(f"tma_tile_dtr_256_{s}.npz: patient {pid} has shape {vec.shape}")
            one_hot = np.zeros(len(STAINS), dtype=np.float32)
            one_hot[j] = 1.0
            rows.append(np.concatenate([vec.astype(np.float32), one_hot]))
        if rows:
            bags[pid] = np.stack(rows)
    specs.append(ModalitySpec(
        "tma_texture", "bag", TEXTURE_DIM + len(STAINS), (),
        "TMA texture: one instance per available stain (" + ", ".join(STAINS) + "): 512-d "
        "texture vector + 8-d one-hot stain identity (in that order)",
    ))
    paths["tma_texture"] = "tma_texture/"

    spec = SiteSpec(
        name=name,
        cohort=cfg.get("cohort", "HANCOCK"),
        time_unit="days",
        tasks=("survival", "status"),
        modalities=tuple(specs),
        simulated=False,
        description=("HANCOCK head-and-neck cancer cohort, 763 REAL patients and features. "
                     "time = days_to_last_information; event = any death (overall survival); "
                     "status = official survival-status task (living 0, deceased tumour-specific "
                     "or cause unknown 1, deceased not tumour-specific unlabelled)."),
        source=SOURCE,
    )
    coverage = {m: int(len(t)) for m, t in tables.items()} | {"tma_texture": len(bags)}
    layout = SiteLayout(
        spec=spec,
        patients="patients.csv",
        oracle_risk=None,
        modality_paths=paths,
        provenance={
            "embeddings": "real",
            "seed": int(seed),
            "patients_with_modality": coverage,
            "one_hot_columns": list(NOMINAL_COLUMNS),
            "stain_order": list(STAINS),
        },
    )
    return SiteContent(layout=layout, patients=patients, tokens={"tma_texture": bags}, tables=tables)
