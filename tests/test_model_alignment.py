"""HAF alignment losses, random-modality drop and the monotonicity loss."""

from __future__ import annotations

import math

import torch

from shared_model.alignment import global_alignment_loss, monotonic_fusion_loss, random_modality_keep
from test_model_fixtures import single_torch_thread  # noqa: F401  (autouse fixture)


def test_singular_emphasis_is_lower_for_aligned_modalities():
    torch.manual_seed(0)
    d = 16
    base = torch.randn(4, 1, d)
    aligned = base.expand(4, 3, d) + 0.01 * torch.randn(4, 3, d)
    scattered = torch.randn(4, 3, d)
    present = torch.ones(4, 3, dtype=torch.bool)
    la = global_alignment_loss(aligned, present, tau=0.5)
    ls = global_alignment_loss(scattered, present, tau=0.5)
    assert float(la.sv) < float(ls.sv)
    # exact value for one patient: -log softmax(sigma/tau)[0]
    one = global_alignment_loss(scattered[:1], present[:1], tau=0.5, lambda_pd=0.0)
    u = torch.nn.functional.normalize(scattered[0], dim=-1).T
    s = torch.linalg.svdvals(u)
    assert math.isclose(float(one.sv), float(-torch.log_softmax(s / 0.5, 0)[0]), rel_tol=1e-5)


def test_patient_discriminability_is_sign_invariant_and_separates_patients():
    torch.manual_seed(1)
    u = torch.randn(6, 3, 8)
    present = torch.ones(6, 3, dtype=torch.bool)
    a = global_alignment_loss(u, present)
    b = global_alignment_loss(-u, present)  # flips every singular vector's sign
    assert math.isclose(float(a.pd), float(b.pd), rel_tol=1e-5)
    same = global_alignment_loss(u[:1].expand(6, 3, 8).clone(), present)
    assert float(same.pd) > float(a.pd)  # collapsed patients are penalised


def test_mixed_presence_patterns_and_degenerate_cases_give_finite_gradients():
    torch.manual_seed(2)
    u = torch.randn(8, 4, 8, requires_grad=True)
    present = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0], [1, 0, 0, 0],
                            [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1], [1, 0, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        u[1] = torch.eye(4, 8)  # orthonormal columns: all singular values equal
        u[5, 1] = u[5, 0]  # repeated modality vectors
    loss = global_alignment_loss(u, present)
    assert loss.n == 6
    loss.total.backward()
    assert torch.all(torch.isfinite(u.grad))
    assert torch.all(u.grad[3] == 0) and torch.all(u.grad[6] == 0)  # one modality: not aligned
    assert torch.all(u.grad[0, 2:] == 0)  # absent modalities get nothing
    none = global_alignment_loss(u, present & torch.tensor([True, False, False, False]))
    assert none.n == 0 and float(none.total.detach()) == 0.0


def test_random_drop_keeps_at_least_one_and_drops_at_least_one():
    present = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]],
                           dtype=torch.bool).repeat(50, 1)
    keep = random_modality_keep(present, torch.Generator().manual_seed(0))
    kept = (keep & present).sum(1)
    n = present.sum(1)
    assert torch.all(keep[~present])  # absent entries are not "dropped"
    multi = n >= 2
    assert torch.all(kept[multi] >= 1) and torch.all(kept[multi] <= n[multi] - 1)
    assert torch.all(kept[~multi] == n[~multi])
    # k ~ U{1..M-1}: with 5 present modalities every k in 1..4 occurs
    assert set((n - kept)[0::4].tolist()) == {1, 2, 3, 4}
    again = random_modality_keep(present, torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)


def test_monotonicity_loss_eq_10_11():
    lf = torch.tensor(2.0, requires_grad=True)
    lp = torch.tensor(1.5, requires_grad=True)
    out = monotonic_fusion_loss(lf, lp, 0.1)
    assert out.violated and math.isclose(float(out.total.detach()), 2.0 + 1.5 + 0.1 * 0.5, rel_tol=1e-6)
    out.total.backward()
    assert math.isclose(float(lf.grad), 1.1, rel_tol=1e-6) and math.isclose(float(lp.grad), 0.9, rel_tol=1e-6)
    ok = monotonic_fusion_loss(torch.tensor(1.0), torch.tensor(1.5), 0.1)
    assert not ok.violated and float(ok.mono) == 0.0
