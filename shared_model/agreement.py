"""Cross-modal agreement reader: how well a patient's two embeddings agree, fitted without labels.

PARACHUTE's premise (§3.3, eq. 4) is that prognosis is carried partly by the *local
agreement* of a patient's CT and slide embeddings — the cosine similarity of the
L2-normalised embeddings after learned projections — and not by either modality alone.
Learning those projections from the survival labels of 25-76 patients per site is out of
reach (README, "Where the ceiling is": neither LocXEmb nor a bilinear CoxPH reads it at
that size). This module fits them **without labels**, from the paired embeddings alone:

1. **Subspaces.** For each modality, the first ``k`` principal axes of its site-centred
   *tokens* (per-slice CT tokens, slide vectors) over the training patients — token level,
   so the axes are estimated from thousands of rows, not ~200 patient means. The caller
   centres each site on its own training patients' mean summary (a hospital's batch effect;
   :meth:`shared_model.baselines.ConcatFeatures.fit` for the CoxPH column,
   :func:`shared_model.batch.fit_site_centres` for the fused model's term).
2. **Whitening.** A patient's summary (mean token, site-centred) is projected on the axes
   and each coordinate divided by its standard deviation over the paired training
   patients, then scaled to unit length: â [k_a], b̂ [k_b].
3. **Alignment.** The rotation ``M`` [k_a, k_b] maximising the *squared* agreement
   sum_i (â_i^T M b̂_i)^2 over the paired training patients: the top eigenvector of
   sum_i vec(â_i b̂_i^T) vec(â_i b̂_i^T)^T reshaped to [k_a, k_b], projected on the partial
   isometries (polar factor U V^T of its SVD). Squared, because the sign of the agreement
   may carry either direction of risk: where a first moment sum_i â_i b̂_i^T averages to 0
   (agreement and disagreement equally common — the CCA of the two modalities finds
   nothing), the second moment still singles out the map under which the pairs are
   (anti-)collinear more often than chance (E[cos^2] > 1/k for random pairs).
4. **Score.** s = â^T M b̂ in [-1, 1] per patient with both modalities. Its sign is
   arbitrary (M and -M fit equally); the model that uses it learns the sign with its weight.

No label is read: the score can enter a supervised model as one column without
cross-fitting. Units: embeddings as stored (or as the caller standardised them); the score
is a cosine (unitless).

Where it is known to work, and where not: on the simulated CPTAC/TCGA sites
(``sites/simulate.py``), where the interaction part x of the latent risk is a cosine between
the two modalities' semantic subspaces under an unknown rotation, the score follows x at
rank correlation about 0.8 on training patients (README, "Reading the interaction"). That is
the structure the generator builds in; on real CT and slide embeddings the agreement the
foundation models encode need not be a rotation of principal subspaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from sites.types import ModalitySpec


@dataclass(frozen=True)
class AgreementMap:
    """A fitted agreement reader between modalities a and b.

    ``axes_a`` [k_a, D_a] and ``axes_b`` [k_b, D_b]: principal axes divided by the standard
    deviation of their scores (so ``summary @ axes.T`` is whitened); ``rotation`` [k_a, k_b]
    (a partial isometry, M of the module docstring); ``eigen_gap``: the top eigenvalue of
    step 3 over the second (how distinct the alignment is; 1 = none); ``patients``: the
    paired training patients it was fitted on.
    """

    axes_a: np.ndarray
    axes_b: np.ndarray
    rotation: np.ndarray
    eigen_gap: float
    patients: int

    def score(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Agreement [n] in [-1, 1] of site-centred summaries a [n, D_a] and b [n, D_b].

        A row with a non-finite value in a or b (the patient lacks a modality) scores NaN;
        a row whose projection is exactly 0 scores 0."""
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.ndim != 2 or a.shape[1] != self.axes_a.shape[1] or b.shape != (len(a), self.axes_b.shape[1]):
            raise ValueError(f"agreement score: expected a [n, {self.axes_a.shape[1]}] and b [n, "
                             f"{self.axes_b.shape[1]}], got {a.shape} and {b.shape}")
        ua, ub = _unit_rows(a @ self.axes_a.T), _unit_rows(b @ self.axes_b.T)
        return np.einsum("ni,ij,nj->n", ua, self.rotation, ub)


def embedding_pairs(specs: Sequence[ModalitySpec]) -> list[tuple[str, str]]:
    """Pairs (a, b) of embedding (non-tabular) modalities in ``specs`` order: the pairs that get
    an agreement reader (the CoxPH column and the fused model's wide term alike)."""
    names = [s.name for s in specs if s.kind != "tabular"]
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay 0, NaN rows stay NaN)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = np.where(norm > 0, x / np.where(norm > 0, norm, 1.0), 0.0)
    return np.where(np.isnan(norm), np.nan, unit)


def token_axes(tokens: Sequence[np.ndarray], k: int, name: str = "modality") -> np.ndarray:
    """First ``k`` principal axes [k, D] of the stacked site-centred tokens (uncentred second
    moment: the caller has centred them). ``tokens``: one [T_i, D] array per patient."""
    if not tokens:
        raise ValueError(f"agreement: no training patient has {name}")
    dim = tokens[0].shape[1]
    gram = np.zeros((dim, dim))
    n = 0
    for i, t in enumerate(tokens):
        t = np.asarray(t, np.float64)
        if t.ndim != 2 or t.shape[1] != dim:
            raise ValueError(f"agreement: {name} tokens of patient {i} have shape {t.shape}, expected [T, {dim}]")
        if not np.isfinite(t).all():
            raise ValueError(f"agreement: {name} tokens of patient {i} contain NaN or inf")
        gram += t.T @ t
        n += len(t)
    if n <= k:
        raise ValueError(f"agreement: {n} {name} tokens cannot give {k} principal axes")
    _, vec = np.linalg.eigh(gram / n)
    return vec[:, ::-1][:, :k].T.copy()


def fit_agreement(tokens_a: Sequence[np.ndarray], tokens_b: Sequence[np.ndarray],
                  pairs_a: np.ndarray, pairs_b: np.ndarray, k: int = 10,
                  names: tuple[str, str] = ("a", "b")) -> AgreementMap:
    """Fit the agreement reader of the module docstring (steps 1-3) on training patients only.

    ``tokens_a`` / ``tokens_b``: site-centred tokens, one [T_i, D] array per training patient
    with the modality; ``pairs_a`` [n, D_a] / ``pairs_b`` [n, D_b]: site-centred summaries
    (mean tokens) of the n training patients that have both; ``k``: axes per modality.
    Raises ``ValueError`` naming the modality when there are too few patients or tokens.
    """
    if k < 1:
        raise ValueError(f"agreement: k must be >= 1, got {k}")
    pairs_a, pairs_b = np.asarray(pairs_a, np.float64), np.asarray(pairs_b, np.float64)
    if len(pairs_a) != len(pairs_b):
        raise ValueError(f"agreement: {len(pairs_a)} {names[0]} summaries but {len(pairs_b)} {names[1]} ones")
    if len(pairs_a) < 2 * k:
        raise ValueError(f"agreement: {len(pairs_a)} training patients have both {names[0]} and {names[1]}; "
                         f"at least {2 * k} are needed for k = {k}")
    if not (np.isfinite(pairs_a).all() and np.isfinite(pairs_b).all()):
        raise ValueError(f"agreement: the paired {names[0]}/{names[1]} summaries contain NaN or inf")
    for pairs, name in ((pairs_a, names[0]), (pairs_b, names[1])):
        if pairs.shape[1] < k:
            raise ValueError(f"agreement: {name} has {pairs.shape[1]} dimensions, fewer than the k = {k} "
                             "axes asked for (model.agreement_components)")
    axes = []
    for tokens, pairs, name in ((tokens_a, pairs_a, names[0]), (tokens_b, pairs_b, names[1])):
        ax = token_axes(tokens, k, name)
        sd = (pairs @ ax.T).std(axis=0)
        if not (sd > 0).all():
            raise ValueError(f"agreement: a principal axis of {name} does not vary over the paired patients")
        axes.append(ax / sd[:, None])
    ua, ub = _unit_rows(pairs_a @ axes[0].T), _unit_rows(pairs_b @ axes[1].T)
    z = (ua[:, :, None] * ub[:, None, :]).reshape(len(ua), -1)
    val, vec = np.linalg.eigh(z.T @ z)
    top = vec[:, -1].reshape(k, k)
    u, _, vt = np.linalg.svd(top)
    gap = float(val[-1] / val[-2]) if val[-2] > 0 else float("inf")
    return AgreementMap(axes[0], axes[1], u @ vt, gap, len(ua))
