"""Guarantees of the server side of shared_model.pooled_eval (counts -> pooled metrics), from a
mutation-testing review: each test kills at least one hand-made mutant that the other tests let
through (named in the docstrings).

Most tests use an **exact grid**: one-day time bins on integer days and risk/status edges at the
midpoints of distinct scores, so that no two patients share a time bin or a score bin. The pooled
metrics must then equal the exact ones (lifelines / shared_model.metrics on the same patients) to
rounding, not merely within the 0.002 tolerance of the default grid. The rest are small cases
computed by hand.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import multivariate_logrank_test
from lifelines.utils import concordance_index

from shared_model import metrics as M
from shared_model import pooled_eval as P

HORIZON = 100.0
HORIZONS = (30.0, 60.0)


def _midpoints(values) -> np.ndarray:
    u = np.unique(np.asarray(values, dtype=np.float64))
    return (u[1:] + u[:-1]) / 2


def exact_grid(risk, score=None, horizons=HORIZONS) -> P.EvalGrid:
    """One-day time bins on [0, 100] (+ overflow); one risk (status) bin per distinct score."""
    return P.EvalGrid(np.arange(0.0, HORIZON + 1.0), _midpoints(risk),
                      None if score is None else _midpoints(score), requested_horizons_days=horizons)


@lru_cache(maxsize=None)
def _patients():
    """40 patients at distinct integer days in 1..99 (none at 30 or 60, the horizons / tau) plus
    one event beyond the 100-day horizon (the overflow bin); the latest patient inside the horizon
    has an event. Distinct risks (higher = earlier death, with noise), 30 status labels with
    distinct scores."""
    rng = np.random.default_rng(7)
    days = np.setdiff1d(np.arange(1, 100), [30, 60])
    t = np.sort(rng.choice(days, 40, replace=False)).astype(np.float64)
    e = (rng.uniform(size=40) < 0.65).astype(np.int64)
    e[-1] = 1
    t, e = np.r_[t, 150.0], np.r_[e, 1]
    r = -np.log(t) + rng.normal(scale=0.6, size=t.size)
    label = np.full(t.size, -1)
    lab_ix = rng.choice(t.size, 30, replace=False)
    label[lab_ix] = (r[lab_ix] + rng.normal(scale=0.7, size=30) > np.median(r)).astype(int)
    score = r + rng.normal(scale=0.8, size=t.size)
    return t, e, r, label, score


def _exact_case(**kw):
    t, e, r, label, score = _patients()
    grid = exact_grid(r, score[label >= 0])
    st = P.site_statistics(grid, t, e, r, label, score)
    st = P.SiteStatistics.from_arrays(st.to_arrays(), grid)
    return grid, st, P.pooled_metrics(st, grid, **kw)


# ---------------------------------------------------------------------------------------------
# discrimination: equal to the exact metrics on an exact grid
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("same_time_bin", ["half", "exclude"])
def test_exact_grid_harrell_uno_td_auc_and_status_auc_equal_the_exact_metrics(same_time_bin):
    """No shared bins: every pooled number equals the exact one. Kills, among others, an event in
    the overflow bin indexing past the counts (``rows + 1 <= T1``), the Uno default tau taken at
    the smallest horizon instead of the largest, tau reported one edge early, td-AUC without IPCW
    case weights, the status AUC's positives counted from the negative column, and n_controls
    miscounted at the horizon edge."""
    t, e, r, label, score = _patients()
    grid, st, pm = _exact_case(same_time_bin=same_time_bin)
    assert pm.n == t.size and pm.n_events == e.sum()
    assert pm.cindex_harrell == pytest.approx(concordance_index(t, -r, e), abs=1e-12)
    assert pm.cindex_harrell_bounds == pytest.approx([pm.cindex_harrell] * 2, abs=1e-12)
    # Uno: default tau = the largest td-AUC horizon (60 days: no event exactly there)
    assert pm.uno_tau_days == 60.0
    assert pm.cindex_uno == pytest.approx(M.uno_cindex(t, e, r, tau=60.0), abs=1e-12)
    # td-AUC at 30 and 60 days, with the case/control counts of those horizons
    exact_td = M.time_dependent_auc(t, e, r, list(HORIZONS))
    for row, h, x in zip(pm.td_auc_detail, HORIZONS, exact_td):
        assert row["horizon_days"] == h and row["auc"] == pytest.approx(x, abs=1e-12)
        assert row["n_cases"] == int(((t <= h) & (e == 1)).sum())
        assert row["n_controls"] == int((t > h).sum())
        assert pm.td_auc[f"{round(h)}d"] == row["auc"]
    # status AUC: distinct score bins, so no same-bin pair and no error bound
    lab = label >= 0
    assert pm.n_status_labelled == lab.sum() and pm.n_status_positive == (label == 1).sum()
    assert pm.auc_status == pytest.approx(M.binary_auc(label[lab], score[lab]), abs=1e-12)
    assert pm.auc_status_max_error == 0.0


def test_uno_without_truncation_counts_every_bin_and_equals_untruncated_uno():
    """``uno_tau_days=math.inf``: no truncation (reported as None), every bin including the
    overflow bin. Kills removing the inf branch (snap(inf) raises) and tau_k = T (overflow left
    out, reported as the horizon)."""
    t, e, r, _, _ = _patients()
    _, _, pm = _exact_case(uno_tau_days=math.inf)
    assert pm.uno_tau_days is None
    assert pm.cindex_uno == pytest.approx(M.uno_cindex(t, e, r), abs=1e-12)


def test_uno_counts_same_bin_pairs_of_the_overflow_bin_when_untruncated():
    """Hand case. A: day 10, event, risk 3; B: day 150 event, risk 2; C: day 200 censored, risk
    2.8 (B and C share the overflow bin). Censoring KM mid-bin in the overflow bin: 1 - 1/2 * 1/1
    = 1/2, so B's weight is 4. Pairs: A>B, A>C concordant (weight 1, 2 pairs); B-C same bin,
    comparable with probability 1/2 and discordant: num 2, den 2 + 4 * 1/2 -> C = 1/2. Truncated
    at the horizon B is no 'i' -> C = 1. Kills tau_k = T for ``math.inf``."""
    grid = P.EvalGrid(np.arange(0.0, 101.0, 10.0), np.array([2.4, 2.9]), requested_horizons_days=(50.0,))
    st = P.site_statistics(grid, [10.0, 150.0, 200.0], [1, 1, 0], [3.0, 2.0, 2.8])
    assert P.pooled_metrics(st, grid, uno_tau_days=math.inf).cindex_uno == pytest.approx(0.5, abs=1e-12)
    assert P.pooled_metrics(st, grid, uno_tau_days=100.0).cindex_uno == pytest.approx(1.0, abs=1e-12)



def test_ipcw_weight_of_a_last_bin_of_events_only_is_the_censoring_survival_before_it():
    """Ten-day bins. A: day 5 censored (risk 0); B: day 15 event (risk 0.5); C, D: day 25 events
    (risks 1, 3), the last patients. Censoring KM: 1 - 1/4 after bin 0, no censoring after, so
    every event has weight (4/3)^2 (in the last bin Y - d = 0: nothing to censor, G unchanged).
    B is discordant with C and D; C-D is a same-bin event pair (credit 1/2):
    C = (16/9 * 1/2) / (16/9 * 3) = 1/6. Kills ``where=denom > 0`` -> ``>= 0`` (0/0 = NaN in the
    last bin, whose weight then silently becomes 1 -> 9/82)."""
    grid = P.EvalGrid(np.arange(0.0, 101.0, 10.0), np.array([0.25, 0.75, 2.0]), requested_horizons_days=(50.0,))
    st = P.site_statistics(grid, [5.0, 15.0, 25.0, 25.0], [0, 1, 1, 1], [0.0, 0.5, 1.0, 3.0])
    pm = P.pooled_metrics(st, grid, uno_tau_days=math.inf)
    assert pm.cindex_uno == pytest.approx(1 / 6, abs=1e-12)

def _hand_harrell_case():
    """Ten-day bins, risk bins [<0.5, 0.5-1.5, >=1.5]. P1 day 5 event risk 1; P2 day 7 censored
    risk 0 (P1's time bin); P3 day 25 event risk 1; P4 day 45 censored risk 2; P5 day 65 censored
    risk 0. Across time bins: P1-P3 tied risk bin, P1-P4 and P3-P4 discordant, P1-P5 and P3-P5
    concordant -> comparable 5, concordant 2, tied 1; same time bin: P1-P2 (event-censored, P1
    higher risk)."""
    grid = P.EvalGrid(np.arange(0.0, 101.0, 10.0), np.array([0.5, 1.5]), requested_horizons_days=(50.0,))
    t = np.array([5.0, 7.0, 25.0, 45.0, 65.0])
    e = np.array([1, 0, 1, 0, 0])
    r = np.array([1.0, 0.0, 1.0, 2.0, 0.0])
    return grid, P.site_statistics(grid, t, e, r), (t, e, r)


def test_harrell_pairs_bounds_and_max_error_by_hand():
    """half: num = 2 + 1/2 + 1/2 * 1 = 3, den = 5 + 1/2 -> C = 6/11. Bounds: lo = (2.5 - 0.5) / (5 + 1)
    = 1/3, hi = (2.5 + 0.5 + 1) / 6 = 2/3; max_error = 6/11 - 1/3 = 7/33; the exact C (0.5833)
    lies inside. Kills the bounds' denominators / the ``+ pw`` term, max -> min in max_error, and
    same_time_bin pairs counting event-event pairs only."""
    grid, st, (t, e, r) = _hand_harrell_case()
    pm = P.pooled_metrics(st, grid)
    assert pm.cindex_harrell == pytest.approx(6 / 11, abs=1e-12)
    assert pm.cindex_harrell_pairs == {"comparable": 5.0, "concordant": 2.0, "tied_risk_bin": 1.0,
                                       "same_time_bin": 1.0}
    assert pm.cindex_harrell_bounds == pytest.approx([1 / 3, 2 / 3], abs=1e-12)
    assert pm.cindex_harrell_max_error == pytest.approx(7 / 33, abs=1e-12)
    lo, hi = pm.cindex_harrell_bounds
    assert lo <= concordance_index(t, -r, e) <= hi
    excl = P.pooled_metrics(st, grid, same_time_bin="exclude")
    assert excl.cindex_harrell == pytest.approx(0.5, abs=1e-12)  # 2.5 / 5


def test_td_auc_cases_and_controls_split_at_the_horizon_edge():
    """Ten-day bins, horizon 50: the cases are the events of bins (0, 50], the controls every
    patient after 50 days, so an event at day 55 is a control. Kills the cases counted through
    bin k (``d_time[:k + 1]``)."""
    grid, _, _ = _hand_harrell_case()
    st = P.site_statistics(grid, [45.0, 55.0, 65.0], [1, 1, 0], [2.0, 1.0, 0.0])
    (row,) = P.pooled_metrics(st, grid).td_auc_detail
    assert (row["horizon_days"], row["n_cases"], row["n_controls"]) == (50.0, 1, 2)
    assert row["auc"] == 1.0


def test_within_site_cindex_follows_same_time_bin_checks_the_grid_and_is_none_without_pairs():
    """within_site_cindex of one site equals its pooled Harrell C under either same_time_bin rule;
    a site with no comparable pair adds nothing, and only such sites give None; counts on another
    grid are refused. Kills the rule ignored (always 'half'), ``den > 0`` -> ``>= 0`` and the
    removed grid check."""
    grid, st, _ = _hand_harrell_case()
    for rule, expected in (("half", 6 / 11), ("exclude", 0.5)):
        assert P.within_site_cindex([st], grid, same_time_bin=rule) == pytest.approx(expected, abs=1e-12)
    censored = P.site_statistics(grid, [5.0, 50.0], [0, 0], [0.0, 2.0])
    assert P.within_site_cindex([censored], grid) is None
    assert P.within_site_cindex([st, censored], grid) == pytest.approx(6 / 11, abs=1e-12)
    other = P.EvalGrid(np.arange(0.0, 101.0, 20.0), np.array([0.5, 1.5]), requested_horizons_days=(40.0,))
    with pytest.raises(ValueError, match="stale or foreign grid"):
        P.within_site_cindex([P.site_statistics(other, [5.0], [1], [1.0])], grid)


def test_within_site_cindex_refuses_an_unknown_same_time_bin_rule():
    """It used to read any value other than 'half' as 'exclude' ('Half' gave 0.5 where 'half' gives 6/11)."""
    grid, st, _ = _hand_harrell_case()
    with pytest.raises(ValueError, match="same_time_bin"):
        P.within_site_cindex([st], grid, same_time_bin="Half")


def test_status_auc_and_its_error_bound_by_hand():
    """Status bins [<0.5, 0.5-1.5, >=1.5]; positives in bins 0, 1, 1, negatives in bins 1, 2:
    6 pairs, only the two same-bin pairs credit 1/2 -> AUC = 1/6; same-bin weight 2 -> bound
    1/2 * 2 / 6 = 1/6. Kills the 1/2 dropped from the bound and the same-bin weight taken as the
    number of positives."""
    grid = P.EvalGrid(np.arange(0.0, 101.0, 10.0), np.array([0.0]), np.array([0.5, 1.5]),
                      requested_horizons_days=(50.0,))
    st = P.site_statistics(grid, [10.0] * 5, [0] * 5, [0.0] * 5, [1, 1, 1, 0, 0], [0.0, 1.0, 1.0, 1.0, 2.0])
    pm = P.pooled_metrics(st, grid)
    assert pm.n_status_labelled == 5 and pm.n_status_positive == 3
    assert pm.auc_status == pytest.approx(1 / 6, abs=1e-12)
    assert pm.auc_status_max_error == pytest.approx(1 / 6, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# risk groups: KM, log-rank, hazard ratio, against lifelines on the same patients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [2, 3])
def test_exact_grid_km_logrank_hr_with_a_non_default_alpha_equal_lifelines(groups):
    """alpha = 0.1: KM bands and the hazard-ratio CI at 90 %. Group ranges are the split edges,
    counts include the patient beyond the horizon. Kills alpha not passed to the KM, the HR's z
    fixed at 95 %, a group's lower risk edge off by one, upper edges all None, n_patients /
    n_events_total counted within the horizon only."""
    t, e, r, _, _ = _patients()
    _, _, pm = _exact_case(groups=groups, alpha=0.1)
    edges = pm.risk_split_edges
    assert len(edges) == groups - 1 and len(pm.groups) == groups
    grp = np.searchsorted(np.asarray(edges), r, side="right")
    assert [g.risk_range for g in pm.groups] == list(zip([None, *edges], [*edges, None]))
    for k, g in enumerate(pm.groups):
        sel = grp == k
        assert g.n_patients == sel.sum() and g.n_events_total == e[sel].sum()
        assert g.n_beyond_horizon == int((t[sel] > HORIZON).sum())
        km = KaplanMeierFitter(alpha=0.1).fit(t[sel], e[sel])
        inside = np.unique(t[sel & (t <= HORIZON)])
        np.testing.assert_array_equal(g.times_days, inside)
        np.testing.assert_allclose(g.survival, km.survival_function_at_times(inside).to_numpy(), atol=1e-12)
        ci = km.confidence_interval_.reindex(inside)
        np.testing.assert_allclose(g.lower, ci.iloc[:, 0].to_numpy(), atol=1e-12)
        np.testing.assert_allclose(g.upper, ci.iloc[:, 1].to_numpy(), atol=1e-12)
        np.testing.assert_array_equal(g.n_at_risk, km.event_table.reindex(inside)["at_risk"].to_numpy())
        np.testing.assert_array_equal(g.n_censored, km.event_table.reindex(inside)["censored"].to_numpy())
    assert pm.logrank_df == groups - 1
    assert pm.logrank_p == pytest.approx(multivariate_logrank_test(t, grp, e).p_value, rel=1e-9)
    sel = (grp == 0) | (grp == groups - 1)
    df = pd.DataFrame({"T": t[sel], "E": e[sel], "g": (grp[sel] == groups - 1).astype(int)})
    cph = CoxPHFitter(alpha=0.1).fit(df, "T", "E", fit_options={"precision": 1e-12})
    ci = np.exp(cph.confidence_intervals_.loc["g"].to_numpy())
    assert (pm.hazard_ratio, pm.hazard_ratio_ci_low, pm.hazard_ratio_ci_high) == pytest.approx(
        (float(np.exp(cph.params_["g"])), *ci), rel=1e-6)
    assert pm.log_hr_se == pytest.approx(float(cph.standard_errors_["g"]), rel=1e-6)
    assert pm.scalars()["hazard_ratio"] == pm.hazard_ratio and pm.scalars()["logrank_p"] == pm.logrank_p


def test_km_band_is_zero_where_survival_reaches_zero():
    """A group whose last patient dies: S = 0 there and lifelines' band is [0, 0]. Kills the band
    of S = 0 set to 1."""
    grid = P.EvalGrid(np.arange(0.0, 101.0), np.array([0.0]), requested_horizons_days=(50.0,))
    t = np.array([10.0, 20.0, 30.0, 40.0, 15.0, 25.0, 35.0, 45.0])
    e = np.array([1, 1, 0, 1, 1, 0, 1, 0])
    r = np.array([-1.0] * 4 + [1.0] * 4)
    low = P.pooled_metrics(P.site_statistics(grid, t, e, r), grid).groups[0]
    km = KaplanMeierFitter().fit(t[:4], e[:4])
    assert low.survival[-1] == 0.0
    ci = km.confidence_interval_.reindex(low.times_days)
    np.testing.assert_allclose(low.lower, ci.iloc[:, 0].to_numpy(), atol=1e-12)
    np.testing.assert_allclose(low.upper, ci.iloc[:, 1].to_numpy(), atol=1e-12)
    assert low.lower[-1] == low.upper[-1] == 0.0


def test_km_median_is_none_when_survival_halves_only_beyond_the_horizon():
    """The curves stop at the horizon: a group whose survival stays above 1/2 up to it has no
    median, even if everyone beyond it died. Kills taking the median from the overflow bin."""
    grid = P.EvalGrid(np.arange(0.0, 101.0), np.array([0.0]), requested_horizons_days=(50.0,))
    t = np.array([10.0, 20.0, 150.0, 160.0, 5.0, 15.0, 25.0, 35.0])
    e = np.array([1, 0, 1, 1, 1, 1, 1, 1])
    r = np.array([-1.0] * 4 + [1.0] * 4)
    low, high = P.pooled_metrics(P.site_statistics(grid, t, e, r), grid).groups
    assert low.survival.tolist() == [0.75, 0.75] and low.median_survival_days is None
    assert high.median_survival_days == 15.0


def test_three_groups_never_leave_the_middle_group_empty():
    """Tertile split of risk-bin counts [10, 0, 1, 1]: the first edge takes the big bin (10); the
    second must add at least one patient (edge after bin 2, 11 below) even though 10 below is
    nearer to 2/3 of 12. Kills ``below > prev_count`` -> ``>=``."""
    grid = P.EvalGrid(np.arange(0.0, 101.0), np.array([0.5, 1.5, 2.5]), requested_horizons_days=(50.0,))
    r = np.r_[np.zeros(10), 2.0, 3.0]
    t = np.arange(1.0, 13.0)
    pm = P.pooled_metrics(P.site_statistics(grid, t, np.ones(12, int), r), grid, groups=3)
    assert [g.n_patients for g in pm.groups] == [10, 1, 1]
    assert pm.risk_split_edges == [0.5, 2.5]


def test_groups_must_be_two_or_three():
    """Kills the removed ``groups in (2, 3)`` check (groups=1 would report a hazard ratio of a
    group against itself)."""
    grid, st, _ = _hand_harrell_case()
    for groups in (1, 4):
        with pytest.raises(ValueError, match="groups must be 2"):
            P.pooled_metrics(st, grid, groups=groups)


def test_no_event_log_rank_reason():
    """Kills the removed ``no events`` shortcut (a misleading 'variance is zero' reason)."""
    grid, _, _ = _hand_harrell_case()
    st = P.site_statistics(grid, [5.0, 25.0, 45.0], [0, 0, 0], [0.0, 1.0, 2.0])
    pm = P.pooled_metrics(st, grid)
    assert pm.logrank_p is None and pm.undefined["logrank_p"] == "no events"


def test_km_group_survival_at_is_a_right_continuous_step_function():
    """S(t) just after each listed time, 1 before the first. Kills side='left' and ``idx > 0``."""
    g = _exact_case()[2].groups[0]
    ts = g.times_days
    np.testing.assert_array_equal(g.survival_at(ts), g.survival)
    np.testing.assert_array_equal(g.survival_at(ts[1:] - 0.5), g.survival[:-1])
    assert g.survival_at([0.0, ts[0] - 0.5]).tolist() == [1.0, 1.0]


# ---------------------------------------------------------------------------------------------
# counts: validation and transport
# ---------------------------------------------------------------------------------------------
def test_site_statistics_refuse_malformed_count_arrays():
    """Kills the removed / weakened checks of the last axis (2), dimensions, integer values and
    negative counts; integral floats are accepted as int64."""
    fp = "0" * 16
    for surv, status, msg in [
        (np.zeros((3, 4, 3), int), None, "shape"),
        (np.zeros((3, 4), int), None, "dimensions"),
        (np.full((3, 4, 2), 0.5), None, "integers"),
        (np.full((3, 4, 2), -1), None, ">= 0"),
        (np.zeros((3, 4, 2), int), np.zeros((5, 3), int), "shape"),
        (np.zeros((3, 4, 2), int), np.zeros((5, 1), int), "shape"),
    ]:
        with pytest.raises(ValueError, match=msg):
            P.SiteStatistics(surv, status, fp)
    ok = P.SiteStatistics(np.ones((3, 4, 2)), None, fp)
    assert ok.surv.dtype == np.int64 and ok.n_patients == 24


def test_check_grid_refuses_counts_of_the_wrong_shape_even_with_the_right_fingerprint():
    """Kills the removed surv-shape and status-shape checks of check_grid."""
    grid = exact_grid([0.0, 1.0], [0.0, 1.0])
    right = P.SiteStatistics(np.zeros(grid.surv_shape, int), np.zeros(grid.status_shape, int), grid.fingerprint)
    right.check_grid(grid)
    with pytest.raises(ValueError, match="surv counts have shape"):
        P.SiteStatistics(np.zeros((5, 2, 2), int), right.status, grid.fingerprint).check_grid(grid)
    with pytest.raises(ValueError, match="status counts have shape"):
        P.SiteStatistics(right.surv, None, grid.fingerprint).check_grid(grid)


def test_sparse_encoding_refuses_counts_beyond_int32():
    """A cell of 2**31 does not fit the int32 encoding (it would wrap to a negative count); the
    dense encoding carries it. Kills ``>= 2**31`` -> ``> 2**31`` and the removed check."""
    grid = exact_grid([0.0, 1.0])
    surv = np.zeros(grid.surv_shape, np.int64)
    surv[3, 1, 1] = 2**31
    st = P.SiteStatistics(surv, None, grid.fingerprint)
    with pytest.raises(ValueError, match="int32"):
        st.to_arrays()
    back = P.SiteStatistics.from_arrays(st.to_arrays(dense=True), grid)
    assert back.surv[3, 1, 1] == 2**31


def _good_arrays():
    t, e, r, label, score = _patients()
    grid = exact_grid(r, score[label >= 0])
    st = P.site_statistics(grid, t, e, r, label, score)
    return grid, st, st.to_arrays()


def test_from_arrays_refuses_what_the_existing_checks_do_not_reach():
    """Each reply differs from a good one in one way. Kills the removed checks of meta's dtype,
    meta's (T+1, R) and R_s, dense dtype and shape, integer sparse arrays, index range (== size,
    negative), duplicate cells and zero counts."""
    grid, st, good = _good_arrays()
    size = int(np.prod(grid.surv_shape))

    def bad(**changes):
        a = dict(good)
        a.update(changes)
        return a

    meta = good["meta"]
    idx, cnt = good["surv_index"], good["surv_count"]
    cases = [
        (bad(meta=meta.astype(np.float64)), "5 integers"),
        (bad(meta=meta + np.array([0, 1, 0, 0, 0])), "status bins, server grid"),
        (bad(meta=meta + np.array([0, 0, 1, 0, 0])), "status bins, server grid"),
        (bad(meta=meta + np.array([0, 0, 0, 1, 0])), "status bins, server grid"),
        (bad(surv=st.surv.astype(np.float64)), "dense 'surv' must be integer"),
        (bad(surv=st.surv[:-1]), "dense 'surv' must be integer"),
        (bad(surv_index=idx.astype(np.float64)), "must be integers"),
        (bad(surv_index=np.r_[idx[:-1], size].astype(np.int32)), "outside"),
        (bad(surv_index=np.r_[-1, idx[1:]].astype(np.int32)), "outside"),
        (bad(surv_index=np.r_[idx[0], idx[0], idx[2:]].astype(np.int32)), "strictly increasing"),
        (bad(surv_count=np.r_[0, cnt[1:]].astype(np.int32)), "positive"),
    ]
    for arrays, msg in cases:
        with pytest.raises(ValueError, match=msg):
            P.SiteStatistics.from_arrays(arrays, grid, source="hospital-x")
    np.testing.assert_array_equal(P.SiteStatistics.from_arrays(good, grid).surv, st.surv)


def test_status_arrays_on_a_grid_without_status_bins_are_refused():
    """Kills the removed check of status arrays sent for a grid without status bins."""
    t, e, r, _, _ = _patients()
    grid = exact_grid(r)
    arrays = P.site_statistics(grid, t, e, r).to_arrays()
    assert P.SiteStatistics.from_arrays(arrays, grid).status is None
    arrays = {**arrays, "status_index": np.array([0], np.int32), "status_count": np.array([1], np.int32)}
    with pytest.raises(ValueError, match="no status bins"):
        P.SiteStatistics.from_arrays(arrays, grid)


def test_site_statistics_need_both_status_label_and_score():
    """Kills the removed both-or-neither check (a label without scores was silently ignored)."""
    grid = exact_grid([0.0, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="give both"):
        P.site_statistics(grid, [1.0], [1], [0.5], [1], None)
    with pytest.raises(ValueError, match="give both"):
        P.site_statistics(grid, [1.0], [1], [0.5], None, [0.5])


def test_sum_statistics_refuses_sites_with_and_without_status_counts():
    """Kills the removed status check of sum_statistics."""
    grid = exact_grid([0.0, 1.0], [0.0, 1.0])
    with_status = P.site_statistics(grid, [1.0], [1], [0.5], [1], [0.5])
    without = P.SiteStatistics(with_status.surv, None, grid.fingerprint)
    for pair in ([with_status, without], [without, with_status]):
        with pytest.raises(ValueError, match="status counts do not match"):
            P.sum_statistics(pair)


# ---------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------
def test_scalars_and_json_safety_of_pooled_metrics():
    """scalars() carries the within-site C; to_dict refuses NaN at the top level and inside lists;
    KMGroup counts come back as integers. Kills the within-site C dropped from the scalar keys, the
    removed NaN checks (top level, lists) and counts decoded as floats."""
    pm = _exact_case()[2]
    pm.cindex_harrell_within_sites = 0.61
    sc = pm.scalars()
    assert sc["cindex_harrell_within_sites"] == 0.61 and sc["hazard_ratio"] == pm.hazard_ratio
    back = P.PooledMetrics.from_dict(json.loads(json.dumps(pm.to_dict(), allow_nan=False)))
    assert back.groups[0].n_at_risk.dtype == np.int64 and back.groups[0].n_events.dtype == np.int64
    assert json.dumps(back.to_dict()) == json.dumps(pm.to_dict())
    with pytest.raises(ValueError, match="non-finite"):
        P.PooledMetrics(n=1, n_events=0, n_status_labelled=0, n_status_positive=0, cindex_harrell=math.nan).to_dict()
    with pytest.raises(ValueError, match="non-finite"):
        P.PooledMetrics(n=1, n_events=0, n_status_labelled=0, n_status_positive=0,
                        cindex_harrell_bounds=[0.2, math.inf]).to_dict()


def test_mean_of_sites_weights_aliases_and_all_undefined_keys():
    """auc_status is weighted by the status-labelled patients (dict default: n_patients; a
    PooledMetrics: its n_status_labelled), the client names are synonyms, zero weights give
    None, a key undefined at every site is still listed. Kills the auc weight = n, the dict
    default 0, the PooledMetrics weight = n, dropped aliases, ``ws.sum() >= 0``, mean -> median
    and None values dropped from dict sites."""
    mos = P.mean_of_sites({
        "a": {"cindex": 0.5, "auc": 0.9, "n_test": 100, "n_status": 10, "td_auc_365d": None},
        "b": {"cindex_harrell": 0.6, "auc_status": 0.6, "num-examples": 100, "td_auc_365d": None},
        "c": {"cindex_harrell": 0.9, "n": 200},
    })
    assert mos["mean"]["cindex_harrell"] == pytest.approx(2 / 3)
    assert mos["weighted_mean"]["cindex_harrell"] == pytest.approx((50 + 60 + 180) / 400)
    assert mos["weighted_mean"]["auc_status"] == pytest.approx((0.9 * 10 + 0.6 * 100) / 110)
    assert mos["n_sites"]["td_auc_365d"] == 0 and mos["mean"]["td_auc_365d"] is None
    assert mos["undefined_sites"]["td_auc_365d"] == ["a", "b", "c"]
    zero = P.mean_of_sites({"a": {"cindex_harrell": 0.7, "n_patients": 0}})
    assert zero["mean"]["cindex_harrell"] == 0.7 and zero["weighted_mean"]["cindex_harrell"] is None
    # PooledMetrics sites: auc_status weighted by n_status_labelled, not n
    grid = P.EvalGrid(np.arange(0.0, 101.0, 10.0), np.array([0.5]), np.array([0.5]),
                      requested_horizons_days=(50.0,))
    s1 = P.site_statistics(grid, [5.0, 15.0, 25.0, 35.0], [1, 1, 0, 0], [1.0, 0.0, 1.0, 0.0],
                           [1, 0, -1, -1], [1.0, 0.0, 0.0, 0.0])  # AUC 1, 2 labelled of 4
    s2 = P.site_statistics(grid, [5.0, 15.0], [1, 0], [1.0, 0.0], [1, 1], [0.0, 0.0])  # one class only
    s3 = P.site_statistics(grid, [5.0, 15.0], [1, 0], [1.0, 0.0], [0, 1], [1.0, 0.0])  # AUC 0, 2 of 2
    per_site = {f"s{i}": P.pooled_metrics(s, grid) for i, s in enumerate((s1, s2, s3))}
    assert [per_site[k].auc_status for k in ("s0", "s2")] == [1.0, 0.0]
    mos = P.mean_of_sites({"s0": per_site["s0"], "s2": per_site["s2"]})
    assert mos["weighted_mean"]["auc_status"] == pytest.approx(0.5)  # 2 and 2 labelled, not 4 and 2


def test_round_report_rows_grid_and_json_safety():
    """side_by_side per_site values are each site's own value; the report carries the grid; a
    NaN in a per-site dict is refused. Kills per-site values read from the pooled scalars, the
    grid dropped, and the removed json-safety check of round_report."""
    grid, st, pm = _exact_case()
    half = P.pooled_metrics(P.site_statistics(grid, [5.0, 25.0, 45.0], [1, 1, 0], sorted(grid.risk_edges[:3])), grid)
    report = P.round_report(1, pm, {"a": half, "b": {"cindex": 0.42, "n_test": 3}})
    row = report["side_by_side"]["cindex_harrell"]
    assert row["pooled"] == pm.cindex_harrell
    assert row["per_site"] == {"a": half.cindex_harrell, "b": 0.42}
    assert report["grid"] == pm.grid == grid.summary()
    with pytest.raises(ValueError, match="non-finite"):
        P.round_report(1, pm, {"a": {"cindex": 0.5, "n_test": 3, "extra": [math.nan]}})


def test_cox_newton_halves_steps_that_overshoot():
    """Per-bin counts where the first Newton step from beta = 0 overshoots (the high group: 4
    patients, all dying in the first bin together with 4 of 29 low-risk patients): the fit must
    halve the step and land on lifelines' Efron estimate, not overflow. Kills the removed step
    halving (OverflowError in exp(beta))."""
    n0 = np.array([29.0, 22, 16, 13, 10, 7, 4, 3, 0])
    d0 = np.array([4.0, 4, 3, 1, 2, 3, 1, 3, 0])
    n1 = np.array([4.0, 0, 0, 0, 0, 0, 0, 0, 0])
    d1 = np.array([4.0, 0, 0, 0, 0, 0, 0, 0, 0])
    beta, se = P._cox_binary_efron(n0, n1, d0, d1)
    # the same patients: bin k -> day k + 1; leaving = n[k] - n[k+1], censored = leaving - events
    rows = []
    for g, (n, d) in enumerate(((n0, d0), (n1, d1))):
        leaving = n - np.r_[n[1:], 0]
        for k in range(n.size):
            rows += [(k + 1.0, 1, g)] * int(d[k]) + [(k + 1.0, 0, g)] * int(leaving[k] - d[k])
    df = pd.DataFrame(rows, columns=["T", "E", "g"])
    # lifelines' own Newton diverges here from its default first step; a half step converges
    cph = CoxPHFitter().fit(df, "T", "E", fit_options={"precision": 1e-12, "step_size": 0.5})
    assert beta == pytest.approx(float(cph.params_["g"]), rel=1e-6)
    assert se == pytest.approx(float(cph.standard_errors_["g"]), rel=1e-6)
