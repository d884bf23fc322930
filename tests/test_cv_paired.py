"""simulations.cv_paired on hand-made predictions (no training): shared resamples, masks, merging."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from shared_model.paired_bootstrap import bootstrap_counts, cindex_replicates, paired_difference
from simulations.cv_paired import fold_comparisons, merge_paired, summarise_paired


def _sites(seed: int = 0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, n in (("a", 30), ("b", 25)):
        status = rng.integers(0, 2, n).astype(np.int8)
        status[:3] = -1  # unlabelled
        out[name] = SimpleNamespace(time=rng.integers(10, 900, n).astype(float),
                                    event=rng.integers(0, 2, n).astype(np.int8), status=status)
    return out


def _pred(sites, rng):
    risk = {s: rng.standard_normal(len(d.time)) for s, d in sites.items()}
    prob = {s: rng.random(len(d.time)) for s, d in sites.items()}
    return risk, prob


def test_every_method_of_a_fold_is_scored_on_the_same_resamples():
    sites = _sites()
    test = {s: np.arange(len(d.time)) for s, d in sites.items()}
    rng = np.random.default_rng(1)
    ref = _pred(sites, rng)
    other = _pred(sites, rng)
    preds = {"fused": {0: ref}, "same": {0: ref}, "other": {0: other}}
    out = {(e["b"], e["metric"]): e for e in fold_comparisons(sites, test, 3, preds, n_boot=200)}
    # a method identical to the reference differs by exactly 0 on every shared resample
    for metric in ("cindex", "auc"):
        e = out[("same", metric)]
        assert e["diff"] == 0.0 and e["se"] == 0.0 and e["n_valid"] == 200
    # the SE is that of the paired differences on resamples drawn within sites with the fold as seed
    time = np.concatenate([sites[s].time for s in ("a", "b")])
    event = np.concatenate([sites[s].event for s in ("a", "b")])
    strata = np.repeat([0, 1], [30, 25])
    counts = bootstrap_counts(strata, 200, seed=3)
    ra, rb = (np.concatenate([p[0][s] for s in ("a", "b")])[None] for p in (ref, other))
    ones = np.ones((1, len(time)))
    want = paired_difference(cindex_replicates(time, event, ra, strata, counts),
                             cindex_replicates(time, event, rb, strata, counts),
                             float(cindex_replicates(time, event, ra, strata, ones)[0, 0]),
                             float(cindex_replicates(time, event, rb, strata, ones)[0, 0]))
    assert out[("other", "cindex")]["diff"] == pytest.approx(want.diff, abs=1e-12)
    assert out[("other", "cindex")]["se"] == pytest.approx(want.se, abs=1e-12)
    assert out[("other", "auc")]["n_patients"] == 55 - 6  # unlabelled patients are left out of the AUC


def test_a_method_without_a_status_probability_at_a_site_it_scores_has_no_auc_comparison():
    sites = _sites()
    test = {s: np.arange(len(d.time)) for s, d in sites.items()}
    rng = np.random.default_rng(2)
    ref = _pred(sites, rng)
    risk, prob = _pred(sites, rng)
    preds = {"fused": {0: ref}, "m": {0: (risk, {"a": prob["a"], "b": None})}}
    out = {e["metric"]: e for e in fold_comparisons(sites, test, 0, preds, n_boot=50)}
    assert "undefined" in out["auc"] and "diff" in out["cindex"]


def test_summary_counts_folds_ahead_and_behind_and_merge_drops_entries_of_other_seeds():
    entries = [{"a": "fused", "b": "m", "fold": f, "metric": "cindex", "diff": d, "se": 0.02, "n_valid": 100,
                "n_boot": 100, "seeds_a": [0], "seeds_b": [0]} for f, d in enumerate((0.1, 0.2, -0.05))]
    _, table = summarise_paired(entries, ["fused", "m"])
    (row,) = table
    assert row["cindex"]["folds_ahead"] == 2 and row["cindex"]["folds_behind"] == 1
    assert row["cindex"]["diff"] == pytest.approx(0.25 / 3) and row["auc"] is None
    run = {"_file": "r.json", "paired": entries}
    rows = [{"method": m, "fold": f, "seed": 0, "source": "r.json"} for m in ("fused", "m") for f in range(3)]
    assert len(merge_paired([run], rows, log=lambda *_: None)) == 3
    rows.append({"method": "m", "fold": 1, "seed": 1, "source": "r.json"})  # fold 1 of m now averages 2 seeds
    kept = merge_paired([run], rows, log=lambda *_: None)
    assert sorted(e["fold"] for e in kept) == [0, 2]
