"""Exact survival and classification metrics on patient-level predictions.

Functional API in the style of torchsurv / lifelines: every function takes plain 1-D arrays
(one entry per patient) and returns a number (or a small tuple / array). Conventions:

* ``time``  float [N], follow-up in **days** (>= 0);
* ``event`` int/bool [N], 1 = event (death) observed, 0 = right-censored;
* ``risk``  float [N], **higher risk <-> shorter survival** (e.g. a Cox log-hazard);
* ``label`` int [N] in {0, 1} for binary tasks, ``score`` float [N] (higher = more likely 1).

Where lifelines or scikit-learn implement a metric, it is used (Harrell's C, KM, log-rank, Cox
hazard ratio, ROC AUC). lifelines has neither a cumulative/dynamic AUC nor Uno's IPCW C-index,
so those two are written here, with exactly the definitions scikit-survival uses
(``sksurv.metrics.cumulative_dynamic_auc``, ``concordance_index_ipcw``) and tested against it.

Errors, never NaN:

* NaN or Inf in any input -> :class:`ValueError` naming the argument and the number of bad values;
* a metric that is undefined on the data (one class only, no comparable pair, a horizon outside
  the follow-up, a censoring survival of 0 under an IPCW weight) -> :class:`MetricUndefinedError`
  (a ``ValueError`` subclass), so callers can report "undefined" explicitly.

Heavy libraries (lifelines, scikit-learn) are imported lazily so that
``shared_model.pooled_eval`` can reuse the validation helpers without importing them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from lifelines import KaplanMeierFitter

__all__ = [
    "MetricUndefinedError",
    "check_finite",
    "check_survival",
    "harrell_cindex",
    "uno_cindex",
    "binary_auc",
    "time_dependent_auc",
    "censoring_survival",
    "kaplan_meier",
    "logrank_test",
    "hazard_ratio",
]


class MetricUndefinedError(ValueError):
    """The metric has no defined value on these data (not a bug in the inputs' format).

    Examples: an AUC with only one class present, a C-index without a single comparable pair,
    a time-dependent AUC at a horizon outside the follow-up.
    """


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def check_finite(name: str, values: object, *, dtype: type = np.float64) -> np.ndarray:
    """Return ``values`` as a 1-D array of ``dtype``; raise ``ValueError`` on NaN/Inf or bad shape.

    The message names the argument and how many values are bad, e.g.
    ``"risk contains 3 NaN/Inf value(s) out of 152"``.
    """
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric, got {type(values).__name__}: {exc}") from exc
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional (one value per patient), got shape {arr.shape}")
    bad = int(np.count_nonzero(~np.isfinite(arr)))
    if bad:
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s) out of {arr.size}")
    return arr.astype(dtype, copy=False)


def _check_binary(name: str, values: object) -> np.ndarray:
    arr = check_finite(name, values)
    bad = int(np.count_nonzero((arr != 0) & (arr != 1)))
    if bad:
        raise ValueError(f"{name} must contain only 0/1, found {bad} other value(s) out of {arr.size}")
    return arr.astype(np.int8)


def _check_same_length(**arrays: np.ndarray) -> int:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arguments must have the same length (one value per patient), got {lengths}")
    return next(iter(lengths.values()))


def check_survival(time: object, event: object, *names: tuple[str, object]) -> tuple[np.ndarray, ...]:
    """Validate ``time`` (days, finite, >= 0), ``event`` (0/1) and further named float arrays.

    Returns ``(time float64, event int8, *others float64)``; raises ``ValueError`` naming the
    offending argument. ``names`` are ``(name, array)`` pairs.
    """
    t = check_finite("time", time)
    neg = int(np.count_nonzero(t < 0))
    if neg:
        raise ValueError(f"time must be >= 0 days, found {neg} negative value(s) out of {t.size}")
    e = _check_binary("event", event)
    others = [check_finite(n, a) for n, a in names]
    _check_same_length(time=t, event=e, **{n: a for (n, _), a in zip(names, others)})
    return (t, e, *others)


# ---------------------------------------------------------------------------------------------
# discrimination
# ---------------------------------------------------------------------------------------------
def harrell_cindex(time: object, event: object, risk: object) -> float:
    """Harrell's concordance index (Harrell et al. 1996), via ``lifelines.utils.concordance_index``.

    A pair (i, j) is comparable when i has an observed event and ``time_j > time_i`` (or
    ``time_j == time_i`` and j is censored); it is concordant when ``risk_i > risk_j``; tied risks
    count 1/2. Shapes: all [N]; time in days.

    Raises :class:`MetricUndefinedError` when there is no comparable pair.
    """
    from lifelines.utils import concordance_index

    t, e, r = check_survival(time, event, ("risk", risk))
    if t.size == 0:
        raise MetricUndefinedError("C-index undefined: no patients")
    try:
        return float(concordance_index(t, -r, e))
    except ZeroDivisionError as exc:
        raise MetricUndefinedError(
            f"C-index undefined: no comparable pair among {t.size} patients ({int(e.sum())} events)"
        ) from exc


def comparable_pairs(time: object, event: object) -> int:
    """Number of pairs Harrell's C compares: i has an event and ``time_j > time_i``, or
    ``time_j == time_i`` with j censored (lifelines' definition). Shapes [N]; days."""
    t, e = check_survival(time, event)
    ev_times = t[e == 1]
    srt = np.sort(t)
    later = len(t) - np.searchsorted(srt, ev_times, side="right")
    cens = np.sort(t[e == 0])
    tied_censored = np.searchsorted(cens, ev_times, side="right") - np.searchsorted(cens, ev_times, side="left")
    return int(later.sum() + tied_censored.sum())


def _check_strata(strata: object, n: int) -> np.ndarray:
    """One stratum label (int or str) per patient, none missing; raises ``ValueError`` naming ``strata``."""
    arr = np.asarray(strata)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"strata must hold one label per patient ({n}), got shape {arr.shape}")
    missing = [i for i, v in enumerate(arr.tolist())
               if v is None or (isinstance(v, float) and not math.isfinite(v))]
    if missing:
        raise ValueError(f"strata contains {len(missing)} missing/NaN label(s) out of {n} (first at row {missing[0]})")
    return arr


def stratified_cindex(time: object, event: object, risk: object, strata: object) -> float:
    """Harrell's C with pairs compared only within a stratum (e.g. a hospital).

    = sum over strata of concordant pairs / sum of comparable pairs, i.e. each
    stratum's C (lifelines) weighted by its number of comparable pairs. Patients of
    different sites have different baseline hazards, so cross-site pairs are left
    out. Strata without a comparable pair are skipped; raises
    :class:`MetricUndefinedError` when no stratum has one.
    """
    t, e, r = check_survival(time, event, ("risk", risk))
    strata = _check_strata(strata, len(t))
    num = den = 0.0
    for s in np.unique(strata):
        m = strata == s
        p = comparable_pairs(t[m], e[m])
        if p == 0:
            continue
        num += harrell_cindex(t[m], e[m], r[m]) * p
        den += p
    if den == 0:
        raise MetricUndefinedError(f"stratified C-index undefined: no comparable pair in {len(t)} patients")
    return float(num / den)


def site_cindices(parts: Mapping[str, tuple[object, object, object]]) -> dict:
    """C-indices of several sites' test predictions, each undefined one as None (never NaN).

    ``parts``: site -> (time [n_s] days, event [n_s], risk [n_s]); sites with no patient
    are skipped. Returns ``cindex`` (Harrell's C with pairs compared within each site:
    :func:`stratified_cindex`), ``cindex_pooled`` (all pairs, :func:`harrell_cindex` on
    the concatenation) and ``per_site`` {site: C or None}.
    """
    parts = {s: p for s, p in parts.items() if len(p[0])}
    out: dict = {"cindex": None, "cindex_pooled": None, "per_site": {}}
    for s, (t_s, e_s, r_s) in parts.items():
        try:
            out["per_site"][s] = harrell_cindex(t_s, e_s, r_s)
        except MetricUndefinedError:
            out["per_site"][s] = None
    if not parts:
        return out
    t, e, r = (np.concatenate([np.asarray(p[k]) for p in parts.values()]) for k in range(3))
    strata = np.concatenate([np.full(len(p[0]), i) for i, p in enumerate(parts.values())])
    for key, fn in (("cindex", lambda: stratified_cindex(t, e, r, strata)),
                    ("cindex_pooled", lambda: harrell_cindex(t, e, r))):
        try:
            out[key] = fn()
        except MetricUndefinedError:
            pass
    return out


def binary_auc(label: object, score: object) -> float:
    """Area under the ROC curve of a binary label (``sklearn.metrics.roc_auc_score``).

    Shapes: [N]; ``label`` in {0, 1}. Tied scores count 1/2.
    Raises :class:`MetricUndefinedError` when only one class is present.
    """
    from sklearn.metrics import roc_auc_score

    y = _check_binary("label", label)
    s = check_finite("score", score)
    _check_same_length(label=y, score=s)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise MetricUndefinedError(
            f"AUC undefined: only one class present ({n_pos} positive, {y.size - n_pos} negative)"
        )
    return float(roc_auc_score(y, s))


def censoring_survival(time_train: np.ndarray, event_train: np.ndarray):
    """Kaplan–Meier estimate G(t) of the censoring survival function, as scikit-survival defines it.

    ``G(t) = prod_{u <= t} (1 - c_u / (Y_u - d_u))`` over distinct times u, with ``c_u``
    censorings, ``d_u`` events and ``Y_u`` patients at risk at u (events at u leave the risk set
    before the censorings at u: the "reverse" KM of ``sksurv.nonparametric.kaplan_meier_estimator``).
    If every train patient has an event, G = 1.

    Returns a function ``G(times) -> float64 array``; asking beyond the last train time while
    G > 0 there raises :class:`MetricUndefinedError` (the censoring distribution is unknown
    there), exactly as ``CensoringDistributionEstimator.predict_proba`` refuses.
    """
    t = np.asarray(time_train, dtype=np.float64)
    e = np.asarray(event_train).astype(bool)
    uniq, inv = np.unique(t, return_inverse=True)
    d = np.bincount(inv, weights=e, minlength=uniq.size)
    total = np.bincount(inv, minlength=uniq.size).astype(np.float64)
    c = total - d
    at_risk = total[::-1].cumsum()[::-1]
    if not c.any():
        surv_t, surv_p = uniq, np.ones(uniq.size)
    else:
        denom = at_risk - d
        ratio = np.divide(c, denom, out=np.zeros_like(c), where=denom > 0)
        surv_t = np.r_[-np.inf, uniq]
        surv_p = np.r_[1.0, np.cumprod(1.0 - ratio)]

    def G(times: np.ndarray) -> np.ndarray:
        times = np.asarray(times, dtype=np.float64)
        if times.size and times.max() > surv_t[-1] and surv_p[-1] > 0:
            raise MetricUndefinedError(
                f"censoring survival unknown beyond the last train time {surv_t[-1]:g} days "
                f"(asked at {times.max():g} days): give time_train/event_train covering the test times"
            )
        out = np.zeros(times.shape)
        inside = times <= surv_t[-1]
        idx = np.searchsorted(surv_t, times[inside], side="right") - 1
        out[inside] = surv_p[np.maximum(idx, 0)]
        return out

    return G


def _train_or_test(time, event, time_train, event_train) -> tuple[np.ndarray, np.ndarray]:
    if (time_train is None) != (event_train is None):
        raise ValueError("give both time_train and event_train, or neither")
    if time_train is None:
        return time, event
    tt, et = check_survival(time_train, event_train)
    if tt.size == 0:
        raise ValueError("time_train is empty")
    return tt, et


def _ipcw(G, times: np.ndarray, what: str) -> np.ndarray:
    g = G(times)
    if np.any(g <= 0):
        bad = times[g <= 0]
        raise MetricUndefinedError(
            f"{what} undefined: the censoring survival G(t) is 0 at {bad.size} event time(s) "
            f"(first {bad.min():g} days); truncate with tau or use longer-follow-up train data"
        )
    return 1.0 / g


def uno_cindex(
    time: object,
    event: object,
    risk: object,
    *,
    tau: float | None = None,
    time_train: object = None,
    event_train: object = None,
) -> float:
    """Uno's IPCW concordance index (Uno et al. 2011), as ``sksurv.metrics.concordance_index_ipcw``.

    ``C = sum_{i,j} w_i [risk_i > risk_j] / sum_{i,j} w_i`` over comparable pairs (event i with
    ``time_i < tau``; j with ``time_j > time_i``, or equal time and j censored), with
    ``w_i = G(time_i)^-2``, G the censoring KM (:func:`censoring_survival`) of the train data (or
    of these data when no train data are given). Tied risks count 1/2 (exact equality).
    Shapes: [N]; time and tau in days. Cost O(N^2) in chunks (fine for N up to ~10^4).
    """
    t, e, r = check_survival(time, event, ("risk", risk))
    tt, et = _train_or_test(t, e, time_train, event_train)
    if tau is not None and not np.isfinite(tau):
        raise ValueError(f"tau must be finite, got {tau}")
    use = e.astype(bool) & (t < tau if tau is not None else True)
    idx = np.flatnonzero(use)
    if idx.size == 0:
        raise MetricUndefinedError(
            f"Uno's C undefined: no event before tau={tau} days among {t.size} patients"
        )
    w = _ipcw(censoring_survival(tt, et), t[idx], "Uno's C") ** 2
    num = 0.0
    den = 0.0
    chunk = max(1, 2**22 // max(t.size, 1))
    for s in range(0, idx.size, chunk):
        ii = idx[s : s + chunk]
        ti, ri = t[ii, None], r[ii, None]
        comp = (t[None, :] > ti) | ((t[None, :] == ti) & (e[None, :] == 0))
        conc = comp & (r[None, :] < ri)
        tie = comp & (r[None, :] == ri)
        wi = w[s : s + chunk]
        num += float(wi @ (conc.sum(1) + 0.5 * tie.sum(1)))
        den += float(wi @ comp.sum(1))
    if den == 0:
        raise MetricUndefinedError(f"Uno's C undefined: no comparable pair among {t.size} patients")
    return num / den


def time_dependent_auc(
    time: object,
    event: object,
    risk: object,
    horizons: Sequence[float] | np.ndarray,
    *,
    time_train: object = None,
    event_train: object = None,
) -> np.ndarray:
    """Cumulative/dynamic AUC(t) with IPCW case weights (Uno et al. 2007; Lambert & Chevret 2016).

    At horizon t: cases are patients with an event at ``time <= t``, weighted by ``1/G(time_i)``;
    controls are patients with ``time > t`` (unweighted)::

        AUC(t) = sum_{i case, j control} w_i ([r_i > r_j] + 0.5 [r_i == r_j]) / (sum_i w_i * n_controls)

    G is the censoring KM of the train data, or of these data when not given — the definition of
    ``sksurv.metrics.cumulative_dynamic_auc``. Shapes: time/event/risk [N], horizons [H] in days;
    returns float64 [H] in the order of ``horizons``.

    Raises :class:`MetricUndefinedError` when a horizon lies outside the follow-up
    ``[min(time), max(time))`` or has no case or no control.
    """
    t, e, r = check_survival(time, event, ("risk", risk))
    h = check_finite("horizons", np.atleast_1d(np.asarray(horizons, dtype=np.float64)))
    if t.size == 0:
        raise MetricUndefinedError("time-dependent AUC undefined: no patients")
    tt, et = _train_or_test(t, e, time_train, event_train)
    out_of_range = (h < t.min()) | (h >= t.max())
    if out_of_range.any():
        raise MetricUndefinedError(
            f"time-dependent AUC undefined at horizon(s) {h[out_of_range].tolist()} days: outside the "
            f"follow-up of the data [{t.min():g}, {t.max():g}) days"
        )
    G = censoring_survival(tt, et)
    out = np.empty(h.size)
    for k, hk in enumerate(h):
        case = (t <= hk) & (e == 1)
        ctrl = t > hk
        if not case.any() or not ctrl.any():
            raise MetricUndefinedError(
                f"time-dependent AUC undefined at {hk:g} days: {int(case.sum())} case(s), "
                f"{int(ctrl.sum())} control(s)"
            )
        w = _ipcw(G, t[case], f"time-dependent AUC at {hk:g} days")
        rc = np.sort(r[ctrl])
        below = np.searchsorted(rc, r[case], side="left")
        ties = np.searchsorted(rc, r[case], side="right") - below
        out[k] = float(w @ (below + 0.5 * ties)) / (float(w.sum()) * rc.size)
    return out


# ---------------------------------------------------------------------------------------------
# survival curves, tests, hazard ratio (lifelines)
# ---------------------------------------------------------------------------------------------
def kaplan_meier(time: object, event: object, *, label: str = "KM", alpha: float = 0.05) -> "KaplanMeierFitter":
    """Fitted ``lifelines.KaplanMeierFitter`` (exponential-Greenwood ``1-alpha`` bands), time in days."""
    from lifelines import KaplanMeierFitter

    t, e = check_survival(time, event)
    if t.size == 0:
        raise MetricUndefinedError("Kaplan–Meier undefined: no patients")
    return KaplanMeierFitter(alpha=alpha).fit(t, e, label=label)


def _groups(groups: object, n: int) -> np.ndarray:
    g = np.asarray(groups)
    if g.ndim != 1 or g.size != n:
        raise ValueError(f"groups must be 1-D with one entry per patient ({n}), got shape {g.shape}")
    if g.dtype.kind == "f":
        check_finite("groups", g)
    return g


def logrank_test(time: object, event: object, groups: object) -> float:
    """p-value of the (multi-group) log-rank test, ``lifelines.statistics.multivariate_logrank_test``.

    Shapes: [N]; ``groups`` any labels (>= 2 distinct). Time in days.
    Raises :class:`MetricUndefinedError` with fewer than two groups or no events.
    """
    from lifelines.statistics import multivariate_logrank_test

    t, e = check_survival(time, event)
    g = _groups(groups, t.size)
    if np.unique(g).size < 2:
        raise MetricUndefinedError(f"log-rank test undefined: {np.unique(g).size} group(s)")
    if e.sum() == 0:
        raise MetricUndefinedError("log-rank test undefined: no events")
    return float(multivariate_logrank_test(t, g, e).p_value)


def ratio_with_interval(beta: float, se: float, z: float) -> tuple[float, float, float] | None:
    """``(exp(beta), exp(beta - z se), exp(beta + z se))`` of a log hazard ratio ``beta`` with
    standard error ``se``; None when ``se`` is not finite or any of the three is 0 or infinite
    (the Cox fit has no finite maximum: the groups are separated in time)."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        out = tuple(float(v) for v in np.exp([beta, beta - z * se, beta + z * se]))
    if not np.isfinite(se) or not all(np.isfinite(v) and v > 0 for v in out):
        return None
    return out


def hazard_ratio(time: object, event: object, group: object, *, alpha: float = 0.05) -> tuple[float, float, float]:
    """Hazard ratio of ``group == 1`` vs ``group == 0`` with its ``1-alpha`` CI.

    Cox model on the binary group indicator (``lifelines.CoxPHFitter``, Efron ties, no penalty).
    Returns ``(hr, lower, upper)``. Raises :class:`MetricUndefinedError` when a group is empty or
    has no event (the maximum-likelihood HR is then 0 or infinite).
    """
    import pandas as pd
    from lifelines import CoxPHFitter

    t, e, g = check_survival(time, event, ("group", group))
    if np.any((g != 0) & (g != 1)):
        raise ValueError("group must contain only 0/1")
    for lab in (0, 1):
        sel = g == lab
        if not sel.any() or e[sel].sum() == 0:
            raise MetricUndefinedError(
                f"hazard ratio undefined: group {lab} has {int(sel.sum())} patient(s) and "
                f"{int(e[sel].sum())} event(s)"
            )
    df = pd.DataFrame({"T": t, "E": e, "g": g})
    # tight Newton–Raphson tolerance: lifelines' default (1e-7) leaves ~1e-7 relative error
    cph = CoxPHFitter(alpha=alpha).fit(df, "T", "E", fit_options={"precision": 1e-12})
    beta = float(cph.params_["g"])
    se = float(cph.standard_errors_["g"])
    from scipy.stats import norm

    out = ratio_with_interval(beta, se, float(norm.ppf(1 - alpha / 2)))
    if out is None:
        # separation (e.g. every event of one group precedes the other's first): no finite maximum
        raise MetricUndefinedError(
            f"hazard ratio undefined: the Cox fit has no finite maximum (beta {beta:.3g}, se {se:.3g}); "
            "the groups are separated in time"
        )
    return out
