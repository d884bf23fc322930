"""Polyak averaging of the weights over epochs (``train.epoch_average``) in ``train_local``."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from shared_model.config import TrainConfig
from shared_model.model import build_model
from shared_model.train import EpochAverage, TrainPart, carve_validation, train_local, validation_score
from test_model_fixtures import ALL_SPECS, assert_same_weights, make_site, small_cfg, tensors_for
from test_model_fixtures import single_torch_thread  # noqa: F401  (autouse fixture)


@pytest.fixture()
def part() -> TrainPart:
    site = make_site("avg", ALL_SPECS, 40, seed=3)
    return TrainPart(tensors_for(site), np.arange(len(site)))


def _cfg(**kw) -> TrainConfig:
    return dataclasses.replace(TrainConfig(), batch_size=8, num_threads=1, **kw)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_returned_weights_are_the_average_of_the_epochs(part: TrainPart) -> None:
    model = build_model(ALL_SPECS, small_cfg(), seed=0)
    snapshots = []
    train_local(model, [part], _cfg(epoch_average=0.5), epochs=3, early_stopping=False,
                epoch_callback=lambda ep, rec: snapshots.append(None))
    # the same run without averaging gives the per-epoch weights w1, w2, w3
    plain = build_model(ALL_SPECS, small_cfg(), seed=0)
    per_epoch = []
    train_local(plain, [part], _cfg(), epochs=3, early_stopping=False,
                epoch_callback=lambda ep, rec: per_epoch.append(_weights(plain)))
    assert len(snapshots) == len(per_epoch) == 3
    got = model.state_dict()
    for name, w1 in per_epoch[0].items():
        if not w1.dtype.is_floating_point:
            continue
        expected = 0.5 * (0.5 * w1 + 0.5 * per_epoch[1][name]) + 0.5 * per_epoch[2][name]
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(got[k], per_epoch[2][k]) for k in got if got[k].dtype.is_floating_point)


def test_one_epoch_returns_the_trained_weights(part: TrainPart) -> None:
    """A federated round of one local epoch is unchanged by the option."""
    a = build_model(ALL_SPECS, small_cfg(), seed=0)
    b = copy.deepcopy(a)
    train_local(a, [part], _cfg(epoch_average=0.8), epochs=1, early_stopping=False)
    train_local(b, [part], _cfg(), epochs=1, early_stopping=False)
    assert_same_weights(a, b)


def test_selection_restores_the_best_averaged_weights(part: TrainPart) -> None:
    site = part.tensors.site
    fit, val = carve_validation(site.event, np.arange(len(site)), 0.3, seed=0)
    p = TrainPart(part.tensors, fit, val)
    kw = dict(min_epochs=1, select_metric="cindex", early_stopping_patience=100)
    plain = build_model(ALL_SPECS, small_cfg(), seed=0)
    per_epoch = []
    train_local(plain, [p], _cfg(**kw), epochs=4,
                epoch_callback=lambda ep, rec: per_epoch.append(_weights(plain)))
    model = build_model(ALL_SPECS, small_cfg(), seed=0)
    res = train_local(model, [p], _cfg(epoch_average=0.7, **kw), epochs=4)
    assert 1 <= res.best_epoch <= 4 and res.best_score is not None
    got = model.state_dict()
    for name, w in per_epoch[0].items():
        if not w.dtype.is_floating_point:
            continue
        avg = w.clone()
        for snap in per_epoch[1 : res.best_epoch]:
            avg = 0.7 * avg + 0.3 * snap[name]
        torch.testing.assert_close(got[name], avg, rtol=1e-5, atol=1e-6, msg=name)
    assert validation_score(model, [p], "cindex")[1] == pytest.approx(res.best_score, abs=1e-12)


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5])
def test_bad_decay_is_refused(part: TrainPart, decay: float) -> None:
    with pytest.raises(ValueError, match="train.epoch_average"):
        train_local(build_model(ALL_SPECS, small_cfg(), seed=0), [part], _cfg(epoch_average=decay), epochs=1)
    with pytest.raises(ValueError, match="train.epoch_average"):
        EpochAverage(torch.nn.Linear(2, 2), decay)
