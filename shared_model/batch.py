"""Turning a loaded site into model-ready tensors.

A :class:`Batch` holds B patients, each its own sequence (nothing is shared
across patients except padding, which every layer masks out). Every modality of
the *model* appears in every batch, also at a site that never has it (then
``present`` is all False): the network substitutes its learned missing tokens.

Shapes (B patients, T tokens after padding, D modality dim, C tabular columns):

* token kinds (sequence / vector / bag):
  ``values`` float32 [B, T, D] (0 at padding; standardised per site by
  :func:`fit_input_stats` unless ``standardize_embeddings='none'``), ``mask`` bool
  [B, T] (True = real token), ``present`` bool [B]. T >= 1 even when nobody in the
  batch has tokens. ``centre`` float32 [B, D] where the tensors were built by
  :meth:`SiteTensors.for_training`: the patient's site's mean summary over its training
  patients, in the units of ``values`` (:func:`fit_site_centres`; only the agreement term
  reads it); None otherwise, and for tabular kinds.
* tabular: ``values`` float32 [B, C], standardised with the *training* rows'
  mean and std of each column and 0 where the value is missing; ``mask`` bool
  [B, C] (True = observed); ``present`` bool [B].
* ``time`` float32 [B] days; ``event`` float32 [B] in {0, 1};
  ``status`` float32 [B] in {0, 1} (0 where unlabelled); ``status_mask`` bool [B];
  ``expected`` bool [B, M]: modality j (model order) is collected by the
  patient's site, so that lacking it is *patient-level* missingness;
  ``index`` int64 [B]: row of each patient in the source site.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Iterator, Sequence

import numpy as np
import torch

from shared_model.config import EMBEDDING_STANDARDISATION
from sites.types import ModalitySpec, SiteData, token_rows

Tensor = torch.Tensor


@dataclass
class ModalityBatch:
    values: Tensor
    mask: Tensor
    present: Tensor
    centre: Tensor | None = None

    def to(self, device: torch.device | str) -> "ModalityBatch":
        return ModalityBatch(*(None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                               for f in fields(self)))


@dataclass
class Batch:
    modalities: dict[str, ModalityBatch]
    expected: Tensor
    time: Tensor
    event: Tensor
    status: Tensor
    status_mask: Tensor
    index: Tensor

    def __len__(self) -> int:
        return int(self.time.shape[0])

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            modalities={k: v.to(device) for k, v in self.modalities.items()},
            expected=self.expected.to(device),
            time=self.time.to(device),
            event=self.event.to(device),
            status=self.status.to(device),
            status_mask=self.status_mask.to(device),
            index=self.index.to(device),
        )


@dataclass
class InputStats:
    """Per-feature mean and std (float32 [D]) of one modality over a site's training rows.

    Tabular: per column over the training patients' observed values. Token kinds
    (sequence / vector / bag): per embedding dimension over every token (slice,
    slide, bag instance) of the training patients that have the modality.
    """

    mean: np.ndarray
    std: np.ndarray
    # bool [D]: features no training row observed. Tabular: those columns are read as missing
    # (NaN -> unobserved); token kinds (all True: no training patient had the modality): the
    # site's patients are read as lacking it. Either way no value reaches the model
    # unstandardised, in units its weights never saw.
    unseen: np.ndarray | None = None

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``x`` [..., D] standardised: (x - mean) / std, per feature; NaN in ``unseen`` columns."""
        out = (x - self.mean) / self.std
        if self.unseen is not None and self.unseen.any():
            out = np.where(self.unseen, np.nan, out)
        return out


def _stats(mean: np.ndarray, std: np.ndarray, unseen: np.ndarray | None = None) -> InputStats:
    """float32 statistics; an undefined mean becomes 0, an undefined or ~0 std becomes 1."""
    mean = np.where(np.isfinite(mean), mean, 0.0)
    std = np.where(np.isfinite(std) & (std > 1e-8), std, 1.0)
    return InputStats(mean.astype(np.float32), std.astype(np.float32), unseen)


def _moments(rows: np.ndarray, dim: int) -> InputStats:
    """Per-column mean/std of ``rows`` [n, dim] ignoring NaN (missing tabular values); a column
    with no observed value is marked ``unseen``."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: marked unseen below
        mean = np.nanmean(rows, axis=0) if len(rows) else np.zeros(dim)
        std = np.nanstd(rows, axis=0) if len(rows) else np.ones(dim)
    unseen = ~np.isfinite(rows).any(axis=0) if len(rows) else np.ones(dim, dtype=bool)
    return _stats(mean, std, unseen)


def _token_mean_std(values: np.ndarray, rows: np.ndarray, dim: int, chunk: int = 8192
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Raw per-dimension (mean, std) [D] of ``values[rows]`` in float64, two passes over chunks of
    ``chunk`` tokens (a hospital's CT series can hold 10^5-10^6 slice tokens); ``rows`` non-empty."""
    n = len(rows)
    total = np.zeros(dim)
    for i in range(0, n, chunk):
        total += values[rows[i : i + chunk]].astype(np.float64).sum(axis=0)
    mean = total / n
    sq = np.zeros(dim)
    for i in range(0, n, chunk):
        sq += np.square(values[rows[i : i + chunk]].astype(np.float64) - mean).sum(axis=0)
    return mean, np.sqrt(sq / n)


def fit_input_stats(
    site: SiteData, train_idx: np.ndarray, embeddings: str = "per_dimension"
) -> dict[str, InputStats]:
    """Standardisation statistics from the training rows only (never the test fold).

    Every tabular modality is z-scored per column. Token modalities (sequence /
    vector / bag) by ``embeddings``:

    * ``per_dimension`` — z-score each embedding dimension over the tokens of the
      training patients;
    * ``per_modality`` — centre each dimension, divide by one scale per modality (the
      root-mean-square of the per-dimension stds), so low-variance dimensions are not
      amplified;
    * ``none`` — raw embeddings (the papers).

    The statistics stay on the client: each site standardises its own inputs, which
    also removes a site's constant batch offset from its embeddings (a scanner /
    stainer / extractor effect) before federated training.
    """
    if embeddings not in EMBEDDING_STANDARDISATION:
        raise ValueError(f"train.standardize_embeddings must be one of {EMBEDDING_STANDARDISATION}, "
                         f"not {embeddings!r}")
    idx = np.asarray(train_idx, dtype=np.int64)
    out: dict[str, InputStats] = {}
    for name, md in site.modalities.items():
        if md.spec.kind == "tabular":
            out[name] = _moments(md.values[idx], md.spec.dim)
        elif embeddings != "none":
            rows = idx[np.asarray(md.present, dtype=bool)[idx]] if len(idx) else idx
            tok = token_rows(md.offsets, rows)
            if len(tok) == 0:  # no training patient has it: unseen, as a tabular column without a value
                out[name] = _moments(np.empty((0, md.spec.dim)), md.spec.dim)
                continue
            mean, std = _token_mean_std(md.values, tok, md.spec.dim)
            if embeddings == "per_modality":  # RMS of the raw stds (a constant dimension counts as 0)
                std = np.full_like(std, np.sqrt(np.mean(np.square(std))))
            out[name] = _stats(mean, std)
    return out


def fit_site_centres(site: SiteData, specs: Sequence[ModalitySpec], train_idx: np.ndarray,
                     input_stats: dict[str, InputStats]) -> dict[str, Tensor]:
    """Token modality of ``specs`` -> float32 [D]: the mean summary (mean token of a patient,
    then the mean over patients; :meth:`ModalityData.summaries`) of the site's training
    patients ``train_idx`` that have it, standardised by ``input_stats`` as the inputs are
    (the per-dimension standardisation is affine, so this is the mean of the standardised
    summaries); 0 where none has it.

    A site-held statistic like :func:`fit_input_stats`: it centres the site's summaries for
    the agreement term (:class:`shared_model.model.AgreementTerm`) whatever the input
    standardisation, as :class:`shared_model.baselines.ConcatFeatures` centres them for the
    CoxPH agreement column (the same patient-weighted mean)."""
    idx = np.asarray(train_idx, dtype=np.int64)
    out: dict[str, Tensor] = {}
    for spec in specs:
        if spec.kind == "tabular":
            continue
        md = site.modalities.get(spec.name)
        summaries = md.summaries(idx) if md is not None else np.zeros((0, spec.dim))
        has = np.isfinite(summaries).all(axis=1)
        centre = summaries[has].mean(axis=0) if has.any() else np.zeros(spec.dim)
        st = input_stats.get(spec.name)
        if st is not None and has.any():
            centre = st.apply(centre)
        out[spec.name] = torch.as_tensor(centre, dtype=torch.float32)
    return out


class SiteTensors:
    """A site held as tensors, ready to be cut into batches for a given model.

    ``specs`` are the model's modalities (the federation's union), in model order.
    A modality the site lacks yields all-absent entries. ``input_stats`` (from
    :func:`fit_input_stats`) standardise the modalities they name.
    """

    @classmethod
    def for_training(
        cls, site: SiteData, specs: Sequence[ModalitySpec], train_idx: np.ndarray,
        standardize_embeddings: str = "per_dimension",
    ) -> "SiteTensors":
        """The site with inputs standardised by statistics of its rows ``train_idx``, and its
        token modalities' centres (:func:`fit_site_centres`) from the same rows."""
        stats = fit_input_stats(site, train_idx, standardize_embeddings)
        tensors = cls(site, specs, stats)
        tensors.centres = fit_site_centres(site, specs, train_idx, stats)
        return tensors

    def __init__(
        self,
        site: SiteData,
        specs: Sequence[ModalitySpec],
        input_stats: dict[str, InputStats] | None = None,
    ) -> None:
        self.site = site
        self.specs = tuple(specs)
        n = len(site)
        self.n = n
        self.time = torch.as_tensor(site.time, dtype=torch.float32)
        self.event = torch.as_tensor(site.event, dtype=torch.float32)
        status = np.asarray(site.status)
        self.status_mask = torch.as_tensor(status >= 0)
        self.status = torch.as_tensor(np.where(status >= 0, status, 0), dtype=torch.float32)
        site_names = set(site.spec.modality_names)
        self.expected_row = torch.tensor([s.name in site_names for s in self.specs])
        self._mods: dict[str, tuple] = {}
        self.centres: dict[str, Tensor] = {}  # set by for_training (fit_site_centres)
        stats = input_stats or {}
        for spec in self.specs:
            md = site.modalities.get(spec.name)
            if md is not None and not md.spec.compatible_with(spec):
                raise ValueError(
                    f"site {site.name!r} ({site.root}): modality {spec.name!r} is declared as "
                    f"{md.spec.kind}/{md.spec.dim} but the model expects {spec.kind}/{spec.dim}"
                )
            if spec.kind == "tabular":
                if md is None:
                    vals = torch.zeros(n, spec.dim)
                    obs = torch.zeros(n, spec.dim, dtype=torch.bool)
                    present = torch.zeros(n, dtype=torch.bool)
                else:
                    raw = md.values.astype(np.float32)
                    st = stats.get(spec.name)
                    if st is not None:
                        raw = st.apply(raw)
                    obs_np = np.isfinite(raw)
                    vals = torch.as_tensor(np.where(obs_np, raw, 0.0), dtype=torch.float32)
                    obs = torch.as_tensor(obs_np)
                    present = torch.as_tensor(md.present)
                self._mods[spec.name] = ("tabular", vals, obs, present)
            else:
                if md is None:
                    values = torch.zeros(0, spec.dim)
                    offsets = torch.zeros(n + 1, dtype=torch.int64)
                    present = torch.zeros(n, dtype=torch.bool)
                else:
                    raw = np.asarray(md.values, dtype=np.float32)
                    st = stats.get(spec.name)
                    unseen = st is not None and st.unseen is not None and bool(st.unseen.all())
                    if st is not None and not unseen:
                        raw = st.apply(raw)
                    values = torch.as_tensor(raw)
                    offsets = torch.as_tensor(md.offsets, dtype=torch.int64)
                    present = torch.as_tensor(md.present) & (offsets[1:] > offsets[:-1])
                    if unseen:  # no training patient of the site had it (InputStats.unseen)
                        present = torch.zeros_like(present)
                self._mods[spec.name] = ("tokens", values, offsets, present)

    def batch(self, idx: Sequence[int] | np.ndarray | Tensor) -> Batch:
        """Collate patients ``idx`` (rows of the site) into a :class:`Batch`."""
        idx_t = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        b = len(idx_t)
        mods: dict[str, ModalityBatch] = {}
        for spec in self.specs:
            entry = self._mods[spec.name]
            if entry[0] == "tabular":
                _, vals, obs, present = entry
                mods[spec.name] = ModalityBatch(vals[idx_t], obs[idx_t], present[idx_t])
                continue
            _, values, offsets, present = entry
            starts = offsets[idx_t]
            counts = offsets[idx_t + 1] - starts
            t = max(int(counts.max()) if b else 1, 1)
            out = torch.zeros(b, t, spec.dim)
            mask = torch.zeros(b, t, dtype=torch.bool)
            for row, (s, c) in enumerate(zip(starts.tolist(), counts.tolist())):
                if c:
                    out[row, :c] = values[s : s + c]
                    mask[row, :c] = True
            centre = self.centres.get(spec.name)
            mods[spec.name] = ModalityBatch(out, mask, present[idx_t],
                                            None if centre is None else centre.expand(b, -1))
        return Batch(
            modalities=mods,
            expected=self.expected_row.unsqueeze(0).expand(b, -1).clone(),
            time=self.time[idx_t],
            event=self.event[idx_t],
            status=self.status[idx_t],
            status_mask=self.status_mask[idx_t],
            index=idx_t,
        )

    def iter_batches(
        self,
        idx: np.ndarray,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last_single: bool = True,
    ) -> Iterator[Batch]:
        """Batches over patients ``idx``; shuffled with ``generator`` when asked.

        A trailing batch of one patient is merged into the previous one when
        ``drop_last_single`` (a Cox partial likelihood needs >= 2 patients).
        """
        idx = np.asarray(idx, dtype=np.int64)
        if shuffle:
            perm = torch.randperm(len(idx), generator=generator).numpy()
            idx = idx[perm]
        chunks = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
        if drop_last_single and len(chunks) > 1 and len(chunks[-1]) == 1:
            chunks[-2] = np.concatenate([chunks[-2], chunks[-1]])
            chunks.pop()
        for c in chunks:
            yield self.batch(c)
