"""Reading and validating a site folder (format: ``sites/FORMAT.md``).

One pass reads every file of the folder and collects every problem
(:class:`~sites.problems.Problem`): :func:`validate_site` returns them,
:func:`load_site` raises one :class:`~sites.problems.SiteValidationError`
listing them all, or returns the :class:`~sites.types.SiteData`. Loading never
writes anything.

Checked: ``site.yaml`` (keys, kinds, dims, time unit = days); ``patients.csv``
(ids, duplicates, time >= 0 and finite — 0 is legal —, event in {0, 1}, status
in {0, 1, empty}, fold columns); every modality file (readable, known patient
ids, dtype float16/32/64, declared dimension, at least one token, no NaN/Inf in
embeddings, tabular columns as declared, no all-empty tabular row); every
declared modality is there and held by at least one patient; every patient has
at least one modality; the site has patients. Embeddings are returned as
float32, times as float64 days.
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from sites.layout import PATIENT_ID_RE, SiteLayout, is_archive, parse_site_yaml
from sites.problems import Problem, SiteValidationError, SitesValidationError, repeated
from sites.types import (ModalityData, ModalitySpec, SiteData, SiteSpec, oracle_part_column,
                         parse_oracle_part_column)

FLOAT32_MAX = float(np.finfo(np.float32).max)  # arrays and tables are loaded as float32
NA_TOKENS = frozenset({"", "na", "nan", "n/a", "null", "none"})
_MAX_PER_KIND = 20  # problems of one kind in one file before summarising the rest
_FOLD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*$")


# ----------------------------------------------------------------------------- public API


def validate_site(path: str | Path) -> list[Problem]:
    """Every problem of the site folder at ``path`` (empty list = valid). Writes nothing."""
    _, problems = _read_site(Path(path))
    return problems


def load_site(path: str | Path) -> SiteData:
    """Load and validate the site folder at ``path``.

    Raises :class:`SiteValidationError` (its message lists every problem) when
    anything is wrong. Times are float64 days; embeddings float32.
    """
    site, problems = _read_site(Path(path))
    if problems or site is None:
        raise SiteValidationError(path, problems)
    return site


def read_site(path: str | Path) -> tuple[SiteData | None, list[Problem]]:
    """One validating read: ``(site, [])`` when valid, else ``(None, problems)``. Writes nothing."""
    return _read_site(Path(path))


def load_sites(root: str | Path, names: Iterable[str]) -> list[SiteData]:
    """Load ``root/<name>`` for every name, in order; one error lists the problems of all sites."""
    root = Path(root)
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"site names listed twice: {repeated(names)}")
    sites, errors = [], []
    for name in names:
        try:
            sites.append(load_site(root / name))
        except SiteValidationError as exc:
            errors.append(exc)
    if errors:
        raise SitesValidationError(errors)
    require_distinct_names(sites)
    return sites


def require_distinct_names(sites: Sequence[SiteData]) -> None:
    """Refuse two sites with one ``site.yaml`` name (e.g. a copied folder not renamed):
    everything downstream keys sites by that name, so one would silently replace the other."""
    seen: dict[str, Path] = {}
    for site in sites:
        if site.name in seen:
            raise ValueError(f"sites {seen[site.name]} and {site.root} are both named {site.name!r} in "
                             "their site.yaml; every site needs its own name")
        seen[site.name] = site.root


def union_specs(specs: Sequence[SiteSpec]) -> tuple[ModalitySpec, ...]:
    """All modalities of the federation, in a stable order (site order, then declaration order).

    Raises ``ValueError`` naming both sites when two sites declare the same
    modality name with a different kind, dimension or columns.
    """
    out: dict[str, tuple[ModalitySpec, str]] = {}
    for site in specs:
        for m in site.modalities:
            if m.name not in out:
                out[m.name] = (m, site.name)
                continue
            first, first_site = out[m.name]
            if not first.compatible_with(m):
                raise ValueError(
                    f"modality {m.name!r} is declared incompatibly: site {first_site!r} has "
                    f"{_describe(first)}, site {site.name!r} has {_describe(m)}; one model "
                    "needs one declaration per modality name (rename one of them or align them)"
                )
    return tuple(spec for spec, _ in out.values())


def _describe(m: ModalitySpec) -> str:
    if m.kind == "tabular":
        return f"kind tabular with {m.dim} columns {list(m.columns)}"
    return f"kind {m.kind}, dim {m.dim}"


# ----------------------------------------------------------------------------- reading


class _Collector:
    """Collects problems, summarising when one file has very many of one kind."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self._counts: dict[tuple[str, str], int] = {}

    def add(self, file: str, message: str, patient: str | None = None,
            line: int | None = None, kind: str | None = None) -> None:
        key = (file, kind or message)
        n = self._counts.get(key, 0) + 1
        self._counts[key] = n
        if n <= _MAX_PER_KIND:
            self.problems.append(Problem(file, message, patient, line))

    def finish(self) -> list[Problem]:
        for (file, kind), n in self._counts.items():
            if n > _MAX_PER_KIND:
                self.problems.append(
                    Problem(file, f"... and {n - _MAX_PER_KIND} more problems like: {kind}")
                )
        return self.problems


def _read_site(root: Path) -> tuple[SiteData | None, list[Problem]]:
    col = _Collector()
    if not root.exists():
        return None, [Problem(".", f"site folder {root} does not exist")]
    if not root.is_dir():
        return None, [Problem(".", f"{root} is not a folder")]
    layout, yaml_problems = parse_site_yaml(root)
    col.problems.extend(yaml_problems)
    if layout is None:
        return None, col.finish()

    patients = _read_patients(root, layout, col)
    ids = patients["ids"] if patients else []
    # Without a usable patients.csv, modality files are still checked but not matched to ids.
    index = {pid: i for i, pid in enumerate(ids)} if patients is not None else None
    modalities: dict[str, ModalityData] = {}
    for spec in layout.spec.modalities:
        rel = layout.modality_paths[spec.name]
        if spec.kind == "tabular":
            md = _read_tabular(root, rel, spec, index, col)
        else:
            md = _read_tokens(root, rel, spec, index, col)
        if md is not None:
            modalities[spec.name] = md
    oracle = None
    if layout.oracle_risk and index is not None:
        oracle = _read_oracle(root, layout.oracle_risk, index, layout.spec.modality_names, col)

    if patients is not None and len(ids) and len(modalities) == len(layout.spec.modalities):
        any_present = np.zeros(len(ids), dtype=bool)
        for md in modalities.values():
            any_present |= md.present
        for i in np.flatnonzero(~any_present):
            col.add(layout.patients, "patient has no modality at all (no row or file in any "
                    "modality); remove the patient or add its data", ids[i],
                    patients["lines"][i], kind="patient has no modality at all")

    problems = col.finish()
    if problems or patients is None:
        return None, problems
    site = SiteData(
        root=root.resolve(),
        spec=layout.spec,
        patient_ids=np.asarray(ids, dtype=str),
        time=patients["time"],
        event=patients["event"],
        status=patients["status"],
        modalities=modalities,
        folds=patients["folds"],
        oracle_risk=None if oracle is None else oracle[0],
        oracle_parts=None if oracle is None else oracle[1],
    )
    return site, []


def _read_csv_strings(root: Path, rel: str, col: _Collector) -> pd.DataFrame | None:
    path = root / rel
    if not path.exists():
        col.add(rel, "declared in site.yaml but the file does not exist")
        return None
    if not path.is_file():
        col.add(rel, "should be a CSV file but is a folder")
        return None
    try:
        raw = path.read_bytes()  # read once: parsed as CSV and split into lines below
        df = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False, na_filter=False, skip_blank_lines=False)
        text = raw.decode("utf-8", errors="replace")  # decoded once: line numbers and the raw header
        physical = text.splitlines()[1:]
        if len(physical) == len(df):  # one row per line: drop blank lines, keep the true line numbers
            blank = np.array([not line.strip() for line in physical], dtype=bool)
            lines = np.flatnonzero(~blank) + 2
            df = df[~blank].reset_index(drop=True)
        else:  # a quoted cell spans lines: pandas' own blank-line skipping, each row's first line
            df = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False, na_filter=False)
            starts = _record_start_lines(text)
            lines = np.asarray(starts) if len(starts) == len(df) else np.arange(len(df)) + 2
    except pd.errors.EmptyDataError:
        col.add(rel, "is empty (it needs at least a header line)")
        return None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError) as exc:
        col.add(rel, f"unreadable as CSV: {str(exc).strip()}")
        return None
    df.columns = [str(c).strip() for c in df.columns]
    header = _header_names(text)  # pandas renames a repeated column (x0, x0.1): check the file's own header
    dups = repeated(header)
    if dups:
        col.add(rel, f"header lists columns twice: {dups}")
        return None
    df.attrs["lines"] = lines
    return df


def _header_names(text: str) -> list[str]:
    """The CSV header's column names as written (stripped, a leading BOM dropped), repeats kept."""
    return [c.strip() for c in next(csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline="")), [])]


def _record_start_lines(text: str) -> list[int]:
    """File line (1 = header) where each non-blank record after the header starts; a quoted
    cell may span lines. Blank lines are skipped, as pandas skips them."""
    reader = csv.reader(io.StringIO(text, newline=""))
    starts, previous_end = [], 0
    for i, row in enumerate(reader):
        if i > 0 and row:
            starts.append(previous_end + 1)
        previous_end = reader.line_num
    return starts


def _csv_lines(df: pd.DataFrame) -> np.ndarray:
    """int [len(df)]: the file line of each row of a :func:`_read_csv_strings` frame (1 = header),
    blank lines counted."""
    return df.attrs["lines"]


def _parse_numbers(values: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Strings -> float64, plus masks ``missing`` (an NA token) and ``bad`` (not a number).

    One rule for every cell, whatever the other cells of its column hold: pandas' number
    syntax (so ``1_000`` or full-width digits are not numbers, as they are for Python's
    ``float``, which an earlier fast path used when the whole column parsed)."""
    s = values.astype(str).str.strip()
    missing = s.str.lower().isin(NA_TOKENS).to_numpy()
    num = pd.to_numeric(s.where(~missing), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~missing & np.isnan(num)
    return num, missing, bad


def _check_ids(df: pd.DataFrame, rel: str, col: _Collector) -> tuple[list[str], np.ndarray]:
    """Patient ids of a CSV (stripped) and a bool mask of rows with a usable, first-seen id."""
    ids = df["patient_id"].astype(str).str.strip().tolist()
    ok = np.ones(len(ids), dtype=bool)
    first: dict[str, int] = {}
    file_lines = _csv_lines(df)
    for r, pid in enumerate(ids):
        line = int(file_lines[r])
        if not PATIENT_ID_RE.match(pid):
            col.add(rel, f"patient_id {pid!r} is not valid (letters, digits, '.', '_' or '-'; "
                    "it names the patient's files)", None, line, kind="invalid patient_id")
            ok[r] = False
        elif pid in first:
            col.add(rel, f"duplicate patient_id (first on line {first[pid]})", pid, line,
                    kind="duplicate patient_id")
            ok[r] = False
        else:
            first[pid] = line
    return ids, ok


def _read_patients(root: Path, layout: SiteLayout, col: _Collector) -> dict | None:
    rel = layout.patients
    df = _read_csv_strings(root, rel, col)
    if df is None:
        return None
    required = ["patient_id", "time", "event"]
    if "status" in layout.spec.tasks:
        required.append("status")
    missing_cols = [c for c in required if c not in df.columns]
    if missing_cols:
        col.add(rel, f"missing required column(s) {missing_cols}; header is {list(df.columns)}")
        return None
    for c in df.columns:
        if c in ("patient_id", "time", "event"):
            continue
        if c == "status":
            if "status" not in layout.spec.tasks:
                col.add(rel, "has a status column but site.yaml tasks do not list 'status'")
            continue
        if c.startswith(("split_", "fold_")) and _FOLD_NAME_RE.match(c.split("_", 1)[1]):
            continue
        col.add(rel, f"unknown column {c!r} (allowed: patient_id, time, event, status, "
                "split_<name>, fold_<name>)")
    if len(df) == 0:
        col.add(rel, "the site is empty: no patient rows")
        return None

    ids, ok = _check_ids(df, rel, col)
    lines = _csv_lines(df)

    time, t_missing, t_bad = _parse_numbers(df["time"])
    for r in np.flatnonzero(t_missing):
        col.add(rel, "time is missing (NaN); every patient needs a follow-up time in days",
                ids[r], lines[r], kind="time is missing")
    for r in np.flatnonzero(t_bad):
        col.add(rel, f"time {df['time'].iat[r]!r} is not a number", ids[r], lines[r],
                kind="time is not a number")
    with np.errstate(invalid="ignore"):
        for r in np.flatnonzero(np.isinf(time)):
            col.add(rel, "time is infinite", ids[r], lines[r], kind="time is infinite")
        for r in np.flatnonzero(time < 0):
            col.add(rel, f"time {time[r]:g} is negative (days since diagnosis must be >= 0)",
                    ids[r], lines[r], kind="negative time")

    ev_num, ev_missing, ev_bad = _parse_numbers(df["event"])
    ev_ok = ~ev_missing & ~ev_bad & np.isin(ev_num, (0.0, 1.0))
    for r in np.flatnonzero(~ev_ok):
        col.add(rel, f"event {df['event'].iat[r]!r} must be 0 (censored) or 1 (death observed)",
                ids[r], lines[r], kind="event not 0/1")
    event = np.where(ev_ok, ev_num, 0).astype(np.int8)

    status = np.full(len(df), -1, dtype=np.int8)
    if "status" in df.columns:
        st_num, st_missing, st_bad = _parse_numbers(df["status"])
        st_ok = st_missing | (~st_bad & np.isin(st_num, (0.0, 1.0, -1.0)))
        for r in np.flatnonzero(~st_ok):
            col.add(rel, f"status {df['status'].iat[r]!r} must be 0, 1 or empty (= no label)",
                    ids[r], lines[r], kind="status not 0/1/empty")
        status = np.where(st_ok & ~st_missing, np.nan_to_num(st_num, nan=-1), -1).astype(np.int8)
        if "status" in layout.spec.tasks and st_ok.all() and not (status >= 0).any():
            col.add(rel, "tasks list 'status' but no patient has a status label")

    folds: dict[str, np.ndarray] = {}
    for c in df.columns:
        if c.startswith("split_"):
            v = df[c].astype(str).str.strip().str.lower().to_numpy()
            v_ok = np.isin(v, ("train", "test", ""))
            for r in np.flatnonzero(~v_ok):
                col.add(rel, f"{c} value {df[c].iat[r]!r} must be 'train', 'test' or empty",
                        ids[r], lines[r], kind=f"bad {c}")
            v = np.where(v_ok, v, "").astype(str)
            if v_ok.all() and not ((v == "train").any() and (v == "test").any()):
                col.add(rel, f"{c} needs at least one 'train' and one 'test' patient")
            folds[c] = v
        elif c.startswith("fold_"):
            num, f_missing, f_bad = _parse_numbers(df[c])
            f_ok = f_missing | (~f_bad & np.isfinite(num) & (num == np.round(num)) & (num >= -1))
            for r in np.flatnonzero(~f_ok):
                col.add(rel, f"{c} value {df[c].iat[r]!r} must be a fold number 0, 1, ... "
                        "(empty or -1 = not in this scheme)", ids[r], lines[r], kind=f"bad {c}")
            v = np.where(f_ok & ~f_missing, np.nan_to_num(num, nan=-1), -1).astype(np.int64)
            if f_ok.all() and len(np.unique(v[v >= 0])) < 2:
                col.add(rel, f"{c} needs at least two folds")
            folds[c] = v

    keep = ok
    ids_kept = [ids[r] for r in np.flatnonzero(keep)]
    return {
        "ids": ids_kept,
        "lines": lines[keep],
        "time": time[keep].astype(np.float64),
        "event": event[keep],
        "status": status[keep],
        "folds": {k: v[keep] for k, v in folds.items()},
    }


def _check_array(arr: np.ndarray, spec: ModalitySpec, rel: str, pid: str,
                 col: _Collector) -> np.ndarray | None:
    """Validate one patient's token array; return it as [n, dim] or None."""
    if not isinstance(arr, np.ndarray):  # an .npz member that is not an .npy file comes back as bytes
        col.add(rel, "entry is not an .npy array", pid, kind="unreadable entry")
        return None
    if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4, 8):  # either byte order
        col.add(rel, f"dtype {arr.dtype} is not accepted (use float16, float32 or float64)",
                pid, kind="bad dtype")
        return None
    allowed_ndim = (1, 2) if spec.kind == "vector" else (2,)
    if arr.ndim not in allowed_ndim:
        want = "[dim] or [n_slides, dim]" if spec.kind == "vector" else "[n_tokens, dim]"
        col.add(rel, f"array has shape {list(arr.shape)}; a {spec.kind} must be {want} "
                f"with dim {spec.dim}", pid, kind="bad shape")
        return None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.shape[1] != spec.dim:
        col.add(rel, f"dimension is {arr.shape[1]} but site.yaml declares dim {spec.dim} for "
                f"modality {spec.name!r} (shape {list(arr.shape)})", pid, kind="wrong dimension")
        return None
    if arr.shape[0] == 0:
        col.add(rel, "has no tokens (shape [0, dim]); delete it to mark the modality missing",
                pid, kind="no tokens")
        return None
    finite = np.isfinite(arr)
    if not finite.all():
        n_nan = int(np.isnan(arr).sum())
        n_inf = int((~finite).sum()) - n_nan
        first = int(np.flatnonzero(~finite.all(axis=1))[0])
        col.add(rel, f"embedding contains {n_nan} NaN and {n_inf} Inf values (first in token "
                f"{first}); embeddings must be finite", pid, kind="NaN/Inf in embedding")
        return None
    too_big = np.abs(arr) > FLOAT32_MAX if arr.dtype.itemsize == 8 else np.zeros(arr.shape, dtype=bool)
    if too_big.any():
        first = int(np.flatnonzero(too_big.any(axis=1))[0])
        col.add(rel, f"{int(too_big.sum())} values beyond float32 range (first in token {first}, "
                f"|x| > {FLOAT32_MAX:.3g}); embeddings are loaded as float32, where they would be Inf",
                pid, kind="NaN/Inf in embedding")
        return None
    return arr


def _read_tokens(root: Path, rel: str, spec: ModalitySpec, index: dict[str, int] | None,
                 col: _Collector) -> ModalityData | None:
    path = root / rel
    arrays: dict[str, np.ndarray] = {}
    failed = False
    if is_archive(rel):
        if not path.is_file():
            col.add(rel, f"modality {spec.name!r} is declared in site.yaml but "
                    f"{'is a folder, not an .npz file' if path.exists() else 'the file does not exist'}")
            return None
        try:
            loaded = np.load(path, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                col.add(rel, "is a single array, not an .npz archive with one entry per patient id")
                return None
            with loaded as npz:
                keys = list(npz.files)
                for key in keys:
                    if index is not None and key not in index:
                        col.add(rel, "unknown patient id (not in patients.csv)", key,
                                kind="unknown patient id")
                        failed = True
                        continue
                    try:
                        arr = npz[key]
                    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
                        col.add(rel, f"entry unreadable: {exc}", key, kind="unreadable entry")
                        failed = True
                        continue
                    checked = _check_array(arr, spec, rel, key, col)
                    if checked is None:
                        failed = True
                    else:
                        arrays[key] = checked
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
            col.add(rel, f"unreadable .npz archive: {exc}")
            return None
    else:
        if not path.is_dir():
            col.add(rel, f"modality {spec.name!r} is declared in site.yaml but "
                    f"{'is a file, not a folder of <patient_id>.npy' if path.exists() else 'the folder does not exist'}")
            return None
        for entry in sorted(path.iterdir()):
            fname = f"{rel.rstrip('/')}/{entry.name}"
            if entry.name.startswith("."):
                continue
            if not entry.is_file() or entry.suffix != ".npy":
                col.add(fname, "unexpected entry: this folder holds one <patient_id>.npy per "
                        "patient", kind="unexpected file")
                failed = True
                continue
            pid = entry.stem
            if index is not None and pid not in index:
                col.add(fname, "unknown patient id (not in patients.csv)", pid,
                        kind="unknown patient id")
                failed = True
                continue
            try:
                arr = np.load(entry, allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                col.add(fname, f"unreadable .npy file: {exc}", pid, kind="unreadable file")
                failed = True
                continue
            if not isinstance(arr, np.ndarray):
                arr.close()
                col.add(fname, "is not a .npy array (an .npz archive renamed?)", pid,
                        kind="unreadable file")
                failed = True
                continue
            checked = _check_array(arr, spec, fname, pid, col)
            if checked is None:
                failed = True
            else:
                arrays[pid] = checked
    if not arrays and not failed:
        col.add(rel, f"modality {spec.name!r} is declared in site.yaml but no patient has it "
                "(empty); remove it from site.yaml or add the files")
        return None
    if failed or index is None:
        return None
    n = len(index)
    present = np.zeros(n, dtype=bool)
    counts = np.zeros(n, dtype=np.int64)
    for pid, arr in arrays.items():
        i = index[pid]
        present[i] = True
        counts[i] = arr.shape[0]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    values = np.empty((int(offsets[-1]), spec.dim), dtype=np.float32)
    for pid, arr in arrays.items():
        i = index[pid]
        values[offsets[i] : offsets[i + 1]] = arr
    return ModalityData(spec, present, values, offsets)


def _read_tabular(root: Path, rel: str, spec: ModalitySpec, index: dict[str, int] | None,
                  col: _Collector) -> ModalityData | None:
    df = _read_csv_strings(root, rel, col)
    if df is None:
        return None
    if "patient_id" not in df.columns:
        col.add(rel, f"missing the patient_id column; header is {list(df.columns)[:8]}")
        return None
    declared = list(spec.columns)
    missing = [c for c in declared if c not in df.columns]
    extra = [c for c in df.columns if c != "patient_id" and c not in declared]
    if missing:
        col.add(rel, f"column(s) declared in site.yaml but not in the file: {missing}")
    if extra:
        col.add(rel, f"column(s) not declared in site.yaml: {extra}")
    if missing or extra:
        return None
    if len(df) == 0:
        col.add(rel, f"modality {spec.name!r} is declared in site.yaml but the file has no rows")
        return None
    ids, ok = _check_ids(df, rel, col)
    failed = not ok.all()
    lines = _csv_lines(df)
    for r in range(len(df)):
        if ok[r] and index is not None and ids[r] not in index:
            col.add(rel, "unknown patient id (not in patients.csv)", ids[r], lines[r],
                    kind="unknown patient id")
            ok[r] = False
            failed = True
    block = np.empty((len(df), len(declared)), dtype=np.float64)
    for j, c in enumerate(declared):
        num, _, bad = _parse_numbers(df[c])
        for r in np.flatnonzero(bad):
            col.add(rel, f"column {c!r}: value {df[c].iat[r]!r} is not a number (leave the "
                    "cell empty if unknown)", ids[r], lines[r], kind="not a number")
            failed = True
        for r in np.flatnonzero(np.isinf(num)):
            col.add(rel, f"column {c!r}: value is infinite", ids[r], lines[r], kind="infinite")
            failed = True
        for r in np.flatnonzero(np.isfinite(num) & (np.abs(num) > FLOAT32_MAX)):
            col.add(rel, f"column {c!r}: value {df[c].iat[r]!r} is beyond float32 range (it is "
                    "loaded as float32, where it would be infinite)", ids[r], lines[r], kind="infinite")
            failed = True
        block[:, j] = num
    empty_rows = np.isnan(block).all(axis=1)
    for r in np.flatnonzero(empty_rows & ok):
        col.add(rel, "row has no value at all; delete the row to mark the modality missing",
                ids[r], lines[r], kind="empty row")
        failed = True
    if failed or index is None:
        return None
    n = len(index)
    values = np.full((n, len(declared)), np.nan, dtype=np.float32)
    present = np.zeros(n, dtype=bool)
    rows = np.asarray([index[ids[r]] for r in range(len(df))], dtype=np.int64)
    values[rows] = block.astype(np.float32)
    present[rows] = True
    return ModalityData(spec, present, values, None)


def _read_oracle(root: Path, rel: str, index: dict[str, int], modality_names: tuple[str, ...],
                 col: _Collector) -> tuple[np.ndarray, dict[tuple[str, ...], np.ndarray] | None] | None:
    """``oracle_risk.csv``: patient_id, oracle_risk, then optional ``part:<m>[+<m>...]`` columns.

    Returns (oracle float64 [N], parts or None) or None after recording problems. Each
    part names declared modalities; the parts of a patient must sum to its oracle_risk.
    """
    df = _read_csv_strings(root, rel, col)
    if df is None:
        return None
    cols = list(df.columns)
    part_cols = cols[2:]
    if cols[:2] != ["patient_id", "oracle_risk"]:
        col.add(rel, "must start with the columns patient_id, oracle_risk (then optional "
                f"part:<modality>[+<modality>...] columns); has {cols}")
        return None
    part_keys: dict[str, tuple[str, ...]] = {}
    for c in part_cols:
        mods = parse_oracle_part_column(c)
        unknown = sorted(set(mods or ()) - set(modality_names))
        if not mods or unknown:
            why = f"names modalities {unknown} the site does not declare" if unknown else \
                "is not an oracle part (expected part:<modality>[+<modality>...])"
            col.add(rel, f"column {c!r} {why}; declared modalities: {list(modality_names)}")
            return None
        if mods in part_keys.values():
            col.add(rel, f"column {c!r} repeats the oracle part of {oracle_part_column(mods)!r}")
            return None
        part_keys[c] = mods
    ids, ok = _check_ids(df, rel, col)
    lines = _csv_lines(df)
    values = {}
    for c in ["oracle_risk", *part_cols]:
        num, _, bad = _parse_numbers(df[c])
        values[c] = (num, bad)
    out = np.full(len(index), np.nan)
    parts = {c: np.full(len(index), np.nan) for c in part_cols}
    failed = not ok.all()
    for r in range(len(df)):
        if not ok[r]:
            continue
        if ids[r] not in index:
            col.add(rel, "unknown patient id (not in patients.csv)", ids[r], int(lines[r]),
                    kind="unknown patient id")
            failed = True
            continue
        row_bad = False
        for c, (num, bad) in values.items():
            if bad[r] or not np.isfinite(num[r]):
                col.add(rel, f"{c} {df[c].iat[r]!r} is not a finite number", ids[r], int(lines[r]),
                        kind=f"bad {c}")
                row_bad = True
        if row_bad:
            failed = True
            continue
        total = values["oracle_risk"][0][r]
        if part_cols:
            s = float(sum(values[c][0][r] for c in part_cols))
            if abs(s - total) > 1e-6 * max(1.0, abs(total)):
                col.add(rel, f"the oracle parts sum to {s:.9g}, not to oracle_risk {total:.9g}",
                        ids[r], int(lines[r]), kind="oracle parts do not sum to oracle_risk")
                failed = True
                continue
        out[index[ids[r]]] = total
        for c in part_cols:
            parts[c][index[ids[r]]] = values[c][0][r]
    if failed:
        return None
    for pid, i in index.items():
        if np.isnan(out[i]):
            col.add(rel, "patient has no oracle_risk (every patient needs one)", pid,
                    kind="missing oracle_risk")
            failed = True
    if failed:
        return None
    return out, ({part_keys[c]: v for c, v in parts.items()} if part_cols else None)
