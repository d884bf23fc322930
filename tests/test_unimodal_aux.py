"""Unimodal auxiliary losses (``model.unimodal_aux``): per-modality heads on undetached encoders."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from shared_model.model import build_model
from shared_model.objective import _task, training_step
from test_model_fixtures import ALL_SPECS, make_site, small_cfg, tensors_for
from test_model_fixtures import single_torch_thread  # noqa: F401  (autouse fixture)


def _grads_after_step(model, batch, weight: float) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Gradients of one training step with aux weight ``weight`` (lr 0: weights unchanged)."""
    m = copy.deepcopy(model)
    m.cfg = dataclasses.replace(m.cfg, unimodal_aux=weight)
    torch.manual_seed(0)  # dropout masks
    stats = training_step(m, batch, torch.optim.SGD(m.parameters(), lr=0.0), rng=torch.Generator().manual_seed(0))
    return {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}, stats


def test_aux_heads_built_only_when_asked_and_grouped_with_their_encoder():
    plain = build_model(ALL_SPECS, small_cfg(), seed=0)
    assert all(plain.encoders[s.name].aux_head is None for s in ALL_SPECS)
    model = build_model(ALL_SPECS, small_cfg(unimodal_aux=0.5), seed=0)
    groups = model.parameter_groups()
    for s in ALL_SPECS:
        assert model.encoders[s.name].aux_head is not None
        assert any(k.startswith(f"encoders.{s.name}.aux_head") for k in groups[f"encoder/{s.name}"])
    assert set(groups) == set(plain.parameter_groups())  # no new group for the server


@pytest.mark.parametrize("use_gcs", [False, True])
def test_aux_weight_scales_only_the_encoders_own_loss(use_gcs):
    """The aux term is linear in its weight and reaches only the encoders (adapter + aux head):
    fusion, missing tokens and heads get the same gradient at every weight; the encoders'
    gradient moves by the same amount from weight 1 to 2 as from 2 to 3; the reported aux loss
    is the weight times the sum of the per-modality task losses of the aux heads."""
    model = build_model(ALL_SPECS, small_cfg(unimodal_aux=1.0, random_drop=False, use_gcs=use_gcs), seed=0)
    batch = tensors_for(make_site("full", ALL_SPECS, 16, seed=3)).batch(np.arange(16))
    g1, s1 = _grads_after_step(model, batch, 1.0)
    g2, s2 = _grads_after_step(model, batch, 2.0)
    g3, _ = _grads_after_step(model, batch, 3.0)
    assert s1["aux"] > 0 and s2["aux"] == pytest.approx(2 * s1["aux"], rel=1e-6)
    moved = 0
    for k in g1:
        if k.startswith("encoders."):
            torch.testing.assert_close(g3[k] - g2[k], g2[k] - g1[k], atol=1e-6, rtol=1e-4)
            moved += int(not torch.allclose(g2[k], g1[k]))
        else:
            torch.testing.assert_close(g2[k], g1[k], atol=1e-7, rtol=1e-6)
    assert moved > 0
    for s in ALL_SPECS:  # the adapters themselves receive the aux gradient, not only the aux heads
        adapter_keys = [k for k in g1 if k.startswith(f"encoders.{s.name}.adapter.")]
        assert any(not torch.allclose(g2[k], g1[k]) for k in adapter_keys), s.name

    # the reported aux loss, by hand from the aux heads' outputs
    m = copy.deepcopy(model)
    m.train()
    torch.manual_seed(0)
    enc = m.encode(batch)
    total = sum(float(_task(m, e.aux_risk, e.aux_status, batch, e.rows).total.detach()) for e in enc.values())
    assert s1["aux"] == pytest.approx(total, rel=1e-5)


def test_aux_does_not_change_prediction_path():
    """Aux heads add parameters but the fused risk of a model with them equals that of the
    same weights without them (eval mode: the aux heads never feed the fusion)."""
    with_aux = build_model(ALL_SPECS, small_cfg(unimodal_aux=1.0), seed=0)
    without = build_model(ALL_SPECS, small_cfg(), seed=0)
    state = {k: v for k, v in with_aux.state_dict().items() if ".aux_head." not in k}
    without.load_state_dict(state)
    batch = tensors_for(make_site("full", ALL_SPECS, 12, seed=4)).batch(np.arange(12))
    with_aux.eval(), without.eval()
    torch.testing.assert_close(with_aux(batch).risk, without(batch).risk)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_bad_aux_weight_is_refused(bad):
    with pytest.raises(ValueError, match="unimodal_aux"):
        build_model(ALL_SPECS, small_cfg(unimodal_aux=bad), seed=0)
