"""Gradient Curvature Steering: exactness of the pieces, gate-0 equivalence, gate training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared_model.gcs import GCSGate, curvature_steering, rademacher, steered_gradient
from shared_model.model import build_model
from shared_model.objective import training_step
from test_model_fixtures import ALL_SPECS, make_site, small_cfg, tensors_for
from test_model_fixtures import single_torch_thread  # noqa: F401  (autouse fixture)


def _batch(n=16, seed=0):
    return tensors_for(make_site("s", ALL_SPECS, n, seed=seed)).batch(np.arange(n))


def _quadratic(scale: torch.Tensor, target: torch.Tensor):
    """L(f) = mean_b 0.5 * sum_i scale_i (f_bi - target_bi)^2: H_bb = diag(scale) / B."""

    def loss(f):
        return (0.5 * scale * (f - target) ** 2).sum(1).mean()

    return loss


def test_hutchinson_curvature_and_steered_gradient_are_exact_for_a_quadratic():
    torch.manual_seed(0)
    b, d = 5, 8
    scale = torch.linspace(0.5, 3.0, d)
    target = torch.randn(b, d)
    loss_fn = _quadratic(scale, target)
    f = torch.randn(b, d, requires_grad=True)
    gate = GCSGate(gamma_init=0.7)
    res = curvature_steering(loss_fn(f), f, [], [], loss_fn, gate, torch.zeros(b),
                             torch.Generator().manual_seed(1), min_denominator=1.0, force_gate=0.5)
    # Rademacher r: r^T diag(s) r = sum(s); patient scale (x B) undoes the 1/B of the mean
    torch.testing.assert_close(res.curvature, torch.full((b,), float(scale.sum())))  # tr(H_bb), eq. 9
    g = scale * (f.detach() - target) / b
    w = 0.5 + 0.5 / (1 + 0.7 * float(scale.sum()))
    torch.testing.assert_close(res.feature_grad, g * w)
    torch.testing.assert_close(res.grad_norm, b * g.norm(dim=1))


def test_denominator_is_bounded_away_from_zero_and_gamma_nonnegative():
    g = torch.ones(3, 4)
    c = torch.tensor([-100.0, 0.0, 1.0])
    out = steered_gradient(g, c, torch.ones(3), torch.tensor(2.0), min_denominator=0.5)
    torch.testing.assert_close(out[:, 0], torch.tensor([2.0, 1.0, 1 / 3]))
    gate = GCSGate(0.1)
    with torch.no_grad():
        gate.gamma_raw.fill_(-50.0)
    assert float(gate.gamma().detach()) >= 0.0
    r = rademacher(torch.Size([1000]), torch.Generator().manual_seed(0), torch.device("cpu"), torch.float32)
    assert set(r.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("lookahead,sign", [(50.0, -1), (0.05, 1)])
def test_lookahead_pushes_gate_towards_damping_only_when_the_step_overshoots(lookahead, sign):
    torch.manual_seed(0)
    b, d = 6, 8
    loss_fn = _quadratic(torch.full((d,), 2.0), torch.zeros(b, d))
    f = torch.randn(b, d, requires_grad=True)
    gate = GCSGate(gamma_init=1.0)
    curvature_steering(loss_fn(f), f, [], [], loss_fn, gate, torch.zeros(b),
                       torch.Generator().manual_seed(1), lookahead=lookahead)
    # dJ/d a0 < 0 -> the optimiser raises omega (more damping) when the plain step overshoots
    assert sign * float(gate.bias.grad) > 0
    assert float(gate.gamma_raw.grad) * sign > 0


def _step(cfg, batch, seed=0):
    model = build_model(ALL_SPECS, cfg, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    torch.manual_seed(123)  # dropout
    stats = training_step(model, batch, opt, rng=torch.Generator().manual_seed(7), grad_clip=5.0)
    return model, stats, torch.random.get_rng_state()


def test_gate_forced_to_zero_equals_plain_step():
    batch = _batch()
    plain, s_plain, rng_plain = _step(small_cfg(use_gcs=False), batch)
    gcs, s_gcs, rng_gcs = _step(small_cfg(use_gcs=True, gcs_force_gate=0.0), batch)
    assert torch.equal(rng_plain, rng_gcs)  # dropout RNG consumed identically
    assert s_plain["total"] == pytest.approx(s_gcs["total"], rel=1e-6)
    assert s_plain["dropped"] > 0 and s_plain["align"] > 0  # drop and alignment active
    sp, sg = plain.state_dict(), gcs.state_dict()
    for k in sp:
        torch.testing.assert_close(sg[k], sp[k], atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # and GCS really steers when the gate is open
    _, s_open, _ = _step(small_cfg(use_gcs=True, gcs_force_gate=1.0, gcs_gamma_init=50.0), batch)
    assert s_open["gate"] == 1.0 and s_open["curvature"] != 0.0


def _grads(cfg, batch) -> dict[str, torch.Tensor]:
    """Every parameter's gradient after one training step (SGD with lr 0: nothing moves)."""
    model = build_model(ALL_SPECS, cfg, seed=0)
    torch.manual_seed(123)  # dropout
    training_step(model, batch, torch.optim.SGD(model.parameters(), lr=0.0), rng=torch.Generator().manual_seed(7))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("gate", [1.0, None])  # forced open, and the learned gate
def test_an_open_gate_steers_the_fusion_gradient_and_leaves_the_heads_plain(gate):
    """Algorithm 1 inside a real training step: the fusion and encoders receive the steered
    feature gradient, the hazard and status heads the plain one (a step that only computed the
    curvature statistics and then used the plain gradient would fail here)."""
    batch = _batch()
    plain = _grads(small_cfg(use_gcs=False), batch)
    steered = _grads(small_cfg(use_gcs=True, gcs_force_gate=gate, gcs_gamma_init=50.0), batch)
    heads = [n for n in plain if n.startswith(("hazard_head.", "status_head."))]
    upstream = [n for n in plain if n.startswith(("fusion.", "encoders."))]
    assert heads and upstream
    for n in heads:
        torch.testing.assert_close(steered[n], plain[n], atol=1e-7, rtol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    moved = [n for n in upstream if not torch.allclose(steered[n], plain[n], atol=1e-7, rtol=1e-4)]
    assert len(moved) > len(upstream) // 2, moved


def test_gate_parameters_and_gamma_are_trained():
    cfg = small_cfg(use_gcs=True)
    model = build_model(ALL_SPECS, cfg, seed=0)
    before = {k: v.clone() for k, v in model.gcs_gate.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = torch.Generator().manual_seed(0)
    batch = _batch()
    stats = training_step(model, batch, opt, rng=rng)
    for name, p in model.gcs_gate.named_parameters():
        assert p.grad is not None and torch.all(p.grad != 0), name
    for _ in range(3):
        stats = training_step(model, batch, opt, rng=rng)
    after = model.gcs_gate.state_dict()
    for k in before:
        assert torch.all(before[k] != after[k]), k
    assert 0.0 < stats["gate"] < 1.0 and stats["gamma"] > 0.0 and stats["lookahead"] > 0.0


@pytest.mark.parametrize(
    "switches",
    [
        dict(status_head=False),
        dict(use_dce=False, random_drop=False, use_alignment=False),
        dict(detach_stages=True, cox_ties="efron"),
        dict(use_gcs=False, detach_stages=True),
    ],
)
def test_training_step_runs_under_every_switch(switches):
    model = build_model(ALL_SPECS, small_cfg(**switches), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stats = training_step(model, _batch(), opt, rng=torch.Generator().manual_seed(0), grad_clip=1.0)
    assert all(np.isfinite(v) for v in stats.values())
    assert (stats["dropped"] > 0) == model.cfg.random_drop
    assert (stats["align"] > 0) == model.cfg.use_alignment
    assert (stats["aux"] > 0) == model.cfg.detach_stages


def test_batch_without_events_or_labels_still_steps():
    batch = _batch()
    batch.event.zero_()
    batch.status_mask.zero_()
    model = build_model(ALL_SPECS, small_cfg(), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stats = training_step(model, batch, opt, rng=torch.Generator().manual_seed(0))
    assert stats["cox"] == 0.0 and stats["bce"] == 0.0 and np.isfinite(stats["total"])
    assert stats["align"] > 0  # the alignment loss still trains the projections


def test_training_step_weights_full_and_dropped_pass_by_eq_11():
    """Without GCS the step's gradient is that of HAF eq. 11, l+ + l- + lambda max(0, l+ - l-):
    (1 + lambda I) grad l+ + (1 - lambda I) grad l-, I = 1[l+ > l-]. Dropout off, so the
    passes are deterministic; grad l+ comes from the step without random drop."""
    batch = _batch(n=24, seed=4)
    lam = 0.4

    def grads(**kw):
        cfg = small_cfg(use_gcs=False, use_alignment=False, dropout=0.0, attn_dropout=0.0, bag_dropout=0.0, **kw)
        model = build_model(ALL_SPECS, cfg, seed=0)
        stats = training_step(model, batch, torch.optim.SGD(model.parameters(), lr=0.0),
                              rng=torch.Generator().manual_seed(0))
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]), stats

    g_full, _ = grads(random_drop=False)
    g_sum, s0 = grads(random_drop=True, lambda_mono=0.0)
    g_lam, s1 = grads(random_drop=True, lambda_mono=lam)
    assert s0["dropped"] > 0 and s1["mono"] > 0  # this batch violates monotonicity (I = 1)
    g_part = g_sum - g_full
    torch.testing.assert_close(g_lam, (1 + lam) * g_full + (1 - lam) * g_part, rtol=1e-4, atol=1e-6)
