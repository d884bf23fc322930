"""Guarantees of shared_model.batch (SiteTensors, standardisation, centres), shared_model.config
(typed overrides, ranges, cross-field checks) and shared_model.runconfig (Flower run config),
each checked on exact values (written from a mutation review of these modules)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from shared_model.batch import InputStats, SiteTensors, fit_input_stats, fit_site_centres
from shared_model.config import Config, apply_overrides, load_config, parse_bool, parse_int
from shared_model.runconfig import parse_overrides, settings_from_run_config
from sites.types import ModalityData, ModalitySpec, SiteData, SiteSpec

TAB = ModalitySpec("clin", "tabular", 3, columns=("a", "b", "c"))
SEQ = ModalitySpec("ct", "sequence", 2)
VEC = ModalitySpec("wsi", "vector", 2)


def _site(mods: dict[str, ModalityData], status=None, n: int | None = None, specs=None) -> SiteData:
    n = n if n is not None else len(next(iter(mods.values())).present)
    specs = specs if specs is not None else tuple(m.spec for m in mods.values())
    spec = SiteSpec(name="h", cohort="h", time_unit="days", tasks=("survival", "status"), modalities=specs)
    status = np.zeros(n, dtype=np.int8) if status is None else np.asarray(status, dtype=np.int8)
    return SiteData(root=Path("/in-memory/h"), spec=spec, patient_ids=np.array([f"p{i}" for i in range(n)]),
                    time=np.arange(10.0, 10.0 + n), event=(np.arange(n) % 2).astype(np.int8),
                    status=status, modalities=mods)


def _tokens(spec: ModalitySpec, per_patient: list[list[list[float]]], present=None) -> ModalityData:
    counts = [len(t) for t in per_patient]
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    rows = [r for t in per_patient for r in t]
    values = np.asarray(rows, dtype=np.float32).reshape(-1, spec.dim)
    present = np.asarray([c > 0 for c in counts] if present is None else present, dtype=bool)
    return ModalityData(spec, present, values, offsets)


def _tab(values, present=None) -> ModalityData:
    v = np.asarray(values, dtype=np.float32)
    present = np.isfinite(v).any(axis=1) if present is None else np.asarray(present, dtype=bool)
    return ModalityData(TAB, present, v, None)


# ------------------------------------------------------------------ batch.py


def test_tabular_columns_are_z_scored_with_the_training_rows_observed_values():
    nan = np.nan
    vals = [[1.0, 10.0, 5.0], [3.0, nan, 5.0], [nan, 30.0, 5.0], [5.0, 20.0, 5.0],
            [100.0, 1000.0, 7.0]]  # row 4: a test row, far away
    site = _site({"clin": _tab(vals)})
    train = np.array([0, 1, 2, 3])
    st = fit_input_stats(site, train)["clin"]
    # column a over 1, 3, 5; b over 10, 30, 20 (NaN ignored, population std); c constant -> std 1
    np.testing.assert_allclose(st.mean, [3.0, 20.0, 5.0], rtol=1e-6)
    np.testing.assert_allclose(st.std, [np.sqrt(8 / 3), np.sqrt(200 / 3), 1.0], rtol=1e-6)
    b = SiteTensors.for_training(site, (TAB,), train).batch(np.arange(5))
    m = b.modalities["clin"]
    expect = (np.where(np.isfinite(vals), vals, 0.0) - [3.0, 20.0, 5.0]) / st.std
    expect = np.where(np.isfinite(vals), expect, 0.0)
    np.testing.assert_allclose(m.values.numpy(), expect, rtol=1e-5, atol=1e-6)
    assert m.mask.tolist() == np.isfinite(vals).tolist()
    assert m.present.tolist() == [True] * 5
    assert m.centre is None  # tabular kinds carry no centre
    assert "clin" not in SiteTensors.for_training(site, (TAB,), train).centres


def test_a_tabular_modality_the_site_lacks_is_all_absent_and_not_expected():
    site = _site({"ct": _tokens(SEQ, [[[1, 2]], [[3, 4]]])}, specs=(SEQ,))
    b = SiteTensors(site, (SEQ, TAB)).batch([1, 0])
    m = b.modalities["clin"]
    assert m.values.shape == (2, 3) and not m.values.any() and not m.mask.any() and not m.present.any()
    assert b.expected.tolist() == [[True, False], [True, False]]


def test_a_token_modality_seen_in_training_is_kept_for_a_test_patient():
    """Stats from training rows with tokens; a test-only patient keeps its tokens standardised by them."""
    site = _site({"ct": _tokens(SEQ, [[[0, 0], [2, 4]], [], [[9, 9]]])})
    t = SiteTensors.for_training(site, (SEQ,), np.array([0, 1]))
    b = t.batch([2])
    # mean (1, 2), std (1, 2) from patient 0's two tokens
    np.testing.assert_allclose(b.modalities["ct"].values[0, 0].numpy(), [8.0, 3.5])
    assert b.modalities["ct"].present.tolist() == [True]


def test_token_modality_no_training_patient_had_has_finite_values_and_is_absent():
    site = _site({"ct": _tokens(SEQ, [[], [], [[1.0, 2.0], [3.0, 5.0]]])})
    t = SiteTensors.for_training(site, (SEQ,), np.array([0, 1]))
    b = t.batch([2])
    ct = b.modalities["ct"]
    assert not ct.present.any()
    assert torch.isfinite(ct.values).all()  # no NaN from the unseen statistics reaches the model


def test_site_centre_is_the_standardised_mean_of_training_patients_summaries():
    # patient summaries: p0 (1, 2) [mean of (0,0),(2,4)], p1 absent, p2 (4, 6); p3 a test row (100, 100)
    site = _site({"ct": _tokens(SEQ, [[[0, 0], [2, 4]], [], [[4, 6]], [[100, 100]]])})
    train = np.array([0, 1, 2])
    stats = fit_input_stats(site, train)
    # tokens (0,0),(2,4),(4,6): mean (2, 10/3)
    np.testing.assert_allclose(stats["ct"].mean, [2.0, 10 / 3], rtol=1e-6)
    centres = fit_site_centres(site, (SEQ, TAB), train, stats)
    assert set(centres) == {"ct"}
    expect = (np.array([2.5, 4.0]) - stats["ct"].mean) / stats["ct"].std
    np.testing.assert_allclose(centres["ct"].numpy(), expect, rtol=1e-5)
    t = SiteTensors.for_training(site, (SEQ,), train)
    np.testing.assert_allclose(t.centres["ct"].numpy(), expect, rtol=1e-5)
    b = t.batch([3, 0])
    assert b.modalities["ct"].centre.shape == (2, 2)
    np.testing.assert_allclose(b.modalities["ct"].centre.numpy(), [expect, expect], rtol=1e-5)
    # raw inputs: the centre is in raw units
    raw = SiteTensors.for_training(site, (SEQ,), train, standardize_embeddings="none")
    np.testing.assert_allclose(raw.centres["ct"].numpy(), [2.5, 4.0], rtol=1e-6)
    np.testing.assert_allclose(raw.batch([0]).modalities["ct"].values[0].numpy(), [[0, 0], [2, 4]])


def test_for_training_passes_its_standardisation_choice_on():
    site = _site({"ct": _tokens(SEQ, [[[0, 0], [2, 4]], [[4, 8]]])})
    per_mod = SiteTensors.for_training(site, (SEQ,), np.array([0, 1]), standardize_embeddings="per_modality")
    st = fit_input_stats(site, np.array([0, 1]), "per_modality")["ct"]
    got = per_mod.batch([1]).modalities["ct"].values[0, 0].numpy()
    np.testing.assert_allclose(got, (np.array([4.0, 8.0]) - st.mean) / st.std, rtol=1e-5)
    assert st.std[0] == st.std[1]


def test_status_labels_and_mask_follow_the_site_and_rows():
    site = _site({"clin": _tab(np.ones((4, 3)))}, status=[1, 0, -1, 1])
    b = SiteTensors(site, (TAB,)).batch([2, 1, 0, 3])
    assert b.status_mask.tolist() == [False, True, True, True]
    assert b.status.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert b.event.tolist() == [0.0, 1.0, 0.0, 1.0]
    assert b.time.tolist() == [12.0, 11.0, 10.0, 13.0]
    assert b.index.tolist() == [2, 1, 0, 3]
    assert len(b) == 4


def test_a_modality_declared_differently_from_the_model_is_refused_naming_site_and_modality():
    site = _site({"ct": _tokens(SEQ, [[[1, 2]], [[3, 4]]])})
    with pytest.raises(ValueError, match=r"site 'h' .*modality 'ct' is declared as sequence/2 but the model "
                                         r"expects sequence/3"):
        SiteTensors(site, (ModalitySpec("ct", "sequence", 3),))


def test_batch_pads_with_zeros_keeps_token_order_and_has_one_slot_when_nobody_has_tokens():
    site = _site({"ct": _tokens(SEQ, [[[1, 2], [3, 4], [5, 6]], [], [[7, 8]]])})
    t = SiteTensors(site, (SEQ,))
    b = t.batch([0, 1, 2]).modalities["ct"]
    assert b.values.shape == (3, 3, 2)
    assert b.values[0].tolist() == [[1, 2], [3, 4], [5, 6]]
    assert b.values[2].tolist() == [[7, 8], [0, 0], [0, 0]]
    assert b.mask.tolist() == [[True] * 3, [False] * 3, [True, False, False]]
    assert b.present.tolist() == [True, False, True]
    empty = t.batch([1]).modalities["ct"]
    assert empty.values.shape == (1, 1, 2) and empty.mask.tolist() == [[False]]


def test_iter_batches_sizes_rows_and_shuffle():
    site = _site({"clin": _tab(np.ones((30, 3)))})
    t = SiteTensors(site, (TAB,))
    idx = np.arange(10, 19)  # 9 rows, not starting at 0
    sizes = [len(b) for b in t.iter_batches(idx, 4)]
    assert sizes == [4, 5]  # trailing single merged
    assert [len(b) for b in t.iter_batches(np.arange(10, 20), 4)] == [4, 4, 2]  # a pair is kept
    assert [len(b) for b in t.iter_batches(idx, 4, drop_last_single=False)] == [4, 4, 1]
    plain = torch.cat([b.index for b in t.iter_batches(idx, 4)]).tolist()
    assert plain == list(range(10, 19))
    g = torch.Generator().manual_seed(0)
    shuffled = torch.cat([b.index for b in t.iter_batches(idx, 4, shuffle=True, generator=g)]).tolist()
    assert sorted(shuffled) == list(range(10, 19)) and shuffled != plain
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0)).numpy()
    assert shuffled == idx[perm].tolist()


def test_input_stats_apply_marks_only_the_unseen_columns():
    st = InputStats(np.array([1.0, 2.0], np.float32), np.array([2.0, 4.0], np.float32),
                    np.array([True, False]))
    out = st.apply(np.array([[3.0, 10.0]], np.float32))
    assert np.isnan(out[0, 0]) and out[0, 1] == pytest.approx(2.0)


# ------------------------------------------------------------------ config.py


def test_range_boundaries_are_inclusive_or_exclusive_as_documented():
    ok = load_config(overrides={
        "train.epochs": 0, "model.n_heads": 1, "model.lambda_align": 0, "train.batch_size": 2,
        "train.val_fraction": 0, "model.dropout": 0, "model.gcs_force_gate": 1.0, "train.grad_clip": 0,
        "train.plateau_factor": 0.999, "train.device": "cuda:1", "model.bag_hidden": "1,1"})
    assert (ok.train.epochs, ok.model.n_heads, ok.train.batch_size, ok.model.gcs_force_gate) == (0, 1, 2, 1.0)
    assert ok.model.bag_hidden == (1, 1) and ok.train.device == "cuda:1"
    for overrides, match in [
        ({"model.align_tau": 0}, r"model.align_tau must be > 0, got 0.0"),
        ({"model.gcs_min_denominator": 0}, r"model.gcs_min_denominator must be > 0"),
        ({"train.plateau_factor": 1.0}, r"train.plateau_factor must be in \(0, 1\)"),
        ({"model.gcs_force_gate": 1.5}, r"model.gcs_force_gate must be none or in \[0, 1\]"),
        ({"model.bag_hidden": "8,4,2"}, r"model.bag_hidden must be two widths >= 1, got \(8, 4, 2\)"),
        ({"train.device": "cuda:0x"}, r"train.device must be auto, cpu, cuda or cuda:<n>"),
        ({"train.weight_decay": "inf"}, r"train.weight_decay must be >= 0, got inf"),
        ({"train.grad_clip": -0.5}, r"train.grad_clip must be >= 0"),
        ({"train.linear_warm_start_pca": -1}, r"train.linear_warm_start_pca must be 0"),
        ({"model.agreement_components": -1}, r"model.agreement_components must be 0 \(off\) or a number"),
        ({"train.cosine_t_max": 0}, r"train.cosine_t_max must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            load_config(overrides=overrides)


def test_words_are_checked_for_every_choice_field():
    for key, bad in [("train.standardize_embeddings", "zscore"), ("model.cox_ties", "exact"),
                     ("model.fusion_mode", "sum"), ("train.optimizer", "sgd"), ("model.unimodal_input", "raw")]:
        with pytest.raises(ValueError, match=rf"config key '{key}': '{bad}' is not one of"):
            load_config(overrides={key: bad})
    assert load_config(overrides={"model.cox_ties": "efron"}).model.cox_ties == "efron"


def test_values_are_coerced_to_each_fields_type():
    cfg = load_config(overrides={"train.lr": "0.002", "train.epochs": "4", "model.bag_hidden": "[16, 8]",
                                 "model.gcs_force_gate": "NULL", "model.use_dce": "no", "model.status_head": 1})
    assert type(cfg.train.lr) is float and cfg.train.lr == 0.002
    assert type(cfg.train.epochs) is int and cfg.train.epochs == 4
    assert cfg.model.bag_hidden == (16, 8) and all(type(x) is int for x in cfg.model.bag_hidden)
    assert cfg.model.gcs_force_gate is None and cfg.model.use_dce is False and cfg.model.status_head is True
    assert load_config(overrides={"model.gcs_force_gate": " None "}).model.gcs_force_gate is None
    for overrides, match in [({"model.use_dce": 2}, "not a boolean: 2"),
                             ({"model.n_heads": True}, "not a number: True"),
                             ({"model.gcs_force_gate": False}, "not a number: False"),
                             ({"train.epochs": 2.5}, "not an integer: 2.5"),
                             ({"model.fusion_mode": 3}, "not a word: 3")]:
        with pytest.raises(ValueError, match=match):
            load_config(overrides=overrides)
    assert parse_bool("Off", "k") is False and parse_bool("YES", "k") is True
    with pytest.raises(ValueError, match="k: not a boolean: 'nope'"):
        parse_bool("nope", "k")
    assert parse_int("3.0", "k") == 3
    for bad in ("2.5", True, "x"):
        with pytest.raises(ValueError, match="k must be an integer"):
            parse_int(bad, "k")


def test_nested_overrides_are_flattened_and_the_input_is_not_changed():
    base = Config()
    out = apply_overrides(base, {"model": {"d_token": 8}, "train": {"lr": 0.5}})
    assert (out.model.d_token, out.train.lr) == (8, 0.5)
    assert (base.model.d_token, base.train.lr) == (128, 1e-3)  # the input config is untouched
    with pytest.raises(KeyError, match=r"unknown config key 'model.d_token.x'"):
        apply_overrides(base, {"model.d_token.x": 1})
    with pytest.raises(KeyError, match=r"unknown config key 'train.nope'; train fields: epochs"):
        apply_overrides(base, {"train": {"nope": 1}})


def test_load_config_layers_defaults_then_yaml_or_preset_then_overrides(tmp_path):
    assert load_config().model.d_token == 64  # defaults.yaml, not the dataclass's 128
    yml = tmp_path / "c.yaml"
    yml.write_text("train:\n  lr: 0.02\n  epochs: 5\n")
    cfg = load_config(yml, {"train.epochs": 9})
    assert (cfg.train.lr, cfg.train.epochs, cfg.model.d_token) == (0.02, 9, 64)
    assert load_config("parachute").model.d_token == 128  # a preset by name
    with pytest.raises(ValueError, match="cannot read config"):
        load_config(tmp_path / "parachute.yaml")  # a missing path with a suffix is not a preset
    with pytest.raises(ValueError, match="train.batch_size must be >= 2"):
        load_config(yml, {"train.batch_size": 1})


def test_cross_field_checks_of_load_config():
    lws = {"train.linear_warm_start": "true", "model.unimodal_risk": "true", "model.unimodal_input": "input"}
    assert load_config(overrides=lws).train.linear_warm_start is True
    with pytest.raises(ValueError, match="exist only with model.unimodal_risk=true and model.unimodal_input=input"):
        load_config(overrides={**lws, "model.unimodal_input": "adapter"})
    with pytest.raises(ValueError, match="train.linear_warm_start_l2 must be a finite penalty > 0, got 0.0"):
        load_config(overrides={**lws, "train.linear_warm_start_l2": 0})
    with pytest.raises(ValueError, match="set train.linear_warm_start=true"):
        load_config(overrides={"model.agreement_components": 3, "train.linear_warm_start": "false"})
    assert load_config(overrides={**lws, "model.agreement_components": 3}).model.agreement_components == 3
    with pytest.raises(ValueError, match="plateau cannot be used with train.refit=true"):
        load_config(overrides={"train.scheduler": "plateau", "train.refit": "true"})
    with pytest.raises(ValueError, match="select_metric=auc needs the status head"):
        load_config(overrides={"train.select_metric": "auc", "model.status_head": "false"})


def test_linear_warm_start_problem_checks_its_own_arguments():
    """Also called by shared_model.warm_start with a config built in code, past load_config's ranges."""
    from shared_model.config import ModelConfig, linear_warm_start_problem

    model = dataclasses.replace(ModelConfig(), unimodal_risk=True, unimodal_input="input")
    assert linear_warm_start_problem(model, 0.5, 0) is None
    assert linear_warm_start_problem(model, 0.0, 16) == (
        "train.linear_warm_start_l2 must be a finite penalty > 0, got 0.0")
    assert "finite penalty > 0" in linear_warm_start_problem(model, float("inf"), 16)
    assert linear_warm_start_problem(model, 0.5, -1).startswith("train.linear_warm_start_pca must be 0")
    assert "unimodal_input=input" in linear_warm_start_problem(
        dataclasses.replace(model, unimodal_input="adapter"), 0.5, 16)


# ------------------------------------------------------------------ runconfig.py


def test_parse_overrides_splits_on_semicolons_and_newlines_and_strips():
    assert parse_overrides(" model.d_token = 8 ;\ntrain.lr=0.5;; model.x_stream_kinds=a=b ") == {
        "model.d_token": "8", "train.lr": "0.5", "model.x_stream_kinds": "a=b"}
    with pytest.raises(ValueError, match="model-overrides: 'train.lr' is not of the form key=value"):
        parse_overrides("model.d_token=8; train.lr")


def test_run_config_defaults_and_values_reach_the_settings():
    s = settings_from_run_config({"min-sites": 1})
    assert (s.num_rounds, s.local_epochs, s.min_sites, s.seed, s.server_optimizer) == (10, 1, 1, 0, "fedavg")
    assert s.proximal_mu == 0.01 and s.config.train.proximal_mu == 0.0 and s.config.train.seed == 0
    assert s.eval_horizons_days == (365.0, 1095.0, 1825.0) and s.eval_risk_groups == 2
    assert (s.eval_time_bins, s.eval_risk_bins, s.split, s.resume) == (512, 512, "default", False)
    assert settings_from_run_config({}).min_sites == 3
    s = settings_from_run_config({"sites": " a ,, b ", "min-sites": "2", "seed": "7", "resume": "off",
                                  "server-optimizer": "fedprox", "proximal-mu": 0.25,
                                  "model-overrides": "model.d_token=8", "eval-horizons-days": "365, 730,",
                                  "eval-risk-groups": 3, "local-epochs": "2.0"})
    assert s.sites == ("a", "b") and s.min_sites == 2 and s.seed == 7 and s.config.train.seed == 7
    assert s.resume is False and s.local_epochs == 2 and s.eval_risk_groups == 3
    assert s.config.train.proximal_mu == 0.25 and s.config.model.d_token == 8
    assert s.eval_horizons_days == (365.0, 730.0) and s.model_overrides == "model.d_token=8"
    d = s.as_dict()
    assert d["sites"] == ["a", "b"] and d["config"]["model"]["d_token"] == 8 and isinstance(d["sites_dir"], str)


def test_run_config_bad_values_are_refused_naming_the_key():
    for rc, match in [
        ({"server-optimizer": "fedsgd"}, "server-optimizer must be one of fedavg, fedprox, fedadam, fedyogi"),
        ({"model-overrides": "train.epochs=3"}, r"train.epochs \(use local-epochs and num-server-rounds\)"),
        ({"num-server-rounds": 0}, "num-server-rounds must be >= 1"),
        ({"min-sites": 0}, "min-sites must be >= 1"),
        ({"eval-risk-groups": 4}, "eval-risk-groups must be 2"),
        ({"seed": "1.5"}, "run config seed must be an integer"),
        ({"eval-horizons-days": "0"}, "run config eval-"),
        ({"server-optimizer": "fedprox", "proximal-mu": "inf"}, "proximal.mu must be"),
        ({"round-timeout": 0}, "round-timeout > 0"),
        ({"node-wait-timeout": -1}, "node-wait-timeout must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            settings_from_run_config({"min-sites": 1, **rc})
    assert settings_from_run_config({"sites": "a,b", "min-sites": 2}).min_sites == 2  # == the site count is fine


# ------------------------------------------------------------------ defects found by the sixth review round


@pytest.mark.parametrize("key", ["server-lr", "round-timeout", "proximal-mu", "eval-horizons-days"])
def test_a_run_config_number_that_is_not_a_number_names_its_key(key):
    """A bare float() used to say only "could not convert string to float: 'abc'"."""
    with pytest.raises(ValueError, match=key):
        settings_from_run_config({"min-sites": 1, key: "abc"})


@pytest.mark.parametrize("key, value", [("server-lr", "nan"), ("server-lr", -0.1), ("server-beta1", 1.0),
                                        ("server-beta2", 1.5), ("server-tau", 0.0)])
def test_server_optimiser_hyper_parameters_are_range_checked_when_read(key, value):
    """They were never checked: fedadam with server-beta1=1 gave NaN global weights after round 1."""
    with pytest.raises(ValueError, match=key):
        settings_from_run_config({"min-sites": 1, "server-optimizer": "fedadam", key: value})


@pytest.mark.parametrize("text", ["- model\n- train\n", "just words\n"])
def test_a_config_yaml_that_is_not_a_mapping_is_refused_naming_the_file(tmp_path, text):
    """It used to raise AttributeError: 'list' object has no attribute 'items'."""
    yml = tmp_path / "bad.yaml"
    yml.write_text(text)
    with pytest.raises(ValueError, match="bad.yaml"):
        load_config(yml)
