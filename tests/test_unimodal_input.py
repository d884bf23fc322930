"""``model.unimodal_input='input'``: the late-fusion residual read from each modality's raw
summary (wide & deep) — log-risk = hazard head(f) + sum_m w_m . s_m(b) + c_m."""

from __future__ import annotations

import pytest
import torch

from shared_model.model import build_model
from shared_model.objective import training_step
from test_model_fixtures import (ALL_SPECS, adamw_step, assert_prediction_independent_of_batch,
                                 assert_risk_is_fused_head_plus, small_cfg)
from test_model_fixtures import mixed_batch as _batch
from test_model_fixtures import single_torch_thread  # noqa: F401  (autouse fixture)

WIDE = dict(unimodal_risk=True, unimodal_input="input")


def _randomise_heads(model, seed=0):
    """The heads start at 0 (beta = 0); give them values so the terms are not trivially 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in model.modality_names:
            for p in model.encoders[name].aux_head.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _by_hand(model, batch):
    """sum_m head_m(summary) patient by patient, the summary written out from the batch."""
    risk = torch.zeros(len(batch))
    status = torch.zeros(len(batch))
    for spec in model.specs:
        mb = batch.modalities[spec.name]
        head = model.encoders[spec.name].aux_head
        for b in range(len(batch)):
            if spec.kind == "tabular":
                has = bool(mb.present[b])
                obs = mb.mask[b].float()
                summary = torch.cat([mb.values[b] * obs, obs])
            else:
                valid = mb.mask[b].bool()
                has = bool(mb.present[b]) and bool(valid.any())
                summary = mb.values[b][valid].mean(dim=0) if has else None
            if not has:
                summary = model.missing[spec.name].input
            r, s = head(summary[None, :])
            risk[b] += r[0]
            status[b] += s[0]
    return risk, status


@torch.no_grad()
def test_prediction_is_fused_head_plus_linear_terms_on_raw_summaries():
    model = build_model(ALL_SPECS, small_cfg(**WIDE), seed=0)
    _randomise_heads(model)
    batch = _batch()
    add_r, add_s = _by_hand(model, batch)
    assert float(add_r.std()) > 0
    assert_risk_is_fused_head_plus(model, batch, add_r, add_s)


def test_heads_read_the_input_width_start_at_zero_and_learn():
    """Each head is linear on the modality's input summary (D for tokens, 2C for tabular),
    starts at beta = 0 (so the untrained prediction is the fused head's), and is trained."""
    model = build_model(ALL_SPECS, small_cfg(**WIDE), seed=0)
    for spec in ALL_SPECS:
        want = 2 * spec.dim if spec.kind == "tabular" else spec.dim
        assert model.encoders[spec.name].aux_head.net.in_features == want
        assert model.missing[spec.name].input.shape == (want,)
        assert f"missing.{spec.name}.input" in model.parameter_groups()[f"missing-input/{spec.name}"]
    batch = _batch()
    model.eval()
    with torch.no_grad():
        out = model(batch)
        torch.testing.assert_close(out.risk, model.heads_forward(out.fused)[0])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    training_step(model, batch, opt, rng=torch.Generator().manual_seed(0))
    for spec in ALL_SPECS:
        assert float(model.encoders[spec.name].aux_head.net.weight.detach().abs().sum()) > 0, spec.name
    on_adapter = build_model(ALL_SPECS, small_cfg(unimodal_risk=True), seed=0)
    # one group more per modality: the input-level token, weighted apart (shared_model.groups)
    extra = {f"missing-input/{s.name}" for s in ALL_SPECS}
    assert set(model.parameter_groups()) == set(on_adapter.parameter_groups()) | extra
    assert on_adapter.missing["ct"].input is None  # the input-level token exists only in this mode


@pytest.mark.parametrize("overrides, words", [
    (dict(unimodal_input="raw"), "unimodal_input must be one of"),
    # the refusal, and how to run without the linear terms
    (dict(unimodal_input="input"), "needs model.unimodal_risk=true.*together with model.unimodal_input=adapter"),
    (dict(unimodal_input="input", unimodal_risk=True, detach_stages=True), "detach_stages=false"),
    (dict(unimodal_input="adapter", unimodal_risk=True, detach_stages=True), "task loss would train the adapters"),
    (dict(unimodal_l2=-1.0), "unimodal_l2 must be a finite penalty"),
    (dict(unimodal_l2=float("nan")), "unimodal_l2 must be a finite penalty"),
    (dict(unimodal_l2=0.5), "penalises the per-modality heads"),
])
def test_bad_settings_are_refused(overrides, words):
    with pytest.raises(ValueError, match=words):
        build_model(ALL_SPECS, small_cfg(**overrides), seed=0)


def test_gate_forced_to_zero_equals_plain_step_with_input_heads():
    batch = _batch()
    plain, s_plain = adamw_step(small_cfg(**WIDE, use_gcs=False), batch, _randomise_heads)
    gcs, s_gcs = adamw_step(small_cfg(**WIDE, use_gcs=True, gcs_force_gate=0.0), batch, _randomise_heads)
    assert s_plain["total"] == pytest.approx(s_gcs["total"], rel=1e-6)
    sp, sg = plain.state_dict(), gcs.state_dict()
    for k in sp:
        torch.testing.assert_close(sg[k], sp[k], atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_patient_prediction_independent_of_batch_with_input_heads():
    model = build_model(ALL_SPECS, small_cfg(**WIDE), seed=0)
    _randomise_heads(model)
    assert_prediction_independent_of_batch(model)


def test_ridge_penalty_adds_lambda_w_to_the_heads_gradient_only():
    """``unimodal_l2`` = lam adds 0.5 lam sum_m ||W_m||^2 to the loss: with SGD (no weight
    decay) the heads' weights move by an extra -lr lam W, biases and the rest not at all."""
    batch = _batch()
    lam, lr = 0.7, 0.05

    def step(l2):
        model = build_model(ALL_SPECS, small_cfg(**WIDE, unimodal_l2=l2, use_gcs=False), seed=0)
        _randomise_heads(model)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        torch.manual_seed(123)  # dropout
        stats = training_step(model, batch, opt, rng=torch.Generator().manual_seed(7))
        return before, model.state_dict(), stats

    b0, a0, s0 = step(0.0)
    b1, a1, s1 = step(lam)
    weights = [k for k in b0 if k.startswith("encoders.") and k.endswith("aux_head.net.weight")]
    assert len(weights) == len(ALL_SPECS)
    assert s0["ridge"] == 0.0
    assert s1["ridge"] == pytest.approx(0.5 * lam * sum(float(b1[k].pow(2).sum()) for k in weights), rel=1e-5)
    assert s1["total"] == pytest.approx(s0["total"] + s1["ridge"], rel=1e-5)
    for k in b0:
        extra = -lr * lam * b1[k] if k in weights else torch.zeros_like(b1[k])
        torch.testing.assert_close(a1[k] - a0[k], extra, atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
