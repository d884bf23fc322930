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
With ``agreement=True`` (method ``coxph-agreement``) one column per pair of token
modalities is appended instead: their agreement score
(:mod:`shared_model.agreement`, fitted without labels on the training rows, each site's
summaries centred on its own training patients; NaN when either modality is absent).
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

from shared_model.agreement import AgreementMap, embedding_pairs, fit_agreement
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
    agreement: bool = False
    agreement_components: int = 10
    _pca: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # mean, components
    _agree: dict[tuple[str, str], AgreementMap] = field(default_factory=dict)
    _centre: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (site, modality) -> [D]

    def _raw(self, site: SiteData, rows: np.ndarray, spec: ModalitySpec) -> np.ndarray:
        """[len(rows), dim] summaries (:meth:`ModalityData.summaries`), all NaN where the site lacks the modality."""
        md = site.modalities.get(spec.name)
        return np.full((len(rows), spec.dim), np.nan) if md is None else md.summaries(rows)

    def fit(self, parts: Sequence[tuple[SiteData, np.ndarray]]) -> "ConcatFeatures":
        token_specs = [spec for spec in self.specs if spec.kind != "tabular"]
        # each part's raw summaries, read once for the PCA and the agreement readers
        raws = {spec.name: [self._raw(s, np.asarray(r), spec) for s, r in parts] for spec in token_specs}
        for spec in token_specs:
            raw = np.concatenate(raws[spec.name])
            ok = raw[np.all(np.isfinite(raw), axis=1)]
            if len(ok) < 2:
                continue
            self._pca[spec.name] = principal_axes(ok, self.pca_components)
        if self.agreement:
            self._fit_agreement(parts, raws)
        return self

    def _fit_agreement(self, parts: Sequence[tuple[SiteData, np.ndarray]], raws: dict[str, list[np.ndarray]]
                       ) -> None:
        """Centre each site's token modalities on its training patients, then fit one
        :class:`AgreementMap` per pair of token modalities (:func:`fit_agreement`).
        ``raws``: modality -> each part's raw summaries (:meth:`_raw`, NaN where absent)."""
        tokens: dict[str, list[np.ndarray]] = {m: [] for m in raws}
        summaries: dict[str, list[np.ndarray]] = {m: [] for m in raws}
        for m, per_part in raws.items():
            for (site, rows), raw in zip(parts, per_part):
                has = np.isfinite(raw).all(axis=1)
                if not has.any():  # keep the rows (all NaN) so every modality's list lines up patient by patient
                    summaries[m].append(raw)
                    continue
                centre = raw[has].mean(axis=0)
                self._centre[site.name, m] = centre
                md = site.modalities[m]
                tokens[m] += [md.tokens(r).astype(np.float64) - centre for r in np.asarray(rows)[has]]
                summaries[m].append(raw - centre)
        for a, b in embedding_pairs(self.specs):
            if not tokens[a] or not tokens[b]:
                continue
            sa, sb = np.concatenate(summaries[a]), np.concatenate(summaries[b])
            both = np.isfinite(sa).all(axis=1) & np.isfinite(sb).all(axis=1)
            self._agree[a, b] = fit_agreement(tokens[a], tokens[b], sa[both], sb[both],
                                              self.agreement_components, (a, b))

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
        cols += [f"{a}~{b}:agreement" for a, b in self._agree]
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
        blocks, scores, raws = [], {}, {}
        for spec in self.specs:
            raw = raws[spec.name] = self._raw(site, rows, spec)
            if spec.kind == "tabular":
                blocks.append(raw)
            elif spec.name in self._pca:
                mean, comps = self._pca[spec.name]
                scores[spec.name] = (raw - mean) @ comps.T  # NaN rows stay NaN
                blocks.append(scores[spec.name])
        for a, b in self._pairs():
            blocks.append((scores[a][:, :, None] * scores[b][:, None, :]).reshape(len(rows), -1))
        for (a, b), amap in self._agree.items():
            centred = [raws[m] - self._site_centre(site, m) if np.isfinite(raws[m]).any() else raws[m]
                       for m in (a, b)]  # rows that all lack a modality score NaN whatever the centre
            blocks.append(amap.score(*centred)[:, None])
        return np.concatenate(blocks, axis=1) if blocks else np.zeros((len(rows), 0))


    def _site_centre(self, site: SiteData, modality: str) -> np.ndarray:
        """The centre of ``site``'s ``modality`` summaries over its training patients; a site
        that had none (or was not fitted) is an error: its batch effect would pass unremoved."""
        try:
            return self._centre[site.name, modality]
        except KeyError:
            raise ValueError(f"site {site.name!r}: no training patient with {modality!r} was seen when the "
                             "agreement features were fitted, so its embeddings cannot be centred") from None


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
