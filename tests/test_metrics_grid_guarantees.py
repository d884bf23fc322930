"""Guarantees of the exact metrics (shared_model.metrics) and of pass 1 of the pooled evaluation
(shared_model.pooled_eval: moments, grid, binning) that the other tests left open.

Each test was written against a hand-made mutant of the code that the existing tests let through
(a flipped comparison, a dropped check, a swapped side of a search...). Values are checked against
lifelines / scikit-survival on the same data, against brute-force pair counts, or against small
cases worked out by hand.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter, KaplanMeierFitter
from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc
from sksurv.nonparametric import CensoringDistributionEstimator
from sksurv.util import Surv

from shared_model import metrics as M
from shared_model import pooled_eval as P


def _tied_data(seed: int, n: int):
    """Integer days coarsened to 10-day steps (many tied times, tied event/censored pairs) and
    risks rounded to one decimal (tied risks)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    t_ev = rng.exponential(600 * np.exp(-0.7 * x))
    t_c = rng.uniform(0, 2000, n)
    time = 10.0 * np.ceil(np.minimum(t_ev, t_c) / 10)
    event = (t_ev <= t_c).astype(int)
    risk = np.round(x + rng.normal(scale=0.8, size=n), 1)
    return time, event, risk


def _brute_pairs(t, e, r):
    """(concordant + 0.5 tied, comparable) over Harrell's comparable pairs, by the definition:
    i has an event and t_j > t_i, or t_j == t_i with j censored."""
    num = den = 0.0
    for i in range(t.size):
        if not e[i]:
            continue
        for j in range(t.size):
            if j != i and (t[j] > t[i] or (t[j] == t[i] and e[j] == 0)):
                den += 1
                num += 1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0
    return num, den


# =============================================================================================
# metrics: validation
# =============================================================================================
def test_check_finite_flattens_vectors_refuses_matrices_and_honours_dtype():
    col = M.check_finite("risk", np.array([[0.5], [1.5], [2.5]]))  # a model's [N, 1] output
    assert col.shape == (3,) and col.tolist() == [0.5, 1.5, 2.5]
    assert M.check_finite("risk", [[0.5, 1.5]]).shape == (2,)
    with pytest.raises(ValueError, match=r"risk must be 1-dimensional .* shape \(2, 3\)"):
        M.check_finite("risk", np.ones((2, 3)))
    assert M.check_finite("x", [1, 2], dtype=np.float32).dtype == np.float32
    t, e, r = _tied_data(0, 40)
    assert M.harrell_cindex(t, e, r[:, None]) == M.harrell_cindex(t, e, r)


def test_survival_inputs_are_checked_for_binary_events_and_equal_lengths():
    with pytest.raises(ValueError, match=r"event must contain only 0/1, found 1 other"):
        M.harrell_cindex([1, 2, 3], [1, 0.5, 1], [0.1, 0.2, 0.3])
    for call in (M.harrell_cindex, M.uno_cindex):  # only event is short
        with pytest.raises(ValueError, match="same length"):
            call([1, 2, 3], [1, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="same length"):
        M.comparable_pairs([1, 2, 3], [1, 0])
    with pytest.raises(M.MetricUndefinedError, match="no patients"):
        M.harrell_cindex([], [], [])


# =============================================================================================
# metrics: Harrell / stratified pair counts
# =============================================================================================
def test_comparable_pairs_is_the_brute_force_count_with_ties():
    # by hand: (0 -> 1 tied censored), (0 -> 2), (0 -> 3); the tied events 2, 3 are not comparable
    assert M.comparable_pairs([1, 1, 2, 2], [1, 0, 1, 1]) == 3
    for seed in (1, 2):
        t, e, r = _tied_data(seed, 80)
        assert M.comparable_pairs(t, e) == _brute_pairs(t, e, r)[1]


def test_stratified_cindex_is_pooled_within_stratum_pairs_by_brute_force():
    parts = [_tied_data(3, 90), _tied_data(4, 15), _tied_data(5, 40)]
    parts[1] = (parts[1][0], parts[1][1], -parts[1][2])  # a badly discordant small stratum
    num = den = 0.0
    for t, e, r in parts:
        a, b = _brute_pairs(t, e, r)
        num, den = num + a, den + b
    t, e, r = (np.concatenate([p[k] for p in parts]) for k in range(3))
    strata = np.repeat(["a", "b", "c"], [len(p[0]) for p in parts])
    assert M.stratified_cindex(t, e, r, strata) == pytest.approx(num / den, abs=1e-12)


# =============================================================================================
# metrics: censoring KM and IPCW metrics (scikit-survival)
# =============================================================================================
def test_censoring_survival_is_zero_beyond_a_last_censored_time_like_sksurv():
    t, e = np.array([1.0, 2.0, 3.0]), np.array([1, 0, 0])
    est = CensoringDistributionEstimator().fit(Surv.from_arrays(e.astype(bool), t))
    q = np.array([0.5, 1.0, 2.0, 3.0, 5.0])
    np.testing.assert_allclose(M.censoring_survival(t, e)(q), est.predict_proba(q), atol=1e-15)
    np.testing.assert_allclose(M.censoring_survival(t, e)(q), [1, 1, 0.5, 0, 0])


def test_ipcw_metrics_refuse_a_zero_censoring_survival_and_empty_train_data():
    tr_t, tr_e = [1.0, 2.0, 3.0], [1, 0, 0]  # G(3) = 0
    y_tr = Surv.from_arrays(np.array(tr_e, bool), np.array(tr_t))
    t, e, r = np.array([1.0, 2.5, 3.0, 4.0]), np.array([1, 1, 1, 0]), np.array([0.9, 0.5, 0.4, 0.1])
    with pytest.raises(ValueError):  # scikit-survival refuses too
        concordance_index_ipcw(y_tr, Surv.from_arrays(e.astype(bool), t), r)
    with pytest.raises(M.MetricUndefinedError, match=r"G\(t\) is 0 at 1 event time"):
        M.uno_cindex(t, e, r, time_train=tr_t, event_train=tr_e)
    with pytest.raises(M.MetricUndefinedError, match=r"G\(t\) is 0"):
        M.time_dependent_auc(t, e, r, [3.0], time_train=tr_t, event_train=tr_e)
    with pytest.raises(ValueError, match="time_train is empty"):
        M.uno_cindex(t, e, r, time_train=[], event_train=[])


def test_uno_cindex_excludes_events_at_tau_like_sksurv():
    t, e, r = _tied_data(6, 150)
    y = Surv.from_arrays(e.astype(bool), t)
    tau = float(np.sort(t[e == 1])[len(t[e == 1]) // 2])  # exactly an (often tied) event time
    assert np.count_nonzero((t == tau) & (e == 1)) >= 1
    assert M.uno_cindex(t, e, r, tau=tau) == pytest.approx(concordance_index_ipcw(y, y, r, tau=tau)[0], abs=1e-12)


def test_uno_cindex_over_several_chunks_matches_sksurv():
    """N = 2600: the pair matrix is built in chunks of 2**22 // N = 1613 event rows."""
    rng = np.random.default_rng(0)
    n = 2600
    x = rng.normal(size=n)
    t = np.floor(rng.exponential(500 * np.exp(-0.5 * x))) + 1
    e = (rng.uniform(size=n) < 0.9).astype(int)
    r = x + rng.normal(size=n)
    tau = float(np.quantile(t, 0.9))
    assert np.count_nonzero((t < tau) & (e == 1)) > 2**22 // n  # more than one chunk
    y = Surv.from_arrays(e.astype(bool), t)
    assert M.uno_cindex(t, e, r, tau=tau) == pytest.approx(concordance_index_ipcw(y, y, r, tau=tau)[0], abs=1e-12)


def test_uno_cindex_refuses_bad_tau_and_a_set_without_comparable_pair():
    for tau in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tau must be finite"):
            M.uno_cindex([1, 2, 3], [1, 0, 1], [0.3, 0.2, 0.1], tau=tau)
    with pytest.raises(M.MetricUndefinedError, match="no comparable pair"):
        M.uno_cindex([5, 5], [1, 1], [0.1, 0.2])  # tied events only


def test_time_dependent_auc_at_the_first_follow_up_time_like_sksurv():
    t = np.array([10.0, 20, 30, 40, 50, 60])
    e = np.array([1, 0, 1, 1, 0, 1])
    r = np.array([0.9, 0.1, 0.5, 0.7, 0.2, 0.3])
    y = Surv.from_arrays(e.astype(bool), t)
    ref, _ = cumulative_dynamic_auc(y, y, r, [10.0, 35.0])
    np.testing.assert_allclose(M.time_dependent_auc(t, e, r, [10.0, 35.0]), ref, atol=1e-12)
    np.testing.assert_allclose(ref, [1.0, 22 / 27], atol=1e-12)  # hand: case 10 beats all 5 controls
    with pytest.raises(M.MetricUndefinedError, match="no patients"):
        M.time_dependent_auc([], [], [], [1.0])


# =============================================================================================
# metrics: KM, log-rank, hazard ratio (lifelines)
# =============================================================================================
def test_kaplan_meier_uses_alpha_and_label():
    t, e, _ = _tied_data(7, 120)
    km = M.kaplan_meier(t, e, label="high risk", alpha=0.2)
    ref = KaplanMeierFitter(alpha=0.2).fit(t, e, label="high risk")
    assert list(km.survival_function_.columns) == ["high risk"]
    np.testing.assert_allclose(km.confidence_interval_.to_numpy(), ref.confidence_interval_.to_numpy(), atol=1e-12)
    assert not np.allclose(ref.confidence_interval_.to_numpy(),
                           KaplanMeierFitter().fit(t, e).confidence_interval_.to_numpy())


def test_logrank_refuses_wrong_length_groups_and_no_events():
    with pytest.raises(ValueError, match=r"groups must be 1-D with one entry per patient \(4\)"):
        M.logrank_test([1, 2, 3, 4], [1, 0, 1, 1], [0, 1, 0])
    with pytest.raises(M.MetricUndefinedError, match="no events"):
        M.logrank_test([1, 2, 3, 4], [0, 0, 0, 0], [0, 1, 0, 1])


def test_ratio_with_interval_values_and_degenerate_cases():
    hr, lo, hi = M.ratio_with_interval(0.5, 0.1, 2.0)
    assert (hr, lo, hi) == pytest.approx((math.exp(0.5), math.exp(0.3), math.exp(0.7)), rel=1e-15)
    assert M.ratio_with_interval(-800.0, 1.0, 1.96) is None  # exp underflows to 0: not a ratio
    assert M.ratio_with_interval(800.0, 1.0, 1.96) is None  # overflow
    assert M.ratio_with_interval(0.1, float("nan"), 1.96) is None
    assert M.ratio_with_interval(0.1, float("inf"), 1.96) is None


def test_hazard_ratio_refuses_non_binary_or_empty_groups():
    with pytest.raises(ValueError, match="group must contain only 0/1"):
        M.hazard_ratio([1, 2, 3, 4, 5, 6], [1, 1, 1, 1, 0, 1], [0, 1, 2, 0, 1, 2])
    with pytest.raises(M.MetricUndefinedError, match="group 0 has 0 patient"):
        M.hazard_ratio([1, 2, 3, 4], [1, 1, 0, 1], [1, 1, 1, 1])


def test_hazard_ratio_is_the_tightly_converged_cox_fit():
    """On these data lifelines' default tolerance stops ~6e-5 (relative) away from the maximum."""
    rng = np.random.default_rng(28)
    n = int(rng.integers(20, 200))
    g = rng.integers(0, 2, n)
    t = np.floor(rng.exponential(500 * np.exp(-g * rng.uniform(0, 2)), n)) + 1
    e = (rng.uniform(size=n) < 0.6).astype(int)
    df = pd.DataFrame({"T": t, "E": e, "g": g})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cph = CoxPHFitter().fit(df, "T", "E", fit_options={"precision": 1e-12})
    ref = (math.exp(cph.params_["g"]), *np.exp(cph.confidence_intervals_.loc["g"].to_numpy()))
    assert M.hazard_ratio(t, e, g) == pytest.approx(ref, rel=1e-9)


# =============================================================================================
# pooled_eval pass 1: moments and normal-quantile edges
# =============================================================================================
@pytest.mark.parametrize("bad", [[5.0], [1.0, 2.0], [-1.0, 0.0, 0.0], [1.0, 0.0, -1.0], [1.5, 0.0, 1.0]])
def test_sum_moments_refuses_a_malformed_site_vector(bad):
    with pytest.raises(ValueError, match=r"moments\[1\] must be \[n >= 0 \(integer\)"):
        P.sum_moments([[2.0, 1.0, 1.0], bad])


def test_normal_quantile_edges_refuses_one_bin_and_collapsed_edges():
    with pytest.raises(ValueError, match="need at least 2 bins, got 1"):
        P.normal_quantile_edges([3.0, 0.0, 3.0], 1)
    with pytest.raises(ValueError, match="collapse"):  # mean 1e20, std ~1: edges equal in float64
        P.normal_quantile_edges([2.0, 2e20, 2e40], 8)


# =============================================================================================
# pooled_eval: EvalGrid
# =============================================================================================
RE = np.array([-1.0, 0.0, 1.0])


@pytest.mark.parametrize("kw, msg", [
    (dict(time_edges=[1.0, 2.0, 3.0], risk_edges=RE), "time_edges must start at 0"),
    (dict(time_edges=[0.0, 2.0, 2.0], risk_edges=RE), "time_edges must start at 0"),
    (dict(time_edges=[0.0], risk_edges=RE), "time_edges must start at 0"),
    (dict(time_edges=[0.0, 1.0], risk_edges=[]), "risk_edges must be at least one"),
    (dict(time_edges=[0.0, 1.0], risk_edges=[0.0, 0.0]), "risk_edges must be at least one"),
    (dict(time_edges=[0.0, 1.0], risk_edges=RE, status_edges=[1.0, 0.0]), "status_edges must be"),
    (dict(time_edges=[0.0, 1.0, 2.0], risk_edges=RE, horizons_days=(1.0, 2.0), requested_horizons_days=(1.0,)),
     "same length"),
    (dict(time_edges=[0.0, 1.0, 2.0], risk_edges=RE, horizons_days=(0.0,)), "not a time edge"),
])
def test_eval_grid_refuses_bad_edges_and_horizons(kw, msg):
    with pytest.raises(ValueError, match=msg):
        P.EvalGrid(**{k: (np.asarray(v, float) if k.endswith("edges") else v) for k, v in kw.items()})


def test_eval_grid_horizons_default_and_edges_are_private_and_frozen():
    te = np.linspace(0.0, 100.0, 11)
    g = P.EvalGrid(te, RE.copy(), horizons_days=(30.0,))
    assert g.requested_horizons_days == (30.0,) == g.horizons_days
    te[1] = 5.0  # the caller's array stays the caller's
    assert g.time_edges[1] == 10.0
    with pytest.raises(ValueError, match="read-only"):
        g.time_edges[1] = 5.0


def test_fingerprint_separates_edge_arrays_and_covers_status_edges():
    a = P.EvalGrid(np.array([0.0, 1.0, 2.0]), np.array([3.0]))
    b = P.EvalGrid(np.array([0.0, 1.0]), np.array([2.0, 3.0]))  # same bytes end to end
    assert a.fingerprint != b.fingerprint
    s1 = P.EvalGrid(np.array([0.0, 1.0]), RE, np.array([0.0, 1.0]))
    s2 = P.EvalGrid(np.array([0.0, 1.0]), RE, np.array([0.0, 2.0]))
    assert len({s1.fingerprint, s2.fingerprint, P.EvalGrid(np.array([0.0, 1.0]), RE).fingerprint}) == 3
    rec = s1.to_record()
    rec["eval-status-edges"] = [0.0, 1.5]
    with pytest.raises(ValueError, match="inconsistent"):
        P.EvalGrid.from_record(rec)


def test_score_bins_are_left_closed_at_every_edge():
    g = P.make_grid([10.0, 0.0, 10.0], [10.0, 5.0, 10.0], n_risk_bins=8, n_status_bins=4, horizon_days=100,
                    n_time_bins=10, horizons_days=[50])
    np.testing.assert_array_equal(g.risk_bin(g.risk_edges), np.arange(1, 8))  # [q_{b-1}, q_b)
    np.testing.assert_array_equal(g.risk_bin(np.nextafter(g.risk_edges, -np.inf)), np.arange(0, 7))
    np.testing.assert_array_equal(g.status_bin(g.status_edges), np.arange(1, 4))
    assert (g.n_risk_bins, g.n_status_bins, g.status_shape) == (8, 4, (4, 2))


def test_snap_nearest_edge_and_its_range():
    g = P.make_grid([3.0, 0.0, 3.0], n_time_bins=128, horizon_days=4000, horizons_days=[390, 4000])
    assert g.horizons_days == (375.0, 4000.0)  # 390 is nearer 375 than 406.25
    assert g.snap(400.0) == (406.25, 13) and g.snap(4000.0) == (4000.0, 128)
    for bad in (0.0, -1.0, 4000.5):
        with pytest.raises(ValueError, match="outside the grid"):
            g.snap(bad)


# =============================================================================================
# pooled_eval: make_grid, grid_problem, binned_times
# =============================================================================================
def test_make_grid_arguments():
    m = [3.0, 0.0, 3.0]
    with pytest.raises(ValueError, match="n_time_bins must be >= 1, got 0"):
        P.make_grid(m, n_time_bins=0)
    with pytest.raises(ValueError, match="horizon_days must be a positive number"):
        P.make_grid(m, horizon_days=-100.0)
    with pytest.raises(ValueError, match="outside"):
        P.make_grid(m, horizon_days=1000, horizons_days=[0.0])
    g = P.make_grid(m, [4.0, 0.0, 4.0], n_risk_bins=16, n_status_bins=6, horizon_days=1000, horizons_days=[1000])
    assert g.horizons_days == (1000.0,) and (g.n_risk_bins, g.n_status_bins) == (16, 6)


def test_grid_problem_limits_are_inclusive_and_cover_status_bins():
    g = P.make_grid([3.0, 0.0, 3.0], [3.0, 0.0, 3.0], n_time_bins=100, horizon_days=1000,
                    n_risk_bins=32, n_status_bins=64, horizons_days=[500])
    exact = dict(min_time_bin_days=10.0, max_time_bins=100, max_score_bins=64)  # every limit met exactly
    assert P.grid_problem(g, **exact) is None
    assert "64 status bins, above this site's maximum of 63" in P.grid_problem(g, **{**exact, "max_score_bins": 63})
    assert "32 risk bins, above this site's maximum of 31" in P.grid_problem(g, **{**exact, "max_score_bins": 31})
    uneven = P.EvalGrid(np.array([0.0, 1.0, 500.0, 1000.0]), RE)
    assert "narrowest time bin is 1 days" in P.grid_problem(uneven, min_time_bin_days=7.0, max_time_bins=10,
                                                              max_score_bins=10)


def test_binned_times_refuses_nan():
    g = P.make_grid([3.0, 0.0, 3.0], n_time_bins=10, horizon_days=1000, horizons_days=[500])
    with pytest.raises(ValueError, match="time contains 1 NaN"):
        P.binned_times([1.0, np.nan], g)


# =============================================================================================
# defects found by this review (left unfixed; the tests state the documented behaviour)
# =============================================================================================
def test_stratified_cindex_refuses_nan_strata():
    """A NaN stratum label used to drop its patients silently (here: 1.0 from stratum 0 alone)."""
    t = np.array([1.0, 2, 3, 4, 5, 6])
    e = np.array([1, 1, 0, 1, 1, 0])
    r = np.array([0.9, 0.5, 0.1, 0.8, 0.2, 0.3])
    with pytest.raises(ValueError, match="strata"):
        M.stratified_cindex(t, e, r, [0, 0, 0, np.nan, np.nan, np.nan])  # today: 1.0, stratum 0 alone


def test_stratified_cindex_refuses_strata_of_the_wrong_length():
    """It used to raise numpy's IndexError instead of a ValueError naming the argument."""
    with pytest.raises(ValueError, match="same length|strata"):
        M.stratified_cindex([1, 2, 3], [1, 1, 0], [0.1, 0.2, 0.3], [0, 1])
