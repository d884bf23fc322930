"""Guarantees of the run folder, checkpoints, summary, site data types, synthetic sites and the
linear warm start that mutations slipped past (sixth review round, mutation testing of
server/results.py, server/checkpoint.py, server/summary.py, sites/types.py, sites/synthetic.py
and shared_model/warm_start.py). Every test is fast and reads exact values."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from server.checkpoint import Checkpoint, load_checkpoint, resume_problems, save_checkpoint
from server.results import RunRecorder, write_json


def _record(rnd: int, **extra) -> dict:
    return {
        "round": rnd, "n_train": 60, "train_loss": 0.25 + rnd,
        "sites": {"b": {"n_train": 30, "train_loss": 0.5, "n_test": 12, "n_events": 5, "cindex": 0.61,
                        "auc": 0.71, "simulated": True},
                  "a": {"n_train": 31, "train_loss": 0.75, "n_test": 8, "n_events": 3, "cindex": 0.62,
                        "auc": 0.72, "simulated": False}},
        "pooled": {"n": 20, "n_events": 8, "cindex_harrell": 0.63, "auc_status": 0.73},
        "mean_of_sites": {"mean": {"cindex_harrell": 0.615, "auc_status": 0.715}},
        "report": {"round": rnd},
        **extra,
    }


# ----------------------------------------------------------------------------- server/results.py
def test_write_json_turns_numpy_values_and_paths_into_json(tmp_path):
    write_json(tmp_path / "x.json", {"a": np.array([1.5, 2.5]), "b": np.float32(0.5), "c": np.int64(3),
                                     "d": Path("/some/where"), "e": np.array([[1, 2], [3, 4]])})
    assert json.loads((tmp_path / "x.json").read_text()) == {
        "a": [1.5, 2.5], "b": 0.5, "c": 3, "d": "/some/where", "e": [[1, 2], [3, 4]]}


def test_write_json_refuses_nan_and_leaves_no_file(tmp_path):
    """rounds.json is strict JSON: a NaN is an error (metrics say None for undefined), never 'NaN'."""
    with pytest.raises(ValueError):
        write_json(tmp_path / "x.json", {"cindex": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_clear_done_removes_the_marker_and_tolerates_its_absence(tmp_path):
    rec = RunRecorder(tmp_path / "run")
    rec.clear_done()  # nothing to remove: no error
    (tmp_path / "run" / "DONE").write_text('{"round": 2}\n')
    rec.clear_done()
    assert not (tmp_path / "run" / "DONE").exists()


def test_a_resumed_recorder_continues_the_checkpointed_history(tmp_path):
    rec = RunRecorder(tmp_path, history=[_record(1)])
    rec.add_round(_record(2))
    assert [r["round"] for r in json.loads((tmp_path / "rounds.json").read_text())] == [1, 2]
    assert [r["round"] for r in rec.history] == [1, 2]
    csv_rounds = [line.split(",")[0] for line in (tmp_path / "metrics_per_round.csv").read_text().splitlines()[1:]]
    assert csv_rounds == ["1"] * 4 + ["2"] * 4


def test_the_pooled_round_file_follows_the_report_not_the_pooled_metrics(tmp_path):
    rec = RunRecorder(tmp_path)
    rec.add_round(_record(1, pooled=None))  # a report without pooled metrics is still written
    rec.add_round(_record(2, report=None))  # pooled metrics but no report: no file
    assert sorted(p.name for p in (tmp_path / "pooled").iterdir()) == ["round_001.json"]
    assert json.loads((tmp_path / "pooled" / "round_001.json").read_text()) == {"round": 1}


def test_round_table_puts_each_number_in_its_column():
    rec = RunRecorder.__new__(RunRecorder)  # the table needs no folder
    lines = RunRecorder.round_table(rec, _record(3)).splitlines()
    assert lines[0] == "round 3:  site                   n_train    loss  n_test C-index     AUC"  # over the columns
    assert lines[1] == "          a                           31  0.7500       8  0.6200  0.7200"
    assert lines[2] == "          b (sim)                     30  0.5000      12  0.6100  0.7100"
    assert lines[3] == "          mean of sites                                   0.6150  0.7150"
    assert lines[4] == "          POOLED                      60  3.2500      20  0.6300  0.7300"
    # a missing or non-finite number is a dash, never 'nan' or 'inf'
    r = _record(1, train_loss=float("inf"), pooled={"n": 20, "cindex_harrell": float("nan")})
    pooled = RunRecorder.round_table(rec, r).splitlines()[-1]
    assert pooled == "          POOLED                      60       —      20       —       —"


# ----------------------------------------------------------------------------- server/checkpoint.py
def test_a_checkpoint_restores_model_spec_settings_and_integer_buffers(tmp_path):
    spec = '[{"name": "ct", "kind": "sequence", "dim": 4}]'
    settings = {"seed": 3, "config": {"train": {"lr": 0.01}}}
    arrays = {"w": np.arange(4, dtype=np.float32), "bn.num_batches_tracked": np.array(7, dtype=np.int64),
              "h": np.arange(3, dtype=np.float64)}
    save_checkpoint(tmp_path, Checkpoint(round=2, arrays=arrays, optimizer_state={"name": "fedavg"},
                                         model_spec=spec, settings=settings))
    back = load_checkpoint(tmp_path)
    assert back.model_spec == spec and back.settings == settings
    assert {k: v.dtype for k, v in back.arrays.items()} == {k: v.dtype for k, v in arrays.items()}
    for k, v in arrays.items():
        np.testing.assert_array_equal(back.arrays[k], v)


def test_resume_names_a_setting_only_one_side_has():
    """A key the checkpoint lacks (or only it has) is a change, not something to skip."""
    ck = Checkpoint(round=1, arrays={}, optimizer_state={}, model_spec="[]", settings={"seed": 0, "old": 1})
    assert resume_problems(ck, {"seed": 0, "local_epochs": 2}, {}) == [
        "local_epochs: checkpoint None, now 2", "old: checkpoint 1, now None"]


def test_resume_checks_every_site_present_in_both():
    decl = {"split": "default", "n_train": 30, "n_test": 10, "n_patients": 40}
    ck = Checkpoint(round=1, arrays={}, optimizer_state={}, model_spec="[]", settings={},
                    sites={"a": decl, "b": decl, "c": decl})
    now = {"a": decl, "b": decl, "c": {**decl, "n_test": 11}, "d": {**decl, "n_test": 1}}  # d is new: not compared
    assert resume_problems(ck, {}, now) == ["site c n_test: checkpoint 10, now 11"]



# what a resumed run may change: how long it runs and waits, where files are, how a node runs
MAY_CHANGE = {"num_rounds", "node_wait_timeout", "round_timeout", "resume", "min_sites", "sites_dir", "results_dir",
              "model_config_path", "model_overrides", "config.train.num_threads", "config.train.device"}


def test_resume_accepts_exactly_the_changes_that_leave_the_rounds_alone():
    """Every other setting (config.train.*, config.model.*, evaluation grid, server optimiser, ...)
    decides what the rounds compute: changing any one of them alone is named."""
    from shared_model.config import flatten_keys
    from shared_model.runconfig import settings_from_run_config

    base = settings_from_run_config({"sites": "a,b", "min-sites": 2}).as_dict()
    keys = sorted(flatten_keys(base))
    assert MAY_CHANGE <= set(keys) and any(k.startswith("config.model.") for k in keys)
    ck = Checkpoint(round=1, arrays={}, optimizer_state={}, model_spec="[]", settings=base)
    for key in keys:
        changed = copy.deepcopy(base)
        node = changed
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = "CHANGED"
        problems = resume_problems(ck, changed, {})
        if key in MAY_CHANGE:
            assert problems == [], key
        else:
            assert [p.split(":")[0] for p in problems] == [key], key

# ----------------------------------------------------------------------------- server/summary.py
def _summary(tmp_path, history, sites=None):
    from server.strategy import SiteInfo
    from server.summary import write_summary
    from shared_model.runconfig import settings_from_run_config

    settings = settings_from_run_config({"min-sites": 1, "server-optimizer": "fedavg", "seed": 1})
    sites = sites or {1: SiteInfo(1, "a", "c", False, (), "[]", 0, 0, 0, "s"),
                      2: SiteInfo(2, "b", "c", False, (), "[]", 0, 0, 0, "s")}
    return write_summary(tmp_path, settings, SimpleNamespace(sites=sites), history, seconds=1.0).read_text()


def test_summary_lists_the_km_plot_only_when_it_exists(tmp_path):
    without = _summary(tmp_path, [_record(1)])
    assert "`km_final.png`" not in without
    assert "No Kaplan–Meier plot: no pooled risk groups in the last round." in without
    (tmp_path / "km_final.png").write_bytes(b"png")
    with_km = _summary(tmp_path, [_record(1)])
    assert "`pooled/round_NNN.json`, `km_final.png`, `cindex_per_round.png`" in with_km
    assert "No Kaplan–Meier plot" not in with_km


def test_summary_reports_the_last_round_of_the_history(tmp_path):
    first = _record(1)
    first["sites"]["a"]["cindex"] = 0.11
    text = _summary(tmp_path, [first, _record(4)])
    assert "## Round 4 — held-out patients" in text and "2 sites, 4 rounds" in text
    assert "| a | real | 31 | 8 | 3 | 0.6200 | 0.7200 |" in text and "0.1100" not in text
    # an undefined pooled number reads as a dash
    assert "from the same counts): —. Pooled Uno's C: —;" in _summary(tmp_path, [_record(1, pooled={"n": 5})])


# ----------------------------------------------------------------------------- sites/types.py
from sites.types import (ModalityData, ModalitySpec, SiteData, SiteSpec,  # noqa: E402
                         oracle_part_column, parse_oracle_part_column, simulated_data_note, token_rows)

SEQ = ModalitySpec("seq", "sequence", 2)
TAB = ModalitySpec("tab", "tabular", 2, ("x", "y"))


def _seq_data() -> ModalityData:
    """4 patients: 2, 0 (absent), 3 and 1 tokens; token row r holds [r, 10 r]."""
    values = np.array([[r, 10 * r] for r in range(6)], dtype=np.float32)
    return ModalityData(SEQ, np.array([True, False, True, True]), values, np.array([0, 2, 2, 5, 6]))


def _tab_data() -> ModalityData:
    values = np.array([[1, 2], [np.nan, np.nan], [5, np.nan], [7, 8]], dtype=np.float32)
    return ModalityData(TAB, np.array([True, False, True, True]), values, None)


def _site(folds=None, **kw) -> SiteData:
    spec = SiteSpec("s", "c", "days", ("survival",), (SEQ, TAB))
    return SiteData(Path("/nowhere"), spec, np.array(["p0", "p1", "p2", "p3"]), np.array([1.0, 2, 3, 4]),
                    np.array([1, 0, 1, 0], dtype=np.int8), np.array([-1, -1, -1, -1], dtype=np.int8),
                    {"seq": _seq_data(), "tab": _tab_data()}, folds or {}, **kw)


def test_oracle_part_names_are_sorted_and_stripped():
    assert oracle_part_column(("radiology", "pathology")) == "part:pathology+radiology"
    assert parse_oracle_part_column("part: radiology + pathology") == ("pathology", "radiology")
    assert parse_oracle_part_column("part:") == () and parse_oracle_part_column("part:a++b") == ()
    assert parse_oracle_part_column("eta") is None


def test_modalities_are_compatible_only_when_declared_alike():
    assert SEQ.compatible_with(ModalitySpec("seq", "sequence", 2, (), "other words"))
    assert not SEQ.compatible_with(ModalitySpec("seq", "bag", 2))
    assert not SEQ.compatible_with(ModalitySpec("seq", "sequence", 3))
    assert not TAB.compatible_with(ModalitySpec("tab", "tabular", 2, ("x", "z")))
    assert not SEQ.compatible_with(ModalitySpec("sek", "sequence", 2))


def test_site_spec_modality_lookup():
    spec = _site().spec
    assert spec.modality("tab") is TAB and spec.modality_names == ("seq", "tab")
    with pytest.raises(KeyError, match="no modality 'ct'"):
        spec.modality("ct")


def test_tokens_summaries_and_token_counts():
    seq, tab = _seq_data(), _tab_data()
    np.testing.assert_array_equal(seq.tokens(2), [[2, 20], [3, 30], [4, 40]])
    assert seq.tokens(1).shape == (0, 2)
    np.testing.assert_array_equal(seq.n_tokens(), [2, 0, 3, 1])
    np.testing.assert_array_equal(tab.n_tokens(), [1, 0, 1, 1])
    s = seq.summaries(np.array([3, 1, 0, 2]))
    assert s.dtype == np.float64
    np.testing.assert_array_equal(s, [[5, 50], [np.nan, np.nan], [0.5, 5], [3, 30]])
    t = tab.summaries(np.array([2, 0]))
    assert t.dtype == np.float64
    np.testing.assert_array_equal(t, [[5, np.nan], [1, 2]])


def test_summaries_ignore_tokens_of_a_patient_marked_absent():
    seq = _seq_data()
    seq.present[0] = False  # tokens kept, patient marked absent: NaN, not their mean
    assert np.isnan(seq.summaries(np.array([0]))).all()


def test_subset_and_with_present_keep_each_patients_own_tokens():
    seq = _seq_data()
    sub = seq.subset(np.array([3, 0, 1]))
    np.testing.assert_array_equal(sub.offsets, [0, 1, 3, 3])
    np.testing.assert_array_equal(sub.values, [[5, 50], [0, 0], [1, 10]])
    np.testing.assert_array_equal(sub.present, [True, True, False])
    assert seq.subset(np.array([1])).values.shape == (0, 2)  # a subset of one absent patient
    assert token_rows(seq.offsets, np.array([], dtype=np.int64)).dtype == np.int64
    kept = seq.with_present(np.array([True, True, False, True]))
    np.testing.assert_array_equal(kept.present, [True, False, False, True])  # never adds a modality
    np.testing.assert_array_equal(kept.offsets, [0, 2, 2, 2, 3])
    np.testing.assert_array_equal(kept.values, [[0, 0], [1, 10], [5, 50]])
    tab = _tab_data().with_present(np.array([False, True, True, True]))
    np.testing.assert_array_equal(tab.present, [False, False, True, True])
    np.testing.assert_array_equal(tab.values, [[np.nan, np.nan], [np.nan, np.nan], [5, np.nan], [7, 8]])


def test_site_subset_carries_folds_oracle_and_part_means():
    parts = {("seq",): np.array([1.0, 2.0, 3.0, 6.0]), ("tab",): np.array([0.0, 0.0, 0.0, 4.0])}
    site = _site({"fold_cv": np.array([0, 1, 0, 1])}, oracle_risk=np.array([1.0, 2, 3, 10]), oracle_parts=parts)
    sub = site.subset(np.array([3, 1]))
    np.testing.assert_array_equal(sub.folds["fold_cv"], [1, 1])
    np.testing.assert_array_equal(sub.oracle_risk, [10, 2])
    np.testing.assert_array_equal(sub.patient_ids, ["p3", "p1"])
    assert sub.part_means() == {("seq",): 3.0, ("tab",): 1.0}  # the site's means, not the subset's
    assert site.part_means() == {("seq",): 3.0, ("tab",): 1.0}  # means, not medians


def test_observable_oracle_risk_fills_unrevealed_parts_with_site_means():
    parts = {("seq",): np.array([1.0, 2.0, 3.0, 6.0]), ("tab",): np.array([0.0, 0.0, 0.0, 4.0])}
    site = _site(oracle_risk=parts[("seq",)] + parts[("tab",)], oracle_parts=parts)
    # patient 1 lacks both modalities: both parts enter at their site means (3 and 1)
    np.testing.assert_array_equal(site.observable_oracle_risk(), [1.0, 4.0, 3.0, 10.0])
    np.testing.assert_array_equal(site.observable_oracle_risk([("seq",)]), [2.0, 4.0, 4.0, 7.0])
    with pytest.raises(KeyError, match="no oracle parts"):
        site.observable_oracle_risk([("ct",)])
    np.testing.assert_array_equal(site.presence_matrix(("seq", "ct")),
                                  [[True, False], [False, False], [True, False], [True, False]])


def test_splits_and_resolve_split():
    folds = {"split_b": np.array(["train", "test", "", "train"]), "split_a": np.array(["test", "train", "train", ""]),
             "fold_cv": np.array([0, 1, -1, 2])}
    site = _site(folds)
    (a,) = site.splits("split_a")
    assert (a.name, a.train.tolist(), a.test.tolist()) == ("split_a", [1, 2], [0])
    cv = site.splits("fold_cv")
    assert [(s.name, s.train.tolist(), s.test.tolist()) for s in cv] == [
        ("fold_cv=0", [1, 3], [0]), ("fold_cv=1", [0, 3], [1]), ("fold_cv=2", [0, 1], [3])]
    assert site.resolve_split().name == "split_a"  # the first split_* by name, before any fold_*
    assert site.resolve_split("fold_cv").name == "fold_cv=0"
    assert site.resolve_split("fold_cv=2").test.tolist() == [3]
    with pytest.raises(KeyError, match="fold 7 not in column"):
        site.resolve_split("fold_cv=7")
    assert _site({"fold_x": np.array([1, 0, 0, 1])}).resolve_split().name == "fold_x=0"


def test_simulated_data_note_wording():
    assert simulated_data_note({}) == ""
    note = simulated_data_note({"x": "simulated (toy cohort)", "y": "TCGA-HNSC", "z": "SIMULATED"})
    assert note == ("**Simulated data:** y — real labels and folds, radiology and pathology embeddings simulated by "
                    "`sites.simulate`; x — simulated patients (toy cohort) and embeddings simulated by "
                    "`sites.simulate`; z — simulated patients and embeddings simulated by `sites.simulate`; "
                    "numbers describe the method on simulated data, not a clinical result.")


# ----------------------------------------------------------------------------- sites/synthetic.py
from sites import load_site  # noqa: E402
from sites.synthetic import write_synthetic_site  # noqa: E402


def test_synthetic_site_forces_two_events_when_censoring_hides_them(tmp_path):
    s = load_site(write_synthetic_site(tmp_path, "few", 20, censor_max_days=1.0, with_status=False, n_folds=2))
    assert int(s.event.sum()) == 2  # censoring within a day hides (nearly) every death: two are forced
    assert set(s.event[np.argsort(s.time, kind="stable")[:2]]) == {1}


def test_synthetic_site_refuses_no_modality(tmp_path):
    with pytest.raises(ValueError, match="a site needs at least one modality"):
        write_synthetic_site(tmp_path, "empty", 20, modalities=())
    assert not (tmp_path / "empty").exists()

def test_synthetic_token_counts_follow_the_arguments(tmp_path):
    s = load_site(write_synthetic_site(tmp_path, "toks", 40, seed=1, missing_rate=0.0, n_tokens=(2, 3)))
    assert set(s.modalities["seq"].n_tokens().tolist()) == {2, 3}  # both ends of n_tokens, inclusive
    assert set(s.modalities["vec"].n_tokens().tolist()) == {1, 2}  # one or two slide vectors


def test_synthetic_status_falls_back_to_the_event_when_a_class_is_missing(tmp_path):
    """Nobody is followed beyond 730 days (censoring within 700): no status 0, so status = event."""
    s = load_site(write_synthetic_site(tmp_path, "short", 30, seed=0, censor_max_days=700.0))
    assert (s.time <= 700).all() and set(s.event.tolist()) == {0, 1}
    np.testing.assert_array_equal(s.status, s.event)

def test_two_synthetic_sites_of_one_seed_differ_by_name(tmp_path):
    a = load_site(write_synthetic_site(tmp_path, "site-a", 30, seed=3))
    b = load_site(write_synthetic_site(tmp_path, "site-b", 30, seed=3))
    assert not np.array_equal(a.oracle_risk, b.oracle_risk)
    assert not np.array_equal(a.time, b.time)


@pytest.mark.parametrize("modality, least_r2", [("seq", 0.5), ("vec", 0.8), ("tab", 0.6)])
def test_each_synthetic_modality_carries_its_part_of_the_risk(tmp_path, modality, least_r2):
    """A token or tabular modality's summary predicts its oracle part linearly (the docstring's
    'component along a fixed direction'): R^2 of least squares over the patients that have it."""
    s = load_site(write_synthetic_site(tmp_path, "sig", 200, seed=2, missing_rate=0.0))
    x = s.modalities[modality].summaries(np.arange(len(s)))
    ok = ~np.isnan(x).any(axis=1)
    x, y = np.c_[x[ok], np.ones(ok.sum())], s.oracle_parts[(modality,)][ok]
    resid = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
    assert 1 - resid.var() / y.var() > least_r2


# ----------------------------------------------------------------------------- shared_model/warm_start.py
def _warm_parts(unlabel=0, all_one=False):
    from shared_model.train import TrainPart
    from test_model_fixtures import ALL_SPECS, make_site, tensors_for

    parts = []
    for i, size in enumerate((24, 20)):
        t = tensors_for(make_site(f"s{i}", ALL_SPECS, size, seed=30 + i), ALL_SPECS)
        train = np.arange(size * 3 // 4)
        if unlabel:
            t.status_mask[train[:unlabel]] = False
            t.status[train[:unlabel]] = 0.0
        if all_one:
            t.status[train] = 1.0
        parts.append(TrainPart(t, train))
    return parts


def _wide_model():
    from shared_model.model import build_model
    from test_model_fixtures import ALL_SPECS, small_cfg

    return build_model(ALL_SPECS, small_cfg(unimodal_risk=True, unimodal_input="input"), seed=0)


def test_warm_start_counts_patients_and_labelled_patients_apart():
    from shared_model.warm_start import warm_start_linear_terms

    fit = warm_start_linear_terms(_wide_model(), _warm_parts(unlabel=5), l2=0.5)
    assert (fit.patients, fit.labelled) == (18 + 15, 18 + 15 - 2 * 5)
    assert fit.status_objective is not None


def test_warm_start_fits_no_status_weights_from_one_class():
    """Every labelled training patient has status 1: no logistic fit (it has no optimum), so no
    status objective; the Cox fit still runs."""
    from shared_model.warm_start import warm_start_linear_terms

    fit = warm_start_linear_terms(_wide_model(), _warm_parts(all_one=True), l2=0.5)
    assert fit.status_objective is None and fit.labelled == 33 and np.isfinite(fit.cox_objective)


def test_warm_start_without_training_rows_says_so():
    from shared_model.train import TrainPart
    from shared_model.warm_start import warm_start_linear_terms

    parts = [TrainPart(p.tensors, np.arange(0)) for p in _warm_parts()]
    with pytest.raises(ValueError, match="the parts have no training rows"):
        warm_start_linear_terms(_wide_model(), parts, l2=0.5)


# ----------------------------------------------------------------------------- defect found
def test_a_foreign_torch_file_as_checkpoint_names_the_file(tmp_path):
    """A readable foreign file used to fail with a bare KeyError 'round' naming neither file nor problem."""
    torch.save({"fusion.w": torch.zeros(2)}, tmp_path / "checkpoint.pt")  # final_model.pt's layout
    with pytest.raises(RuntimeError, match=r"checkpoint.pt: not an oncofed checkpoint \(missing round, arrays"):
        load_checkpoint(tmp_path)
    torch.save([1, 2], tmp_path / "checkpoint.pt")
    with pytest.raises(RuntimeError, match="checkpoint.pt: not an oncofed checkpoint"):
        load_checkpoint(tmp_path)
