"""Configuration parsing, atomic checkpoints, validation carving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from shared_model.config import load_config
from shared_model.runconfig import parse_overrides, settings_from_run_config
from shared_model.train import carve_validation


def test_defaults_come_from_the_papers():
    cfg = load_config()
    # AdamW, wd 0.01, batch 16 (PARACHUTE); lr 1e-3 is a documented deviation
    assert cfg.train.optimizer == "adamw" and cfg.train.lr == 0.001
    assert cfg.train.weight_decay == 0.01 and cfg.train.batch_size == 16
    assert load_config("parachute").train.lr == 0.005  # the authors' exact settings
    haf = load_config("haf").train
    assert (haf.optimizer, haf.lr, haf.weight_decay, haf.scheduler) == ("adam", 1e-4, 1e-5, "plateau")
    assert cfg.model.topk == 16 and cfg.model.n_heads == 4 and cfg.model.lambda_pd == 0.01
    assert cfg.model.lambda_mono == 0.1
    # Polyak averaging over epochs is our documented deviation; the presets keep the papers' plain weights
    assert cfg.train.epoch_average == 0.8
    assert load_config("parachute").train.epoch_average == 0.0 and haf.epoch_average == 0.0


def test_overrides_are_typed_and_unknown_keys_rejected(tmp_path: Path):
    cfg = load_config(overrides={"model.use_gcs": "false", "train.lr": "1e-3", "train.epochs": 7})
    assert cfg.model.use_gcs is False and cfg.train.lr == 1e-3 and cfg.train.epochs == 7
    with pytest.raises(KeyError, match="model.nope"):
        load_config(overrides={"model.nope": 1})
    with pytest.raises(ValueError, match="train.epochs"):
        load_config(overrides={"train.epochs": "many"})
    # a list on the command line: "a,b" or YAML-style "[a, b]" (quotes allowed)
    for text in ("vector,bag", "[vector, bag]", "['vector', \"bag\"]"):
        assert load_config(overrides={"model.x_stream_kinds": text}).model.x_stream_kinds == ("vector", "bag")
    assert load_config(overrides={"model.bag_hidden": "[16, 8]"}).model.bag_hidden == (16, 8)
    yml = tmp_path / "c.yaml"
    yml.write_text("model:\n  d_token: 64\n")
    assert load_config(yml).model.d_token == 64
    with pytest.raises(ValueError, match=str(tmp_path / "missing.yaml")):
        load_config(tmp_path / "missing.yaml")


def test_run_config_parsing():
    s = settings_from_run_config({
        "sites": "a, b", "min-sites": 2, "num-server-rounds": 3, "server-optimizer": "fedprox", "proximal-mu": 0.5,
        "model-overrides": "model.use_dce=false; train.lr=0.01", "eval-horizons-days": "365,730",
    })
    assert s.sites == ("a", "b") and s.num_rounds == 3
    assert s.config.train.proximal_mu == 0.5 and s.config.model.use_dce is False
    assert s.config.train.lr == 0.01 and s.eval_horizons_days == (365.0, 730.0)
    s = settings_from_run_config({"server-optimizer": "fedavg", "proximal-mu": 0.5})
    assert s.config.train.proximal_mu == 0.0  # FedProx term only with fedprox
    assert parse_overrides("a.b=1\nc.d = x") == {"a.b": "1", "c.d": "x"}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides("novalue")


def test_checkpoint_round_trip_and_atomicity(tmp_path: Path, monkeypatch):
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    ck = Checkpoint(round=3, arrays=arrays, optimizer_state={"name": "fedadam", "m": {"w": np.ones(2)}},
                    model_spec="[]", settings={"seed": 1}, history=[{"round": 1}])
    save_checkpoint(tmp_path, ck)
    back = load_checkpoint(tmp_path)
    assert back.round == 3 and back.history == [{"round": 1}]
    np.testing.assert_array_equal(back.arrays["w"], arrays["w"])
    np.testing.assert_array_equal(back.optimizer_state["m"]["w"], np.ones(2))

    # a crash while writing leaves the previous checkpoint intact and no temp file
    import torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, Checkpoint(4, arrays, {"name": "fedavg"}, "[]", {}))
    assert load_checkpoint(tmp_path).round == 3
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    assert load_checkpoint(tmp_path / "nothing") is None


def test_corrupt_checkpoint_names_the_file(tmp_path: Path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="checkpoint.pt"):
        load_checkpoint(tmp_path)


def test_validation_is_carved_from_training_rows_only():
    rng = np.random.default_rng(0)
    event = rng.integers(0, 2, 200)
    train = np.arange(0, 160)
    fit, val = carve_validation(event, train, 0.2, seed=3)
    assert set(fit) | set(val) == set(train) and not set(fit) & set(val)
    assert not set(val) & set(range(160, 200))  # never the test rows
    assert abs(len(val) - 32) <= 2
    assert abs(event[val].mean() - event[train].mean()) < 0.05  # stratified
    fit2, val2 = carve_validation(event, train, 0.2, seed=3)
    np.testing.assert_array_equal(val, val2)


@pytest.mark.parametrize("overrides, match", [
    ({"train.select_metric": "cindx"}, "'cindx' is not one of auto, cindex, auc, loss"),
    ({"model.fusion_mode": "sum"}, "'sum' is not one of attention, concat"),
    ({"model.gcs_force_gate": "abc"}, "model.gcs_force_gate"),
    ({"model.use_gcs": 2.5}, "not a boolean: 2.5"),
    ({"train.epochs": True}, "not a number: True"),
    ({"train.device": "gpu"}, "train.device must be auto, cpu, cuda or cuda:<n>, got 'gpu'"),
    ({"train.scheduler": "plateau"}, "plateau cannot be used with train.refit=true"),
    ({"train.device": "cuda:abc"}, "train.device must be"),
    ({"train.device": None}, "config key 'train.device': not a word: None"),
    ({"train.lr": "0"}, r"train.lr must be > 0, got 0.0"),
    ({"train.lr": "nan"}, r"train.lr must be > 0, got nan"),
    ({"train.batch_size": 1}, r"train.batch_size must be >= 2"),
    ({"train.val_fraction": 1.5}, r"train.val_fraction must be in \[0, 1\)"),
    ({"train.val_fraction": -0.2}, r"train.val_fraction must be in \[0, 1\)"),
    ({"train.epochs": -1}, r"train.epochs must be >= 0"),
    ({"train.epoch_average": 1.0}, r"train.epoch_average must be 0 \(off\) or in \(0, 1\)"),
    ({"train.num_threads": -2}, r"train.num_threads must be >= 0"),
    ({"model.dropout": 1.5}, r"model.dropout must be in \[0, 1\)"),
    ({"model.n_heads": 0}, r"model.n_heads must be >= 1"),
    ({"model.bag_hidden": "64"}, r"model.bag_hidden must be two widths >= 1, got \(64,\)"),
    ({"train.select_metric": "auc", "model.status_head": False}, "select_metric=auc needs the status head"),
])
def test_config_values_are_checked_when_loaded(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(overrides=overrides)


def test_an_optional_number_can_be_set_and_unset():
    from shared_model.config import apply_overrides

    gated = load_config(overrides={"model.gcs_force_gate": "0.5"})
    assert gated.model.gcs_force_gate == 0.5
    assert apply_overrides(gated, {"model.gcs_force_gate": "none"}).model.gcs_force_gate is None
    assert load_config(overrides={"train.scheduler": "plateau", "train.refit": "false"}).train.scheduler == "plateau"


def test_a_federated_run_refuses_overrides_it_would_ignore():
    from shared_model.runconfig import settings_from_run_config

    with pytest.raises(ValueError, match=r"train.seed \(set the run config's seed\); train.refit"):
        settings_from_run_config({"model-overrides": "train.seed=3; train.refit=false"})
    assert settings_from_run_config({"model-overrides": "train.lr=0.01"}).config.train.lr == 0.01


def test_a_set_value_reads_as_its_yaml_twin(tmp_path: Path):
    """--set strings and YAML values give the same config ("3.0" is YAML's 3.0, "on" YAML's on)."""
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("train:\n  epochs: 3.0\n  refit: on\n  seed: 1.0\n")
    from_yaml = load_config(yaml_file)
    from_set = load_config(overrides={"train.epochs": "3.0", "train.refit": "on", "train.seed": "1.0"})
    assert (from_yaml.train.epochs, from_yaml.train.refit, from_yaml.train.seed) == (3, True, 1)
    assert (from_set.train.epochs, from_set.train.refit, from_set.train.seed) == (3, True, 1)
    assert load_config(overrides={"train.refit": "off"}).train.refit is False
    with pytest.raises(ValueError, match="not an integer: '3.5'"):
        load_config(overrides={"train.epochs": "3.5"})


def test_directly_built_configs_are_range_checked_too():
    import dataclasses

    from shared_model.model import build_model
    from shared_model.specs import ModalitySpec
    from shared_model.train import train_local

    cfg = load_config()
    with pytest.raises(ValueError, match=r"model.dropout must be in \[0, 1\)"):
        build_model([ModalitySpec("lab", "tabular", 3)], dataclasses.replace(cfg.model, dropout=1.0))
    model = build_model([ModalitySpec("lab", "tabular", 3)], cfg.model)
    with pytest.raises(ValueError, match="train.lr must be > 0"):
        train_local(model, [], dataclasses.replace(cfg.train, lr=0.0))


@pytest.mark.parametrize("rc, match", [
    ({"local-epochs": 0}, "local-epochs must be >= 1"),
    ({"num-server-rounds": 2.7}, "num-server-rounds must be an integer, got 2.7"),
    ({"resume": "maybe"}, "resume: not a boolean"),
    ({"server-optimizer": "fedprox", "proximal-mu": 0.0}, "proximal-mu must be > 0 with server-optimizer=fedprox"),
    ({"model-overrides": "train.proximal_mu=0.5"}, "set the run config's proximal-mu"),
    ({"sites": "a,b", "min-sites": 3}, "min-sites=3 but the run config lists only 2 sites"),
    ({"round-timeout": -1.0}, "round-timeout > 0"),
    ({"eval-horizons-days": "365,9000"}, "run config eval-\\*: td-AUC horizon 9000.0 days is outside"),
    ({"model-overrides": "train.lr=-1"}, "train.lr must be > 0"),
])
def test_run_config_values_are_checked_when_read(rc, match):
    with pytest.raises(ValueError, match=match):
        settings_from_run_config({"min-sites": 1, **rc})


def test_resume_false_is_false():
    assert settings_from_run_config({"resume": "false"}).resume is False
    assert settings_from_run_config({"resume": "true"}).resume is True
    assert settings_from_run_config({"resume": False}).resume is False


def test_resume_refuses_settings_that_change_what_rounds_compute():
    from server.checkpoint import resume_problems

    old = settings_from_run_config({"sites": "a,b", "min-sites": 2, "split": "default", "seed": 0})
    sites = {"a": {"split": "default", "n_train": 30, "n_test": 10, "n_patients": 40}}
    ckpt = Checkpoint(round=1, arrays={}, optimizer_state={}, model_spec="[]", settings=old.as_dict(), sites=sites)
    same = settings_from_run_config({"sites": "a,b", "min-sites": 2, "num-server-rounds": 20,
                                     "round-timeout": 60.0, "model-overrides": "train.num_threads=1"})
    assert resume_problems(ckpt, same.as_dict(), sites) == []
    other = settings_from_run_config({"sites": "a,b", "min-sites": 2, "split": "fold_cv=1", "seed": 7,
                                      "local-epochs": 3})
    problems = resume_problems(ckpt, other.as_dict(), {"a": {**sites["a"], "split": "fold_cv=1"}})
    assert [p.split(":")[0] for p in problems] == ["config.train.seed", "local_epochs", "seed", "split",
                                                   "site a split"]
