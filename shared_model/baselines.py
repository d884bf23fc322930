"""Classical baselines on concatenated features: penalised CoxPH and a random forest.

Features (:class:`ConcatFeatures`, fitted on training rows only):
* tabular modality: its columns as they are (NaN where missing);
* token modality (sequence / vector / bag): the mean of the patient's tokens,
  reduced by PCA to ``pca_components`` dimensions (fitted on the training rows
  that have the modality) — a CoxPH on 1 800 raw embedding dimensions and
  ~200 patients is not estimable; absent patients get NaN.
With ``pairwise=True`` (method ``coxph-pairwise``) the products of every two token
modalities' component scores are appended (k_a * k_b columns per pair; NaN when either
modality is absent): a bilinear reader of cross-modal interactions such as the
generator's x (``sites/simulate.py``), which no linear term can see.
Missing values are then imputed per the model: CoxPH gets training means plus
standardisation; the forest gets the most frequent training value (as in
HANCOCK's own random-forest baseline, ../shared/DESIGN.md §5).

* :func:`fit_coxph` — lifelines ``CoxPHFitter(penalizer=0.5)``; with several sites
  the baseline hazard is stratified by site (each hospital its own baseline).
* :func:`fit_random_forest` — scikit-learn, 500 trees, on the binary status label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from sites.types import ModalitySpec, SiteData


def principal_axes(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], the first ``min(k, n - 1, D)`` principal axes [k', D]) of the rows ``x`` [n, D], n >= 2.

    The reduction of embedding summaries shared by the CoxPH baseline and the linear warm
    start (:func:`shared_model.warm_start.principal_components`)."""
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[: int(min(k, len(x) - 1, x.shape[1]))]


@dataclass
class ConcatFeatures:
    specs: tuple[ModalitySpec, ...]
    pca_components: int = 16
    pairwise: bool = False
    _pca: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # mean, components

    def _raw(self, site: SiteData, rows: np.ndarray, spec: ModalitySpec) -> np.ndarray:
        md = site.modalities.get(spec.name)
        n = len(rows)
        if spec.kind == "tabular":
            if md is None:
                return np.full((n, spec.dim), np.nan)
            return md.values[rows].astype(np.float64)
        out = np.full((n, spec.dim), np.nan)
        if md is None:
            return out
        for i, r in enumerate(rows):
            if md.present[r]:
                tok = md.tokens(r)
                if len(tok):
                    out[i] = tok.astype(np.float64).mean(axis=0)
        return out

    def fit(self, parts: Sequence[tuple[SiteData, np.ndarray]]) -> "ConcatFeatures":
        for spec in self.specs:
            if spec.kind == "tabular":
                continue
            raw = np.concatenate([self._raw(s, np.asarray(r), spec) for s, r in parts])
            ok = raw[np.all(np.isfinite(raw), axis=1)]
            if len(ok) < 2:
                continue
            self._pca[spec.name] = principal_axes(ok, self.pca_components)
        return self

    def columns(self) -> list[str]:
        cols = []
        for spec in self.specs:
            if spec.kind == "tabular":
                cols += [f"{spec.name}:{c}" for c in (spec.columns or range(spec.dim))]
            elif spec.name in self._pca:
                cols += [f"{spec.name}:pc{i}" for i in range(len(self._pca[spec.name][1]))]
        for a, b in self._pairs():
            cols += [f"{a}:pc{i}*{b}:pc{j}" for i in range(len(self._pca[a][1]))
                     for j in range(len(self._pca[b][1]))]
        return cols

    def _pairs(self) -> list[tuple[str, str]]:
        """Pairs of reduced token modalities (model order) whose products ``pairwise`` appends."""
        if not self.pairwise:
            return []
        names = [spec.name for spec in self.specs if spec.name in self._pca]
        return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]

    def transform(self, site: SiteData, rows: np.ndarray) -> np.ndarray:
        """Features [len(rows), len(columns())] of ``rows`` (NaN where a modality is absent)."""
        rows = np.asarray(rows, dtype=np.int64)
        blocks, scores = [], {}
        for spec in self.specs:
            raw = self._raw(site, rows, spec)
            if spec.kind == "tabular":
                blocks.append(raw)
            elif spec.name in self._pca:
                mean, comps = self._pca[spec.name]
                scores[spec.name] = (raw - mean) @ comps.T  # NaN rows stay NaN
                blocks.append(scores[spec.name])
        for a, b in self._pairs():
            blocks.append((scores[a][:, :, None] * scores[b][:, None, :]).reshape(len(rows), -1))
        return np.concatenate(blocks, axis=1) if blocks else np.zeros((len(rows), 0))


@dataclass
class CoxPHBaseline:
    fitter: object
    keep_mean: np.ndarray
    keep_std: np.ndarray
    keep: np.ndarray

    def risk(self, x: np.ndarray) -> np.ndarray:
        x = x[:, self.keep]
        x = np.where(np.isfinite(x), x, self.keep_mean)
        x = (x - self.keep_mean) / self.keep_std
        beta = np.asarray(self.fitter.params_.values, dtype=np.float64)
        return x @ beta


def fit_coxph(
    x: np.ndarray, time: np.ndarray, event: np.ndarray, strata: np.ndarray | None = None,
    penalizer: float = 0.5,
) -> CoxPHBaseline:
    """Penalised CoxPH (lifelines) on ``x`` [n, p]; ``strata`` (site ids) stratify the baseline."""
    from lifelines import CoxPHFitter

    with np.errstate(all="ignore"):
        mean = np.nanmean(x, axis=0)
        std = np.nanstd(x, axis=0)
    keep = np.isfinite(mean) & np.isfinite(std) & (std > 1e-8)
    mean, std = mean[keep], std[keep]
    xs = x[:, keep]
    xs = (np.where(np.isfinite(xs), xs, mean) - mean) / std
    cols = [f"x{i}" for i in range(xs.shape[1])]
    df = pd.DataFrame(xs, columns=cols)
    df["T"] = np.asarray(time, dtype=float)
    df["E"] = np.asarray(event, dtype=int)
    kwargs = {}
    if strata is not None and len(np.unique(strata)) > 1:
        df["site"] = pd.Categorical(strata).codes
        kwargs["strata"] = ["site"]
    cph = CoxPHFitter(penalizer=penalizer)
    cph.fit(df, duration_col="T", event_col="E", **kwargs)
    return CoxPHBaseline(cph, mean, std, keep)


@dataclass
class ForestBaseline:
    model: object
    fill: np.ndarray
    keep: np.ndarray

    def score(self, x: np.ndarray) -> np.ndarray:
        x = x[:, self.keep]
        x = np.where(np.isfinite(x), x, self.fill)
        return self.model.predict_proba(x)[:, 1]


def fit_random_forest(x: np.ndarray, label: np.ndarray, seed: int = 0, n_estimators: int = 500) -> ForestBaseline:
    """Random forest on the binary status label, most-frequent imputation (HANCOCK's baseline)."""
    from sklearn.ensemble import RandomForestClassifier

    keep = np.any(np.isfinite(x), axis=0)
    xk = x[:, keep]
    fill = np.zeros(xk.shape[1])
    for j in range(xk.shape[1]):
        col = xk[:, j][np.isfinite(xk[:, j])]
        vals, counts = np.unique(col, return_counts=True)
        fill[j] = vals[np.argmax(counts)]
    xk = np.where(np.isfinite(xk), xk, fill)
    rf = RandomForestClassifier(n_estimators=n_estimators, random_state=seed, n_jobs=1)
    rf.fit(xk, np.asarray(label, dtype=int))
    return ForestBaseline(rf, fill, keep)
