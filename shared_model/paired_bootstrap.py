"""Paired bootstrap comparison of two predictors scored on the same test patients.

Question answered: on *these* test patients, is predictor A's Harrell's C (or AUC) larger
than predictor B's by more than the resampling of the patients explains? Both predictors
are scored on the same bootstrap resamples, so the patients' shared difficulty cancels
(a paired comparison). The uncertainty is that of test-patient sampling only: the
models are fixed; retraining on other training patients (the ± over CV folds) is not
part of it.

Resampling: patients are drawn with replacement *within each stratum* (a hospital), so
every replicate keeps each site's test size. Replicate ``b`` is a vector of counts
``w_b`` [N] (how often each patient was drawn). A metric on the resampled patients is
then a weighted sum over pairs of distinct patients, computed exactly (no
approximation) from the pair matrices:

* Harrell's C, pairs within strata (:func:`shared_model.metrics.stratified_cindex`):
  C_b = sum_ij w_i w_j K_ij A_ij / sum_ij w_i w_j K_ij, with K_ij = 1 when the pair is
  comparable (i has an event and t_j > t_i, or t_j = t_i and j is censored; same
  stratum) and A_ij = 1 if r_i > r_j, 1/2 if r_i = r_j, 0 otherwise. A patient drawn
  twice is never compared with its own copy (K_ii = 0), as in lifelines.
* ROC AUC (:func:`shared_model.metrics.binary_auc`):
  AUC_b = sum_{i pos, j neg} w_i w_j A_ij / (sum_pos w)(sum_neg w).

Both equal lifelines' / scikit-learn's value on the resampled data (tested). A
replicate where the metric is undefined (no comparable pair, one class) is dropped and
counted, never averaged as NaN.

Units: ``time`` in days; ``risk`` higher = shorter survival; ``score`` higher = more
likely 1. Shapes: predictions [S, N] — S repeats of the same model (training seeds),
whose metric is averaged over S within a replicate, as the CV table averages seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared_model.metrics import _check_binary, check_finite, check_survival

__all__ = ["PairedDifference", "bootstrap_counts", "cindex_replicates", "auc_replicates", "paired_difference",
           "combine_folds"]

Z_975 = 1.959963984540054  # standard normal 97.5 % quantile


@dataclass(frozen=True)
class PairedDifference:
    """A − B of one metric on the same patients.

    ``diff``: the point difference (all patients once); ``se``: bootstrap standard error
    of the difference; ``n_valid`` / ``n_boot``: replicates where both metrics were
    defined. ``ci`` and ``p`` use the normal approximation (two-sided).
    """

    diff: float
    se: float
    n_valid: int
    n_boot: int

    @property
    def ci(self) -> tuple[float, float]:
        return self.diff - Z_975 * self.se, self.diff + Z_975 * self.se

    @property
    def p(self) -> float:
        from scipy.stats import norm

        if self.se <= 0:
            return 1.0 if self.diff == 0 else 0.0
        return float(2 * norm.sf(abs(self.diff) / self.se))


def bootstrap_counts(strata: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Draw counts [n_boot, N]: patients resampled with replacement within each stratum.

    Row b says how often each of the N patients appears in replicate b; each stratum's
    total stays its size. Deterministic given ``seed``.
    """
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    w = np.zeros((n_boot, len(strata)), dtype=np.float64)
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        draws = rng.integers(0, len(idx), size=(n_boot, len(idx)))
        for b in range(n_boot):
            w[b, idx] = np.bincount(draws[b], minlength=len(idx))
    return w


def _pair_agreement(values: np.ndarray) -> np.ndarray:
    """A[s, i, j] = 1 if values[s, i] > values[s, j], 1/2 if equal, else 0."""
    d = values[:, :, None] - values[:, None, :]
    return (d > 0) + 0.5 * (d == 0)


def _weighted_ratio(num_pairs: np.ndarray, den_pairs: np.ndarray, w: np.ndarray) -> np.ndarray:
    """sum_ij w_bi w_bj num[s,i,j] / sum_ij w_bi w_bj den[i,j] -> [S, B]; NaN where den = 0."""
    den = ((w @ den_pairs) * w).sum(axis=1)
    num = np.stack([((w @ m) * w).sum(axis=1) for m in num_pairs])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def cindex_replicates(time: object, event: object, risks: np.ndarray, strata: np.ndarray,
                      counts: np.ndarray) -> np.ndarray:
    """Harrell's C (pairs within strata) of each prediction row on each replicate.

    ``risks`` [S, N]; ``counts`` [B, N] from :func:`bootstrap_counts` (a row of ones is
    the original sample). Returns [S, B]; NaN where a replicate has no comparable pair.
    """
    t, e = check_survival(time, event)
    r = np.atleast_2d(np.asarray(risks, dtype=np.float64))
    for k, row in enumerate(r):
        check_finite(f"risks[{k}]", row)
    strata = np.asarray(strata)
    if r.shape[1] != len(t) or len(strata) != len(t) or counts.shape[1] != len(t):
        raise ValueError(f"one value per patient expected: time {len(t)}, risks {r.shape}, "
                         f"strata {len(strata)}, counts {counts.shape}")
    same = strata[:, None] == strata[None, :]
    ev = e[:, None] == 1
    later = t[None, :] > t[:, None]
    tied_censored = (t[None, :] == t[:, None]) & (e[None, :] == 0)
    comparable = (same & ev & (later | tied_censored)).astype(np.float64)
    return _weighted_ratio(comparable[None] * _pair_agreement(r), comparable, counts)


def auc_replicates(label: object, scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """ROC AUC of each score row on each replicate: [S, B]; NaN where a class is absent."""
    y = _check_binary("label", label)
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    for k, row in enumerate(s):
        check_finite(f"scores[{k}]", row)
    if s.shape[1] != len(y) or counts.shape[1] != len(y):
        raise ValueError(f"one value per patient expected: label {len(y)}, scores {s.shape}, counts {counts.shape}")
    pos_neg = ((y[:, None] == 1) & (y[None, :] == 0)).astype(np.float64)
    return _weighted_ratio(pos_neg[None] * _pair_agreement(s), pos_neg, counts)


def paired_difference(rep_a: np.ndarray, rep_b: np.ndarray, point_a: float, point_b: float,
                      min_valid: float = 0.9) -> PairedDifference | None:
    """A − B from replicates [S_a, B] and [S_b, B] of the same resamples (seed-averaged).

    ``point_*``: the metric on all patients (seed-averaged). None when fewer than
    ``min_valid`` of the replicates have both metrics defined.
    """
    a = np.asarray(rep_a).mean(axis=0)
    b = np.asarray(rep_b).mean(axis=0)
    d = a - b
    ok = np.isfinite(d)
    n_boot = len(d)
    if ok.sum() < max(2, min_valid * n_boot):
        return None
    return PairedDifference(float(point_a - point_b), float(np.std(d[ok], ddof=1)), int(ok.sum()), n_boot)


def combine_folds(per_fold: list[PairedDifference]) -> PairedDifference:
    """The mean over K folds of A − B, with SE sqrt(sum se_k^2) / K.

    Folds have disjoint test patients, resampled independently, so their bootstrap
    differences are independent and the variances add.
    """
    if not per_fold:
        raise ValueError("combine_folds needs at least one fold")
    k = len(per_fold)
    return PairedDifference(float(np.mean([p.diff for p in per_fold])),
                            float(np.sqrt(sum(p.se ** 2 for p in per_fold)) / k),
                            min(p.n_valid for p in per_fold), min(p.n_boot for p in per_fold))
