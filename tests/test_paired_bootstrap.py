"""Paired bootstrap: each replicate's metric equals lifelines / scikit-learn on the resampled patients."""

from __future__ import annotations

import numpy as np
import pytest

from shared_model.metrics import binary_auc, stratified_cindex
from shared_model.paired_bootstrap import (PairedDifference, auc_replicates, bootstrap_counts, cindex_replicates,
                                           combine_folds, paired_difference)


def _data(n=90, seed=0):
    rng = np.random.default_rng(seed)
    time = rng.integers(1, 60, n).astype(float)  # coarse: many tied times
    event = rng.integers(0, 2, n)
    strata = rng.integers(0, 3, n)
    risk = np.round(rng.normal(size=(2, n)), 1)  # coarse: tied risks
    label = rng.integers(0, 2, n)
    return time, event, strata, risk, label


def test_counts_resample_within_strata_and_are_reproducible():
    strata = np.array([0] * 7 + [1] * 5 + [2] * 3)
    w = bootstrap_counts(strata, 200, seed=3)
    assert w.shape == (200, 15)
    for s, size in ((0, 7), (1, 5), (2, 3)):
        assert (w[:, strata == s].sum(axis=1) == size).all()
    assert np.array_equal(w, bootstrap_counts(strata, 200, seed=3))
    assert not np.array_equal(w, bootstrap_counts(strata, 200, seed=4))
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_counts(strata, 1, seed=0)


def test_each_replicate_equals_lifelines_and_sklearn_on_the_resampled_patients():
    time, event, strata, risk, label = _data()
    w = bootstrap_counts(strata, 30, seed=0)
    c = cindex_replicates(time, event, risk, strata, w)
    a = auc_replicates(label, risk, w)
    assert c.shape == a.shape == (2, 30)
    for b in range(30):
        idx = np.repeat(np.arange(len(time)), w[b].astype(int))  # the resampled patients, copies included
        for s in range(2):
            assert c[s, b] == pytest.approx(stratified_cindex(time[idx], event[idx], risk[s, idx], strata[idx]),
                                            abs=1e-12)
            assert a[s, b] == pytest.approx(binary_auc(label[idx], risk[s, idx]), abs=1e-12)
    ones = np.ones((1, len(time)))  # the original sample
    assert cindex_replicates(time, event, risk, strata, ones)[0, 0] == pytest.approx(
        stratified_cindex(time, event, risk[0], strata), abs=1e-12)


def test_a_better_predictor_is_detected_and_identical_ones_are_not():
    rng = np.random.default_rng(1)
    n = 200
    eta = rng.normal(size=n)
    time = rng.exponential(np.exp(-eta)) * 365
    event = (rng.random(n) < 0.7).astype(int)
    strata = np.zeros(n, dtype=int)
    good, noise = eta[None], rng.normal(size=(1, n))
    w = bootstrap_counts(strata, 500, seed=0)
    rg = cindex_replicates(time, event, good, strata, w)
    rn = cindex_replicates(time, event, noise, strata, w)
    pg = cindex_replicates(time, event, good, strata, np.ones((1, n)))[0, 0]
    pn = cindex_replicates(time, event, noise, strata, np.ones((1, n)))[0, 0]
    d = paired_difference(rg, rn, pg, pn)
    assert d.diff == pytest.approx(pg - pn) and d.diff > 0.15
    assert d.ci[0] > 0 and d.p < 1e-4 and d.n_valid == 500
    swapped = paired_difference(rn, rg, pn, pg)
    assert swapped.diff == pytest.approx(-d.diff) and swapped.se == pytest.approx(d.se)
    same = paired_difference(rg, rg, pg, pg)
    assert same.diff == 0 and same.se == 0 and same.p == 1.0


def test_undefined_replicates_are_dropped_and_too_many_make_the_comparison_undefined():
    # one event among 6 patients: a replicate that does not draw it has no comparable pair
    time = np.arange(1.0, 7.0)
    event = np.array([1, 0, 0, 0, 0, 0])
    strata = np.zeros(6, dtype=int)
    risk = np.array([[3.0, 2, 1, 0, -1, -2]])
    w = bootstrap_counts(strata, 400, seed=0)
    rep = cindex_replicates(time, event, risk, strata, w)
    undefined = w[:, 0] == 0
    assert np.isnan(rep[0, undefined]).all() and np.isfinite(rep[0, ~undefined]).all()
    assert 0.2 < undefined.mean() < 0.5  # (5/6)^6 = 0.33 of the replicates miss the event
    assert paired_difference(rep, rep, 1.0, 1.0) is None  # fewer than 90 % defined
    assert paired_difference(rep, rep, 1.0, 1.0, min_valid=0.5).n_valid == int((~undefined).sum())


def test_folds_combine_as_independent_means():
    folds = [PairedDifference(0.02, 0.03, 1000, 1000), PairedDifference(-0.01, 0.04, 990, 1000)]
    comb = combine_folds(folds)
    assert comb.diff == pytest.approx(0.005)
    assert comb.se == pytest.approx(np.sqrt(0.03 ** 2 + 0.04 ** 2) / 2)
    assert comb.n_valid == 990
    lo, hi = comb.ci
    assert lo == pytest.approx(0.005 - 1.959964 * comb.se, abs=1e-6) and hi > lo


def test_bad_inputs_name_the_argument():
    time, event, strata, risk, label = _data(20)
    w = np.ones((2, 20))
    bad = risk.copy()
    bad[1, 4] = np.nan
    with pytest.raises(ValueError, match=r"risks\[1\] contains 1 NaN"):
        cindex_replicates(time, event, bad, strata, w)
    with pytest.raises(ValueError, match="one value per patient"):
        auc_replicates(label, risk[:, :10], w)
    with pytest.raises(ValueError, match="0/1"):
        auc_replicates(label * 2, risk, w)
