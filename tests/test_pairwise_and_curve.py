"""The pairwise CoxPH baseline (bilinear reader) and the validation-curve driver."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from shared_model.baselines import ConcatFeatures, fit_coxph
from shared_model.config import load_config
from shared_model.train import carve_validation, model_builder, train_local, validation_score, warm_started
from simulations.cv import make_folds, run_classical, training_parts
from simulations.validation_curve import fold_curve
from sites import load_site, union_specs
from sites.synthetic import write_synthetic_site

MODS = (("ct", "sequence", 6), ("slide", "vector", 5), ("lab", "tabular", 3))
SMALL = {"model.d_inter": 16, "model.d_token": 8, "model.hazard_hidden": 16, "model.dce_dim": 8,
         "model.n_heads": 2, "train.batch_size": 8, "train.num_threads": 1}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairwise")
    return load_site(write_synthetic_site(root, "s", 48, modalities=MODS, seed=3, n_folds=3))


def test_pairwise_features_are_the_products_of_the_two_token_modalities_scores(site):
    rows = np.arange(len(site))
    specs = site.spec.modalities
    plain = ConcatFeatures(specs, pca_components=3).fit([(site, rows)])
    pair = ConcatFeatures(specs, pca_components=3, pairwise=True).fit([(site, rows)])
    x, xp = plain.transform(site, rows), pair.transform(site, rows)
    cols = pair.columns()
    assert len(cols) == xp.shape[1] == x.shape[1] + 9  # tabular lab is never paired
    assert cols[-9:] == [f"ct:pc{i}*slide:pc{j}" for i in range(3) for j in range(3)]
    np.testing.assert_array_equal(xp[:, : x.shape[1]], x)  # the plain features come first, unchanged
    ct = x[:, plain.columns().index("ct:pc0"):][:, :3]
    slide = x[:, plain.columns().index("slide:pc0"):][:, :3]
    np.testing.assert_allclose(xp[:, -9:], (ct[:, :, None] * slide[:, None, :]).reshape(-1, 9))
    lacking = ~site.modalities["ct"].present | ~site.modalities["slide"].present
    assert lacking.any() and np.isnan(xp[lacking, -9:]).all() and np.isfinite(xp[~lacking, -9:]).all()


def test_coxph_pairwise_is_penalised_coxph_on_the_pairwise_design(site):
    fold = make_folds([site], "fold_cv")[0]
    risk, prob, _ = run_classical("coxph-pairwise", {"s": site}, fold, seed=0)
    feats = ConcatFeatures(site.spec.modalities, pairwise=True).fit([(site, fold.train["s"])])
    model = fit_coxph(feats.transform(site, fold.train["s"]), site.time[fold.train["s"]],
                      site.event[fold.train["s"]])
    np.testing.assert_allclose(risk["s"], model.risk(feats.transform(site, fold.test["s"])), rtol=1e-10)
    plain, _, _ = run_classical("coxph", {"s": site}, fold, seed=0)
    assert not np.allclose(plain["s"], risk["s"])


@pytest.mark.parametrize("warm", [False, True])
def test_validation_curve_scores_the_start_and_every_epoch_on_training_patients_only(site, warm):
    cfg = load_config(None, {**SMALL, "train.linear_warm_start": warm, "train.select_metric": "cindex",
                             "train.linear_warm_start_pca": 2})
    fold = make_folds([site], "fold_cv")[1]
    curve = fold_curve({"s": site}, fold, cfg, epochs=3, seed=0)
    assert curve["fold"] == 1 and curve["metric"] == "cindex"
    assert len(curve["val"]) == 4 and len(curve["train_loss"]) == 3
    # the validation rows are carved from the fold's training patients, exactly as oncofed cv does
    fit, val = carve_validation(site.event, fold.train["s"], cfg.train.val_fraction, 0, status=site.status)
    assert set(val) <= set(fold.train["s"]) and not set(val) & set(fold.test["s"])
    # the same run by hand: scores after epochs 1..3 are train_local's validation history
    train_cfg = dataclasses.replace(cfg.train, min_epochs=1, early_stopping_patience=4)
    specs, parts, _ = training_parts({"s": site}, fold, cfg, 0)
    np.testing.assert_array_equal(parts[0].val_idx, val)
    model = warm_started(model_builder(specs, cfg, 0)(), parts, train_cfg)
    assert curve["val"][0] == pytest.approx(validation_score(model, parts, "cindex")[1])
    hist = train_local(model, parts, train_cfg, epochs=3, seed=0).history
    assert curve["val"][1:] == pytest.approx([h["val_cindex"] for h in hist])
    assert union_specs([site.spec]) == specs


def test_validation_curve_refuses_zero_epochs(site):
    with pytest.raises(ValueError, match="at least 1"):
        fold_curve({"s": site}, make_folds([site], "fold_cv")[0], load_config(None, SMALL), epochs=0, seed=0)


def test_validation_curve_names_the_fold_when_its_validation_score_is_undefined(site, monkeypatch):
    """No comparable validation pair (or one status class): a clear error, not a KeyError."""
    import simulations.validation_curve as vc

    monkeypatch.setattr(vc, "validation_score", lambda model, parts, metric: ("cindex", None))
    with pytest.raises(ValueError, match="fold 0: the validation cindex is undefined.*val_fraction"):
        fold_curve({"s": site}, make_folds([site], "fold_cv")[0], load_config(None, SMALL), epochs=1, seed=0)


def test_validation_curve_cli_writes_the_curves_and_what_is_simulated(site, tmp_path):
    import json

    from simulations.validation_curve import main
    from sites.types import simulated_data_note

    out = tmp_path / "curve.json"
    main(["--sites-dir", str(site.root.parent), "--sites", "s", "--folds", "fold_cv", "--fold-ids", "0",
          "--label", "event", "--epochs", "2", "--out", str(out),
          *[a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]])
    doc = json.loads(out.read_text())
    assert doc["sites"] == ["s"] and [f["fold"] for f in doc["folds"]] == [0] and len(doc["mean"]) == 3
    assert doc["simulated"] == simulated_data_note({"s": site.spec.cohort} if site.spec.simulated else {})
