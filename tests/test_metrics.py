"""Exact patient-level metrics (shared_model.metrics) against lifelines / scikit-learn /
scikit-survival references, plus the NaN and undefined-metric contracts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import logrank_test as ll_logrank
from lifelines.utils import concordance_index
from sklearn.metrics import roc_auc_score
from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc
from sksurv.nonparametric import CensoringDistributionEstimator
from sksurv.util import Surv

from shared_model import metrics as M


def _survival_data(seed: int, n: int = 250, *, risk_decimals: int | None = None, integer_days: bool = True):
    """Exponential times whose hazard grows with the risk, uniform censoring; optional ties."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    risk = x + rng.normal(scale=0.7, size=n)
    if risk_decimals is not None:
        risk = np.round(risk, risk_decimals)
    t_event = rng.exponential(900 * np.exp(-0.8 * x))
    t_cens = rng.uniform(0, 2500, n)
    time = np.minimum(t_event, t_cens)
    if integer_days:
        time = np.floor(time) + 1  # many tied times
    event = (t_event <= t_cens).astype(int)
    return time, event, risk


DATASETS = [
    dict(seed=0),  # continuous risk, integer days
    dict(seed=1, risk_decimals=0),  # heavy risk ties
    dict(seed=2, integer_days=False),  # no ties at all
    dict(seed=3, risk_decimals=1, n=120),
]


@pytest.mark.parametrize("kw", DATASETS)
def test_time_dependent_auc_matches_sksurv(kw):
    time, event, risk = _survival_data(**kw)
    y = Surv.from_arrays(event.astype(bool), time)
    horizons = np.quantile(time[event == 1], [0.1, 0.4, 0.7, 0.9])
    ref, _ = cumulative_dynamic_auc(y, y, risk, horizons)
    ours = M.time_dependent_auc(time, event, risk, horizons)
    np.testing.assert_allclose(ours, ref, atol=1e-10)
    # order of horizons is preserved (sksurv sorts)
    np.testing.assert_allclose(M.time_dependent_auc(time, event, risk, horizons[::-1]), ref[::-1], atol=1e-10)


def test_time_dependent_auc_with_train_censoring_matches_sksurv():
    time, event, risk = _survival_data(5, n=300)
    tr_t, tr_e, _ = _survival_data(6, n=400)
    tr_t = np.r_[tr_t, time.max() + 10]  # train follow-up covers the test times
    tr_e = np.r_[tr_e, 0]
    ytr = Surv.from_arrays(tr_e.astype(bool), tr_t)
    yte = Surv.from_arrays(event.astype(bool), time)
    horizons = [200.0, 600.0, 1200.0]
    ref, _ = cumulative_dynamic_auc(ytr, yte, risk, horizons)
    ours = M.time_dependent_auc(time, event, risk, horizons, time_train=tr_t, event_train=tr_e)
    np.testing.assert_allclose(ours, ref, atol=1e-10)


@pytest.mark.parametrize("kw", DATASETS)
def test_uno_cindex_matches_sksurv(kw):
    time, event, risk = _survival_data(**kw)
    y = Surv.from_arrays(event.astype(bool), time)
    tau = float(np.quantile(time, 0.8))
    assert M.uno_cindex(time, event, risk, tau=tau) == pytest.approx(
        concordance_index_ipcw(y, y, risk, tau=tau)[0], abs=1e-10)
    try:
        ref = concordance_index_ipcw(y, y, risk)[0]
    except ValueError:  # sksurv: censoring survival 0 at an event time -> we must refuse too
        with pytest.raises(M.MetricUndefinedError):
            M.uno_cindex(time, event, risk)
    else:
        assert M.uno_cindex(time, event, risk) == pytest.approx(ref, abs=1e-10)


def test_uno_cindex_with_train_data_matches_sksurv():
    time, event, risk = _survival_data(7, n=200)
    tr_t, tr_e, _ = _survival_data(8, n=500)
    tr_t, tr_e = np.r_[tr_t, time.max() + 1], np.r_[tr_e, 0]
    ytr = Surv.from_arrays(tr_e.astype(bool), tr_t)
    yte = Surv.from_arrays(event.astype(bool), time)
    ref = concordance_index_ipcw(ytr, yte, risk, tau=1500.0)[0]
    assert M.uno_cindex(time, event, risk, tau=1500.0, time_train=tr_t, event_train=tr_e) == pytest.approx(ref, abs=1e-10)


def test_censoring_survival_matches_sksurv():
    time, event, _ = _survival_data(9, n=150)
    est = CensoringDistributionEstimator().fit(Surv.from_arrays(event.astype(bool), time))
    q = np.r_[0.0, np.unique(time), np.unique(time)[:-1] + 0.5]
    q = q[q <= time.max()]
    np.testing.assert_allclose(M.censoring_survival(time, event)(q), est.predict_proba(q), atol=1e-12)


def test_harrell_cindex_is_lifelines_with_risk_orientation():
    time, event, risk = _survival_data(0)
    assert M.harrell_cindex(time, event, risk) == pytest.approx(concordance_index(time, -risk, event))
    assert M.harrell_cindex([1, 2, 3], [1, 1, 1], [3, 2, 1]) == 1.0  # higher risk dies first
    assert M.harrell_cindex([1, 2, 3], [1, 1, 1], [1, 2, 3]) == 0.0
    assert M.harrell_cindex([1, 2, 3], [1, 1, 1], [5, 5, 5]) == 0.5


def test_site_cindices_within_pooled_and_per_site():
    a, b = _survival_data(0), _survival_data(1)
    b = (b[0], b[1], b[2] + 5.0)  # site b on another risk scale: pooled differs from within-site
    censored_only = (np.array([1.0, 2.0]), np.array([0, 0]), np.array([0.1, 0.2]))
    out = M.site_cindices({"a": a, "b": b, "c": censored_only, "empty": (np.zeros(0), np.zeros(0), np.zeros(0))})
    assert set(out["per_site"]) == {"a", "b", "c"}
    assert out["per_site"]["a"] == pytest.approx(M.harrell_cindex(*a))
    assert out["per_site"]["c"] is None  # no comparable pair: None, never NaN
    t, e, r = (np.concatenate([a[k], b[k], censored_only[k]]) for k in range(3))
    strata = np.repeat([0, 1, 2], [len(a[0]), len(b[0]), 2])
    assert out["cindex"] == pytest.approx(M.stratified_cindex(t, e, r, strata))
    assert out["cindex_pooled"] == pytest.approx(M.harrell_cindex(t, e, r))
    assert out["cindex"] != pytest.approx(out["cindex_pooled"])
    assert M.site_cindices({"c": censored_only}) == {"cindex": None, "cindex_pooled": None, "per_site": {"c": None}}


def test_binary_auc_is_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = y + rng.normal(size=200)
    assert M.binary_auc(y, s) == pytest.approx(roc_auc_score(y, s))


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: M.harrell_cindex([1, 2, np.nan], [1, 0, 1], [0.1, 0.2, 0.3]), "time"),
        (lambda: M.harrell_cindex([1, 2, 3], [1, 0, 1], [0.1, np.inf, np.nan]), "risk"),
        (lambda: M.binary_auc([0, 1, 1], [0.1, np.nan, 0.3]), "score"),
        (lambda: M.time_dependent_auc([1, 2, 3], [1, 0, 1], [0.1, 0.2, 0.3], [np.nan]), "horizons"),
        (lambda: M.uno_cindex([1, 2, 3], [1, np.nan, 1], [0.1, 0.2, 0.3]), "event"),
        (lambda: M.logrank_test([1, 2, 3, 4], [1, 0, 1, 1], [0.0, 1.0, np.nan, 1.0]), "groups"),
    ],
)
def test_nan_inputs_raise_value_error_naming_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name} contains \d+ NaN/Inf") as err:
        call()
    assert not isinstance(err.value, M.MetricUndefinedError)


def test_nan_message_counts_bad_values():
    with pytest.raises(ValueError, match="risk contains 2 NaN/Inf value\\(s\\) out of 4"):
        M.harrell_cindex([1, 2, 3, 4], [1, 1, 1, 1], [np.nan, 1, np.inf, 2])


def test_bad_shapes_and_values_raise():
    with pytest.raises(ValueError, match="same length"):
        M.harrell_cindex([1, 2, 3], [1, 0, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="event must contain only 0/1"):
        M.harrell_cindex([1, 2, 3], [1, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="time must be >= 0"):
        M.harrell_cindex([-1, 2, 3], [1, 0, 1], [0.1, 0.2, 0.3])


def test_undefined_metrics_raise_metric_undefined():
    with pytest.raises(M.MetricUndefinedError, match="only one class"):
        M.binary_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(M.MetricUndefinedError, match="no comparable pair"):
        M.harrell_cindex([1, 2, 3], [0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(M.MetricUndefinedError, match="outside the follow-up"):
        M.time_dependent_auc([10, 20, 30], [1, 0, 1], [0.1, 0.2, 0.3], [30.0])
    with pytest.raises(M.MetricUndefinedError, match="case"):
        M.time_dependent_auc([10, 20, 30], [0, 1, 1], [0.1, 0.2, 0.3], [15.0])
    with pytest.raises(M.MetricUndefinedError):
        M.uno_cindex([1, 2, 3], [0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(M.MetricUndefinedError, match="group 1"):
        M.hazard_ratio([1, 2, 3, 4], [1, 1, 0, 0], [0, 0, 1, 1])
    with pytest.raises(M.MetricUndefinedError, match="group"):
        M.logrank_test([1, 2, 3], [1, 1, 0], [0, 0, 0])
    assert issubclass(M.MetricUndefinedError, ValueError)


def test_a_separated_hazard_ratio_is_undefined_not_infinite():
    # every high-risk death (100-500 days) precedes the low-risk group's only death (2000 days)
    time = np.r_[np.linspace(100, 500, 10), 2000.0, np.full(9, 2500.0)]
    event = np.r_[np.ones(10), 1, np.zeros(9)]
    group = np.r_[np.ones(10), np.zeros(10)].astype(int)
    with pytest.warns(Warning), pytest.raises(M.MetricUndefinedError, match="no finite maximum"):
        M.hazard_ratio(time, event, group)


def test_kaplan_meier_logrank_hazard_ratio_match_lifelines():
    time, event, risk = _survival_data(4, n=300)
    group = (risk > np.median(risk)).astype(int)
    km = M.kaplan_meier(time, event)
    ref = KaplanMeierFitter().fit(time, event)
    np.testing.assert_allclose(km.survival_function_.values, ref.survival_function_.values)
    p = M.logrank_test(time, event, group)
    assert p == pytest.approx(ll_logrank(time[group == 0], time[group == 1], event[group == 0], event[group == 1]).p_value, rel=1e-9)
    hr, lo, hi = M.hazard_ratio(time, event, group)
    cph = CoxPHFitter().fit(pd.DataFrame({"T": time, "E": event, "g": group}), "T", "E",
                            fit_options={"precision": 1e-12})
    assert hr == pytest.approx(float(np.exp(cph.params_["g"])), rel=1e-9)
    ci = np.exp(cph.confidence_intervals_.loc["g"].to_numpy())
    assert (lo, hi) == pytest.approx(tuple(ci), rel=1e-9)
    assert lo < hr < hi and hr > 1  # high-risk group dies sooner in this simulation
