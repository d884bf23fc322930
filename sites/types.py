"""In-memory types of a hospital site: what `sites.load_site` returns.

These dataclasses are the contract between `sites/` (reading a site folder) and
`shared_model/` (turning a site into tensors). Units: every time is in **days**.

Layout of the arrays (N = number of patients of the site, in `patient_ids` order):

* ``time``    float64 [N]  follow-up time in days (>= 0; 0 is legal)
* ``event``   int8    [N]  1 = event (death) observed, 0 = right-censored
* ``status``  int8    [N]  binary status label: 0, 1, or -1 where the patient has
                           no status label (site without the task, or excluded
                           from it, e.g. HANCOCK's "deceased not tumor specific")
* modality ``m`` (see :class:`ModalityData`): ``present`` bool [N] and values.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Collection, Literal, Mapping

import numpy as np

ModalityKind = Literal["sequence", "vector", "bag", "tabular"]

#: Column prefix of an oracle part in ``oracle_risk.csv`` (``part:pathology+radiology``).
ORACLE_PART_PREFIX = "part:"


def oracle_part_column(modalities: tuple[str, ...]) -> str:
    """Column name of the oracle part revealed by ``modalities`` (sorted, joined by '+')."""
    return ORACLE_PART_PREFIX + "+".join(sorted(modalities))


def parse_oracle_part_column(column: str) -> tuple[str, ...] | None:
    """Modalities (sorted tuple) of a ``part:...`` column; None for any other column and
    ``()`` for a malformed part name (``part:`` or an empty name between '+')."""
    if not column.startswith(ORACLE_PART_PREFIX):
        return None
    mods = tuple(sorted(m.strip() for m in column[len(ORACLE_PART_PREFIX):].split("+")))
    return mods if mods and all(mods) else ()


#: Kinds whose values are stored as per-patient rows of D-dim tokens.
TOKEN_KINDS: tuple[str, ...] = ("sequence", "vector", "bag")
ALL_KINDS: tuple[str, ...] = ("sequence", "vector", "bag", "tabular")


@dataclass(frozen=True)
class ModalitySpec:
    """One modality as declared in ``site.yaml``.

    kind:
      * ``sequence`` — ordered tokens [n_tokens, dim], n varies per patient
        (e.g. CT per-slice embeddings [n_slices, 1024]).
      * ``vector`` — one embedding per patient, or one per slide when a patient
        has several slides: [n, dim] with n >= 1 (e.g. TITAN slide vectors, 768).
      * ``bag`` — unordered instances [n_instances, dim] (e.g. patch embeddings).
      * ``tabular`` — ``dim`` named ``columns``; NaN marks a missing value.
    """

    name: str
    kind: ModalityKind
    dim: int
    columns: tuple[str, ...] = ()
    description: str = ""

    def compatible_with(self, other: "ModalitySpec") -> bool:
        """True when two sites declare the same modality the same way."""
        return (
            self.name == other.name
            and self.kind == other.kind
            and self.dim == other.dim
            and tuple(self.columns) == tuple(other.columns)
        )


@dataclass(frozen=True)
class SiteSpec:
    """Parsed ``site.yaml``."""

    name: str
    cohort: str
    time_unit: str  # always "days" (validated)
    tasks: tuple[str, ...]  # subset of ("survival", "status")
    modalities: tuple[ModalitySpec, ...]
    simulated: bool = False  # True when any embedding is simulated
    description: str = ""
    source: str = ""

    def modality(self, name: str) -> ModalitySpec:
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(f"site {self.name!r} declares no modality {name!r}")

    @property
    def modality_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modalities)


@dataclass
class ModalityData:
    """Values of one modality for all N patients of a site.

    Token kinds (sequence, vector, bag):
      ``values`` float32 [sum_i n_i, dim] — all patients' tokens concatenated;
      ``offsets`` int64 [N+1] — patient i owns rows ``offsets[i]:offsets[i+1]``
      (zero rows when the patient lacks the modality).
    Tabular:
      ``values`` float32 [N, dim] — NaN where a value is missing (and all-NaN
      rows for patients without the modality); ``offsets`` is None.
    ``present`` bool [N] — the patient has this modality.
    """

    spec: ModalitySpec
    present: np.ndarray
    values: np.ndarray
    offsets: np.ndarray | None = None

    def tokens(self, i: int) -> np.ndarray:
        """Patient i's tokens [n_i, dim] (token kinds) or feature row [dim] (tabular)."""
        if self.offsets is None:
            return self.values[i]
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def summaries(self, rows: np.ndarray) -> np.ndarray:
        """float64 [len(rows), dim]: each patient's summary — the mean of its tokens (token
        kinds) or its feature row (tabular) — NaN where the patient lacks the modality or has
        no token."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.offsets is None:
            return self.values[rows].astype(np.float64)
        out = np.full((len(rows), self.spec.dim), np.nan)
        for i, r in enumerate(rows):
            if self.present[r] and self.offsets[r + 1] > self.offsets[r]:
                out[i] = self.tokens(r).astype(np.float64).mean(axis=0)
        return out

    def n_tokens(self) -> np.ndarray:
        """int64 [N]: tokens per patient (1 per present patient for tabular)."""
        if self.offsets is None:
            return self.present.astype(np.int64)
        return np.diff(self.offsets)

    def subset(self, idx: np.ndarray) -> "ModalityData":
        idx = np.asarray(idx, dtype=np.int64)
        if self.offsets is None:
            return ModalityData(self.spec, self.present[idx].copy(), self.values[idx].copy(), None)
        counts = np.diff(self.offsets)[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        rows = token_rows(self.offsets, idx)
        return ModalityData(self.spec, self.present[idx].copy(), self.values[rows], offsets)

    def with_present(self, present: np.ndarray) -> "ModalityData":
        """Copy in which patients with ``present[i] == False`` lack the modality."""
        present = np.asarray(present, dtype=bool) & self.present
        if self.offsets is None:
            values = self.values.copy()
            values[~present] = np.nan
            return ModalityData(self.spec, present, values, None)
        counts = np.where(present, np.diff(self.offsets), 0)
        offsets = np.zeros(len(present) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        rows = token_rows(self.offsets, np.flatnonzero(present))
        return ModalityData(self.spec, present, self.values[rows], offsets)


def token_rows(offsets: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Row indices (into concatenated token values) of patients ``idx``, in order."""
    if len(idx) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx]).astype(np.int64)


@dataclass(frozen=True)
class Split:
    """One train/test partition of a site, as patient row indices."""

    name: str
    train: np.ndarray  # int64 indices into the site's patients
    test: np.ndarray


@dataclass
class SiteData:
    """A loaded and validated site (see module docstring for array layouts).

    ``folds`` holds the fold columns of ``patients.csv``:
      * ``split_<name>`` -> str array [N] with values "train" / "test"
        (or "" for a patient outside that split);
      * ``fold_<scheme>`` -> int64 array [N] holding the patient's test-fold id
        (0..K-1) in a K-fold scheme, -1 for a patient outside the scheme.
    ``oracle_risk`` float64 [N] is only set for simulated sites: the generator's
    latent log-risk (higher = shorter survival), for stating how good a model
    could be. It is never a model input.
    ``oracle_parts`` (optional, simulated sites): the additive parts of
    ``oracle_risk``, keyed by the sorted tuple of modalities that together reveal
    the part (float64 [N] each; the parts sum to ``oracle_risk``). Used by
    :meth:`observable_oracle_risk`.
    ``oracle_part_means``: each part's mean over the site's patients as loaded (E[part |
    site]); filled in by :meth:`subset` so that a subset keeps its site's means. None =
    the means over the patients held here.
    """

    root: Path
    spec: SiteSpec
    patient_ids: np.ndarray  # str [N]
    time: np.ndarray  # float64 [N], days
    event: np.ndarray  # int8 [N]
    status: np.ndarray  # int8 [N], -1 = unlabelled
    modalities: dict[str, ModalityData]
    folds: dict[str, np.ndarray] = field(default_factory=dict)
    oracle_risk: np.ndarray | None = None
    oracle_parts: dict[tuple[str, ...], np.ndarray] | None = None
    oracle_part_means: dict[tuple[str, ...], float] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def __len__(self) -> int:
        return len(self.patient_ids)

    def subset(self, idx: np.ndarray) -> "SiteData":
        """Patients ``idx`` only (a copy; fold columns follow the patients)."""
        idx = np.asarray(idx, dtype=np.int64)
        return replace(
            self,
            patient_ids=self.patient_ids[idx].copy(),
            time=self.time[idx].copy(),
            event=self.event[idx].copy(),
            status=self.status[idx].copy(),
            modalities={k: v.subset(idx) for k, v in self.modalities.items()},
            folds={k: v[idx].copy() for k, v in self.folds.items()},
            oracle_risk=None if self.oracle_risk is None else self.oracle_risk[idx].copy(),
            oracle_parts=None if self.oracle_parts is None else {
                k: v[idx].copy() for k, v in self.oracle_parts.items()},
            oracle_part_means=self.part_means(),
        )

    def part_means(self) -> dict[tuple[str, ...], float] | None:
        """E[part | site] for every oracle part: ``oracle_part_means`` when set (a subset
        keeps its site's), else each part's mean over the patients held here. None
        without ``oracle_parts``."""
        if self.oracle_parts is None:
            return None
        if self.oracle_part_means is not None and set(self.oracle_part_means) == set(self.oracle_parts):
            return dict(self.oracle_part_means)
        return {k: float(np.mean(v)) if len(v) else 0.0 for k, v in self.oracle_parts.items()}

    def observable_oracle_risk(self, reveal: Collection[tuple[str, ...]] | None = None
                               ) -> np.ndarray | None:
        """E[eta | what the patient's observed modalities reveal, its site], float64 [N].

        Each ``oracle_parts`` part whose modalities the patient all has (a radiology
        part needs the CT, an interaction part both CT and slide) enters as it is; a
        part the patient cannot reveal enters as its site mean, E[part | site]
        (:meth:`part_means`). For the built-in generator the parts are independent given
        the site, so this is the best risk score any model can compute from what the
        patient has and where it is treated. The site mean matters: a part's mean is
        not 0 at a high- or low-risk cohort (the generator's eta has one global centre),
        and filling it with 0 would rank a patient without a CT against the site's
        other patients as if the cohort's average risk were the global one (on the
        PARACHUTE folds of the four CPTAC/TCGA sites: 0.815 zero-filled vs 0.844 with
        the site means; sites/FORMAT.md section 4). Missingness is taken as unrelated to
        the parts. Equal to the oracle where nothing is missing. None without
        ``oracle_parts``.

        ``reveal``: only these parts (keys of ``oracle_parts``) can be read, every other
        part enters as its site mean — e.g. ``[("radiology",), ("pathology",)]`` is a
        perfect reader of r and p that ignores their interaction (a perfect linear reader
        for the built-in generator). Unknown keys raise ``KeyError``.
        """
        means = self.part_means()
        if means is None:
            return None
        readable = set(self.oracle_parts) if reveal is None else {tuple(k) for k in reveal}
        unknown = sorted(readable - set(self.oracle_parts))
        if unknown:
            raise KeyError(f"site {self.name!r}: no oracle parts {unknown}; it has {sorted(self.oracle_parts)}")
        out = np.zeros(len(self), dtype=np.float64)
        for mods, part in self.oracle_parts.items():
            # a modality the site lacks (e.g. a single-modality view) is never observed
            seen = self.presence_matrix(mods).all(axis=1) & (mods in readable)
            out += np.where(seen, part, means[mods])
        return out

    def presence_matrix(self, names: tuple[str, ...] | None = None) -> np.ndarray:
        """bool [N, M]: patient i has modality names[j] (False if the site lacks it)."""
        names = names or self.spec.modality_names
        out = np.zeros((len(self), len(names)), dtype=bool)
        for j, n in enumerate(names):
            if n in self.modalities:
                out[:, j] = self.modalities[n].present
        return out

    def splits(self, column: str) -> list[Split]:
        """Train/test splits defined by one fold column (``split_*`` or ``fold_*``)."""
        if column not in self.folds:
            raise KeyError(
                f"site {self.name!r} ({self.root}) has no fold column {column!r}; "
                f"it has {sorted(self.folds)}"
            )
        col = self.folds[column]
        if column.startswith("split_"):
            return [
                Split(
                    column,
                    np.flatnonzero(col == "train").astype(np.int64),
                    np.flatnonzero(col == "test").astype(np.int64),
                )
            ]
        ids = sorted(int(k) for k in np.unique(col) if int(k) >= 0)
        inside = col >= 0
        return [
            Split(
                f"{column}={k}",
                np.flatnonzero(inside & (col != k)).astype(np.int64),
                np.flatnonzero(col == k).astype(np.int64),
            )
            for k in ids
        ]

    def resolve_split(self, spec: str = "default") -> Split:
        """One train/test split chosen by a run-config string.

        ``default``: the first ``split_*`` column (sorted by name), else fold 0 of the
        first ``fold_*`` scheme; ``<column>``: that column's first split;
        ``<column>=<k>``: fold k of a ``fold_*`` scheme.
        """
        if spec == "default":
            fixed = sorted(c for c in self.folds if c.startswith("split_"))
            kfold = sorted(c for c in self.folds if c.startswith("fold_"))
            if fixed:
                return self.splits(fixed[0])[0]
            if kfold:
                return self.splits(kfold[0])[0]
            raise KeyError(
                f"site {self.name!r} ({self.root}) has no fold column (split_* or fold_*) "
                "to take a train/test split from"
            )
        column, _, k = spec.partition("=")
        splits = self.splits(column)
        if not k:
            return splits[0]
        for s in splits:
            if s.name == f"{column}={int(k)}":
                return s
        raise KeyError(f"site {self.name!r}: fold {k} not in column {column!r}")


def simulated_data_note(cohorts: Mapping[str, str]) -> str:
    """The report sentence saying what is simulated at the simulated sites ``cohorts`` {site: cohort}.

    A cohort that begins with ``SIMULATED`` (``sites/FORMAT.md``) has simulated patients as
    well as simulated embeddings; any other simulated site has its cohort's real labels and
    folds around simulated embeddings. Returns "" when ``cohorts`` is empty.
    """
    real, parts = [], []
    for n, cohort in cohorts.items():
        if not cohort.upper().startswith("SIMULATED"):
            real.append(n)
            continue
        detail = cohort[len("SIMULATED"):].strip(" :()")
        parts.append(f"{n} — simulated patients{f' ({detail})' if detail else ''} and embeddings "
                     "simulated by `sites.simulate`")
    if real:
        parts.insert(0, f"{', '.join(real)} — real labels and folds, radiology and pathology embeddings "
                        "simulated by `sites.simulate`")
    if not parts:
        return ""
    return ("**Simulated data:** " + "; ".join(parts)
            + "; numbers describe the method on simulated data, not a clinical result.")
