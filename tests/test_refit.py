"""``train.refit``: choose the epoch on validation rows, then retrain on fit + validation rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from shared_model.config import TrainConfig
from shared_model.model import build_model
from shared_model.train import TrainPart, carve_validation, train_local, train_selected
from test_model_fixtures import ALL_SPECS, assert_same_weights, make_site, small_cfg, tensors_for
from test_model_fixtures import single_torch_thread  # noqa: F401  (autouse fixture)


@pytest.fixture()
def part() -> TrainPart:
    site = make_site("refit", ALL_SPECS, 40, seed=5)
    fit, val = carve_validation(site.event, np.arange(len(site)), 0.3, seed=0)
    return TrainPart(tensors_for(site), fit, val)


def _cfg(**kw) -> TrainConfig:
    return dataclasses.replace(TrainConfig(), batch_size=8, num_threads=1, min_epochs=1, select_metric="cindex",
                               early_stopping_patience=100, epochs=4, epoch_average=0.7, **kw)


def _build() -> torch.nn.Module:
    return build_model(ALL_SPECS, small_cfg(), seed=0)


def test_without_refit_the_selected_model_is_returned(part: TrainPart) -> None:
    model, res = train_selected(_build, [part], _cfg(), seed=3)
    direct = _build()
    res_direct = train_local(direct, [part], _cfg(), seed=3)
    assert_same_weights(model, direct)
    assert (res.best_epoch, res.best_score) == (res_direct.best_epoch, res_direct.best_score)


def test_refit_trains_a_fresh_model_on_all_rows_for_the_selected_epochs(part: TrainPart) -> None:
    model, res = train_selected(_build, [part], _cfg(refit=True), seed=3)
    selected = _build()
    sel = train_local(selected, [part], _cfg(), seed=3)
    assert (res.best_epoch, res.best_score) == (sel.best_epoch, sel.best_score)
    everyone = np.sort(np.concatenate([part.train_idx, part.val_idx]))
    expected = _build()
    again = train_local(expected, [TrainPart(part.tensors, everyone)], _cfg(), epochs=sel.best_epoch,
                        early_stopping=False, seed=3)
    assert again.epochs_run == sel.best_epoch and res.patients == len(everyone)
    assert_same_weights(model, expected)
    # the refit saw the validation patients too, so it differs from the selected model
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), selected.state_dict().values())
               if a.dtype.is_floating_point)


def test_refit_without_validation_rows_returns_the_trained_model(part: TrainPart) -> None:
    no_val = TrainPart(part.tensors, part.train_idx)
    model, res = train_selected(_build, [no_val], _cfg(refit=True), seed=3)
    direct = _build()
    train_local(direct, [no_val], _cfg(), seed=3)
    assert_same_weights(model, direct)
    assert res.best_epoch == res.epochs_run == 4


def test_auto_selects_on_cindex_when_the_model_has_no_status_head(part: TrainPart) -> None:
    """Validation rows with status labels, but no status head to score them: auto must not pick
    AUC (undefined every epoch, so nothing would ever be selected)."""
    assert bool(part.tensors.status_mask[part.val_idx].any())
    auto = dataclasses.replace(_cfg(), select_metric="auto")
    with_head = train_local(_build(), [part], auto, seed=3)
    assert with_head.selection_metric == "auc"
    headless = build_model(ALL_SPECS, small_cfg(status_head=False), seed=0)
    res = train_local(headless, [part], auto, seed=3)
    assert res.selection_metric == "cindex" and res.best_score is not None
