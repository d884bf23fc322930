"""Mutation-testing review of the paired bootstrap, the ceilings driver, the scale study's
resampling and what a client loads and reports about its site folder (client.site_context).

Every expected value is computed by hand or by a straightforward reimplementation here."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from client.site_context import (SiteFolderInvalid, embedding_standardisation, evaluation_limits, load_site_cached,
                                 site_path)
from shared_model.paired_bootstrap import (PairedDifference, auc_replicates, bootstrap_counts, cindex_replicates,
                                           combine_folds, paired_difference)
from shared_model.runconfig import settings_from_run_config
from simulations.ceilings import fold_ceilings, main as ceilings_main, render, summarise
from simulations.cv import FoldSpec
from simulations.scale_study import FOLD_COLUMN, main as scale_main, pooled_labels, resampled_labels
from sites import load_site
from sites.cptac_tcga import CohortLabels
from sites.synthetic import write_synthetic_site
from sites_fixtures import synthetic_site


# ----------------------------------------------------------------------------- paired bootstrap
def test_every_patient_of_a_stratum_is_drawn_about_once_per_replicate():
    strata = np.array([0, 0, 0, 1, 1])
    w = bootstrap_counts(strata, 4000, seed=0)
    # uniform draws with replacement: each patient appears 1 time per replicate on average,
    # and with probability 1 - (2/3)^3 (stratum of 3) or 1 - (1/2)^2 (stratum of 2) at least once
    np.testing.assert_allclose(w.mean(axis=0), 1.0, atol=0.06)
    np.testing.assert_allclose((w > 0).mean(axis=0), [1 - (2 / 3) ** 3] * 3 + [0.75] * 2, atol=0.03)


def test_the_se_is_the_sample_std_of_the_seed_averaged_paired_differences():
    # two seeds of A, averaged per replicate: [0.1, 0.2, 0.3, 0.6]; B = 0 -> d = A
    rep_a = np.array([[0.0, 0.1, 0.4, 0.5], [0.2, 0.3, 0.2, 0.7]])
    rep_b = np.zeros((1, 4))
    d = paired_difference(rep_a, rep_b, 0.35, 0.05)
    # mean 0.3, squared deviations 0.04 + 0.01 + 0 + 0.09 = 0.14, / (4 - 1)
    assert d.se == pytest.approx(math.sqrt(0.14 / 3), abs=1e-12)
    assert d.diff == pytest.approx(0.30, abs=1e-12) and d.n_valid == 4 and d.n_boot == 4


def test_undefined_replicates_are_left_out_of_the_se_not_counted_as_no_difference():
    rep_a = np.array([[0.1, np.nan, 0.2, 0.3, 0.6]])
    rep_b = np.zeros((1, 5))
    d = paired_difference(rep_a, rep_b, 0.0, 0.0, min_valid=0.5)
    assert d.se == pytest.approx(math.sqrt(0.14 / 3), abs=1e-12)
    assert (d.n_valid, d.n_boot) == (4, 5)


def test_min_valid_is_an_inclusive_fraction_and_at_least_two_replicates_are_needed():
    nine_of_ten = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, np.nan]])
    zeros = np.zeros((1, 10))
    assert paired_difference(nine_of_ten, zeros, 0.0, 0.0).n_valid == 9  # exactly 90 %: kept
    eight_of_ten = nine_of_ten.copy()
    eight_of_ten[0, 0] = np.nan
    assert paired_difference(eight_of_ten, zeros, 0.0, 0.0) is None
    one_of_two = np.array([[0.5, np.nan]])
    assert paired_difference(one_of_two, np.zeros((1, 2)), 0.0, 0.0, min_valid=0.0) is None
    two_of_two = np.array([[0.5, 0.7]])
    assert paired_difference(two_of_two, np.zeros((1, 2)), 0.0, 0.0, min_valid=0.0).se == pytest.approx(
        math.sqrt(0.02), abs=1e-12)


def test_the_p_value_is_two_sided_for_either_sign():
    two_sided = 2 * 0.022750131948179195  # 2 * (1 - Phi(2))
    assert PairedDifference(0.02, 0.01, 100, 100).p == pytest.approx(two_sided, rel=1e-9)
    assert PairedDifference(-0.02, 0.01, 100, 100).p == pytest.approx(two_sided, rel=1e-9)
    assert PairedDifference(0.02, 0.01, 100, 100).ci == pytest.approx((0.02 - 0.0195996398, 0.02 + 0.0195996398))
    assert PairedDifference(0.01, 0.0, 100, 100).p == 0.0  # a difference on every resample alike
    assert PairedDifference(0.0, 0.0, 100, 100).p == 1.0


def test_combined_folds_report_the_fewest_replicates_and_need_a_fold():
    comb = combine_folds([PairedDifference(0.1, 0.01, 480, 500), PairedDifference(0.2, 0.02, 990, 1000)])
    assert (comb.n_valid, comb.n_boot) == (480, 500)
    with pytest.raises(ValueError, match="at least one fold"):
        combine_folds([])


def test_one_value_per_patient_is_checked_for_every_argument():
    time = np.array([1.0, 2, 3, 4])
    event = np.array([1, 1, 0, 1])
    risk = np.array([[0.4, 0.3, 0.2, 0.1]])
    strata = np.zeros(4, dtype=int)
    counts = np.ones((2, 4))
    with pytest.raises(ValueError, match="one value per patient"):
        cindex_replicates(time, event, risk[:, :3], strata, counts)
    with pytest.raises(ValueError, match="one value per patient"):
        cindex_replicates(time, event, risk, strata[:3], counts)
    with pytest.raises(ValueError, match="one value per patient"):
        cindex_replicates(time, event, risk, strata, counts[:, :3])
    with pytest.raises(ValueError, match="one value per patient"):
        auc_replicates(event, risk, counts[:, :3])
    with pytest.raises(ValueError, match=r"scores\[0\] contains 1 NaN"):
        auc_replicates(event, np.array([[0.1, np.nan, 0.2, 0.3]]), counts)


def test_a_replicate_with_a_duplicated_patient_and_ties_by_hand():
    # replicate: patient 0 twice, 1, 2, 3 once. time [1, 2, 2, 4], event [1, 1, 0, 1], risk [.9, .3, .5, .3]
    # comparable (i event; t_j > t_i, or t_j = t_i with j censored): each copy of 0 with 1, 2, 3 (6 pairs,
    # concordant); 1 with 2 (tied time, 2 censored: discordant); 1 with 3 (tied risk: 1/2). The copies of 0
    # are not compared with each other (tied events). C = (6 + 0 + 0.5) / 8.
    time = np.array([1.0, 2, 2, 4])
    event = np.array([1, 1, 0, 1])
    risk = np.array([[0.9, 0.3, 0.5, 0.3]])
    counts = np.array([[2.0, 1, 1, 1]])
    c = cindex_replicates(time, event, risk, np.zeros(4, dtype=int), counts)
    assert c[0, 0] == pytest.approx(6.5 / 8, abs=1e-12)
    # AUC, label [1, 0, 0, 1]: positives .9, .9, .3; negatives .3, .5 -> (4 + 0.5 + 0) / (3 * 2)
    a = auc_replicates(np.array([1, 0, 0, 1]), risk, counts)
    assert a[0, 0] == pytest.approx(4.5 / 6, abs=1e-12)


# ----------------------------------------------------------------------------- ceilings
@pytest.fixture(scope="module")
def ceiling_sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("ceil")
    a = load_site(synthetic_site(root, name="s1", n=30, seed=1))
    b = load_site(synthetic_site(root, name="s2", n=30, seed=2))
    return root, {a.name: a, b.name: b}


def _within_site_c(sites, rows, risks):
    """Harrell's C with pairs only within a site, counted by hand (lifelines' tie rules)."""
    num = den = 0.0
    for n, r in rows.items():
        s, risk = sites[n], risks[n]
        for i in r:
            for j in r:
                if i == j or s.event[i] != 1:
                    continue
                if s.time[j] > s.time[i] or (s.time[j] == s.time[i] and s.event[j] == 0):
                    den += 1
                    num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return num / den


def test_the_ceiling_compares_pairs_within_sites_only_and_a_site_may_miss_a_fold(ceiling_sites):
    _, sites = ceiling_sites
    a, b = sites.values()
    rows_a, rows_b = np.arange(0, 30, 2), np.arange(1, 30, 3)
    folds = [FoldSpec(0, {}, {a.name: rows_a, b.name: rows_b}), FoldSpec(1, {}, {a.name: rows_b})]
    got = fold_ceilings(sites, folds)["oracle"]
    risks = {a.name: a.oracle_risk, b.name: b.oracle_risk}
    assert got[0] == pytest.approx(_within_site_c(sites, {a.name: rows_a, b.name: rows_b}, risks), abs=1e-12)
    assert got[1] == pytest.approx(_within_site_c(sites, {a.name: rows_b}, risks), abs=1e-12)


def test_the_table_shows_mean_then_std_and_every_fold(ceiling_sites):
    text = render(summarise({"r": [0.7, None, 0.9]}), "# h")
    assert "| r | 0.800 ± 0.100 | 0.700, —, 0.900 |" in text


def test_the_cli_scores_only_the_chosen_folds(ceiling_sites, tmp_path):
    root, _ = ceiling_sites
    out = tmp_path / "out"
    ceilings_main(["--sites-dir", str(root), "--sites", "s1", "--folds", "fold_cv", "--fold-ids", "2",
                   "--out", str(out)])
    doc = json.loads((out / "ceilings.json").read_text())
    assert doc["folds"] == [2]
    assert all(len(v["folds"]) == 1 for v in doc["ceilings"].values())


# ----------------------------------------------------------------------------- scale study
def _tiny_pool():
    return CohortLabels(patient_ids=["x", "y", "z"], time=np.array([10.0, 20.0, 30.0]),
                        event=np.array([1, 0, 1], dtype=np.int8), fold=np.zeros(3, dtype=np.int64),
                        n_slides=np.array([1, 2, 3], dtype=np.int64), n_folds=1)


def test_resampled_rows_keep_each_source_row_together_and_draw_every_row():
    lab = resampled_labels(_tiny_pool(), 300, 3, seed=0)
    rows = set(zip(lab.time.tolist(), lab.event.tolist(), lab.n_slides.tolist()))
    assert rows == {(10.0, 1, 1), (20.0, 0, 2), (30.0, 1, 3)}
    assert lab.patient_ids[:2] == ["SCALE-00001", "SCALE-00002"] and lab.patient_ids[-1] == "SCALE-00300"
    assert lab.n_folds == 3


def test_scale_folds_are_shuffled_by_the_seed_and_the_smallest_size_is_accepted():
    a, b = resampled_labels(_tiny_pool(), 60, 3, seed=0), resampled_labels(_tiny_pool(), 60, 3, seed=1)
    assert not np.array_equal(a.fold, np.arange(60) % 3)
    assert not np.array_equal(a.fold, b.fold)
    small = resampled_labels(_tiny_pool(), 10, 5, seed=0)  # n = 2 * n_folds: two patients per fold
    assert np.bincount(small.fold).tolist() == [2, 2, 2, 2, 2]


def test_pooled_labels_read_only_the_named_sites():
    one, four = pooled_labels(("cptac-pda",)), pooled_labels()
    assert 0 < len(one.time) < len(four.time)
    assert all(pid.startswith("cptac-pda:") for pid in one.patient_ids)


def test_the_scale_cli_writes_five_folds_by_default(tmp_path):
    scale_main(["--n", "12", "--out", str(tmp_path)])
    site = load_site(tmp_path / "scale-12")
    assert sorted(np.bincount(site.folds[FOLD_COLUMN]).tolist()) == [2, 2, 2, 3, 3]
    assert "  missing: none\n" in (tmp_path / "scale-12" / "site.yaml").read_text()  # provenance says so


# ----------------------------------------------------------------------------- site_context
def test_a_node_standardisation_overrides_the_run_configs(tmp_path):
    s = settings_from_run_config({"sites": "a", "min-sites": 1, "sites-dir": str(tmp_path),
                                  "model-overrides": "train.standardize_embeddings=per_modality"})
    assert embedding_standardisation({}, s) == "per_modality"
    assert embedding_standardisation({"standardize-embeddings": "none"}, s) == "none"
    with pytest.raises(ValueError, match="standardize-embeddings='z'"):
        embedding_standardisation({"standardize-embeddings": "z"}, s)


def test_a_fractional_bin_width_is_kept():
    assert evaluation_limits({"eval-min-time-bin-days": 10.5}).min_time_bin_days == 10.5


def test_a_site_dir_may_start_with_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    s = settings_from_run_config({"sites": "a", "min-sites": 1, "sites-dir": str(tmp_path)})
    assert site_path({"site-dir": "~/hosp"}, s) == tmp_path / "hosp"


def test_a_negative_partition_id_is_refused(tmp_path):
    """-1 used to serve the last site of the run config silently (Python's negative indexing)."""
    s = settings_from_run_config({"sites": "a,b", "min-sites": 1, "sites-dir": str(tmp_path)})
    with pytest.raises(ValueError, match="partition-id -1 is negative; it must be 0 to 1"):
        site_path({"partition-id": -1}, s)


@pytest.fixture(scope="module")
def cached_site(tmp_path_factory):
    return write_synthetic_site(tmp_path_factory.mktemp("cache"), "s", 12, modalities=(("lab", "tabular", 3),),
                                seed=2)


def test_a_site_is_loaded_once_per_process_whatever_path_names_it(cached_site, tmp_path, monkeypatch):
    first = load_site_cached(cached_site)
    assert load_site_cached(cached_site) is first
    link = tmp_path / "link"
    link.symlink_to(cached_site, target_is_directory=True)
    assert load_site_cached(link) is first
    monkeypatch.chdir(cached_site.parent)
    assert load_site_cached(Path(cached_site.name)) is first


def test_a_missing_site_folder_is_reported_as_such(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_site_cached(tmp_path / "nowhere")


def test_an_invalid_site_tells_the_server_only_its_folder_name_and_files(tmp_path, caplog):
    site = write_synthetic_site(tmp_path / "deep" / "private", "delta", 12, modalities=(("ct", "sequence", 5),),
                                seed=4)
    bad = sorted((site / "ct").glob("*.npy"))[0]
    bad.write_bytes(b"not an npy file")
    with caplog.at_level(logging.ERROR, logger="client.site_context"):
        with pytest.raises(SiteFolderInvalid) as err:
            load_site_cached(site)
    msg = str(err.value)
    assert "site folder 'delta' is not valid (1 problem in ct/)" in msg
    assert bad.stem not in msg and "private" not in msg
    assert bad.stem in caplog.text  # the details stay in this node's log
