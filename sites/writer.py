"""Writing a site folder: deterministic files, atomic replacement.

Everything is written into a temporary folder next to the target, validated
with the loader, then renamed into place, so a failed build never leaves a
half-written site. The same inputs give bit-identical files (``.npz`` archives
are written with fixed zip timestamps; CSV floats with ``repr`` precision).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import yaml

from shared_model.atomic import default_mode
from sites.layout import SITE_YAML, SiteLayout, is_archive, site_yaml_document
from sites.problems import Problem, SiteValidationError
from sites.types import oracle_part_column

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


@dataclass
class SiteContent:
    """Everything a site folder holds, in memory, ready to be written.

    ``patients``: DataFrame with columns patient_id, time (days), event, optional
    status (0/1, or -1 / NaN = unlabelled), optional ``split_*`` / ``fold_*``.
    ``tokens[name]``: patient id -> array [n, dim] (or [dim] for vectors) for
    sequence / vector / bag modalities; a patient absent from the dict lacks it.
    ``tables[name]``: DataFrame indexed by patient id with the declared columns.
    ``oracle_risk``: Series indexed by patient id (simulated sites only).
    ``oracle_parts``: optional additive parts of ``oracle_risk`` keyed by the tuple of
    modalities that reveal each part (Series indexed like ``oracle_risk``).
    """

    layout: SiteLayout
    patients: pd.DataFrame
    tokens: dict[str, Mapping[str, np.ndarray]] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    oracle_risk: pd.Series | None = None
    oracle_parts: dict[tuple[str, ...], pd.Series] | None = None


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez`` with fixed timestamps and key order, so that files are bit-identical."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    df.to_csv(path, index=False, lineterminator="\n", float_format=None, na_rep="")


def _float_text(v: float) -> str:
    """Shortest text that reads back as exactly ``v`` (``repr``), without a trailing ``.0``."""
    text = repr(float(v))
    return text[:-2] if text.endswith(".0") else text


def label_problems(content: SiteContent) -> list[Problem]:
    """What ``_patients_frame`` cannot write faithfully: an ``event`` that is not 0/1, a
    ``status`` that is not 0/1 (-1 or empty = unlabelled), a fold that is not a whole number
    (empty = outside the scheme). One :class:`Problem` per patient and column."""
    df, file = content.patients, content.layout.patients
    ids = df["patient_id"].astype(str).tolist()
    problems: list[Problem] = []

    def check(column: str, ok, must: str) -> None:
        values = pd.to_numeric(df[column], errors="coerce")
        for pid, raw, v in zip(ids, df[column].tolist(), values.tolist()):
            if not ok(v):
                problems.append(Problem(file, f"{column} {str(raw)!r} must be {must}", patient=pid))

    check("event", lambda v: v in (0, 1), "0 (censored) or 1 (death observed)")  # the loader's words
    if "status" in df.columns:
        check("status", lambda v: pd.isna(v) or v in (0, 1, -1), "0, 1, or -1/empty (= no label)")
    for c in df.columns:
        if c.startswith("fold_"):
            check(c, lambda v: pd.isna(v) or float(v).is_integer(),
                  "a whole number (the fold) or empty (= outside the scheme)")
    return problems


def _patients_frame(df: pd.DataFrame) -> pd.DataFrame:
    """patients.csv as text columns: time with every digit (days), event 0/1, status 0/1 or
    empty, folds as integers or empty (outside the scheme). ``label_problems`` is checked first."""
    out = pd.DataFrame({"patient_id": df["patient_id"].astype(str)})
    out["time"] = df["time"].astype(np.float64).map(_float_text)
    out["event"] = pd.to_numeric(df["event"]).astype(int)
    if "status" in df.columns:
        st = pd.to_numeric(df["status"], errors="coerce")
        out["status"] = [("" if (pd.isna(v) or v < 0) else str(int(v))) for v in st]
    for c in df.columns:
        if c.startswith("split_"):
            out[c] = df[c].fillna("").astype(str)
        elif c.startswith("fold_"):
            out[c] = ["" if pd.isna(v) else str(int(v)) for v in pd.to_numeric(df[c], errors="coerce")]
    return out


def _file(folder: Path, rel: str) -> Path:
    """``folder / rel`` with its parent folders made (site.yaml may name nested paths)."""
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_site_contents(content: SiteContent, folder: Path) -> None:
    """Write ``content`` into the (empty, existing) ``folder``. No validation, no atomicity
    (``write_site`` checks ``label_problems`` before it calls this)."""
    layout = content.layout
    doc = site_yaml_document(layout)
    (folder / SITE_YAML).write_text(
        yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100), encoding="utf-8"
    )
    _write_csv(_patients_frame(content.patients), _file(folder, layout.patients))
    for spec in layout.spec.modalities:
        rel = layout.modality_paths[spec.name]
        if spec.kind == "tabular":
            table = content.tables[spec.name]
            df = table.loc[:, list(spec.columns)].copy()
            df.insert(0, "patient_id", table.index.astype(str))
            _write_csv(df, _file(folder, rel))
            continue
        arrays = content.tokens[spec.name]
        if is_archive(rel):
            write_npz(_file(folder, rel), arrays)
        else:
            sub = folder / rel
            sub.mkdir(parents=True, exist_ok=True)
            for pid in sorted(arrays):
                np.save(sub / f"{pid}.npy", np.ascontiguousarray(arrays[pid]), allow_pickle=False)
    if layout.oracle_risk is not None:
        if content.oracle_risk is None:
            raise ValueError(f"site {layout.spec.name!r} declares oracle_risk but none was given")
        o = content.oracle_risk
        columns = {"patient_id": o.index.astype(str),
                   "oracle_risk": [f"{v:.17g}" for v in o.to_numpy(np.float64)]}
        for mods, part in sorted((content.oracle_parts or {}).items()):
            columns[oracle_part_column(mods)] = [
                f"{v:.17g}" for v in part.reindex(o.index).to_numpy(np.float64)]
        _write_csv(pd.DataFrame(columns), _file(folder, layout.oracle_risk))


def write_site(content: SiteContent, target: str | Path, validate: bool = True) -> Path:
    """Write a complete site folder at ``target`` atomically and return its path.

    The folder is built next to ``target`` under a temporary name, validated
    (raising :class:`SiteValidationError` with every problem, leaving
    ``target`` untouched), then moved into place. An existing ``target`` is
    replaced only if it is a site folder (holds a ``site.yaml``) — never an
    unrelated folder.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not (target / SITE_YAML).is_file():
        raise FileExistsError(
            f"{target} exists and is not a site folder (no {SITE_YAML}); refusing to replace it"
        )
    problems = label_problems(content)
    if problems:  # before anything is written
        raise SiteValidationError(target, problems)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write_site_contents(content, tmp)
        if validate:
            from sites.loader import validate_site

            problems = validate_site(tmp)
            if problems:
                raise SiteValidationError(target, problems)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old / target.name, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        os.chmod(target, default_mode(directory=True))  # mkdtemp made it 0700
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
