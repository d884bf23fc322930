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


def test_total_weights_pd_by_lambda_and_pd_is_invariant_to_each_patients_singular_vector_sign():
    """L_GA = mean L_SV + lambda_PD * L_PD (eq. 7), and L_PD (eq. 6) reads |q_i^T q_j|: the
    value equals InfoNCE on |Q Q^T| / tau whatever sign the SVD gives each patient's q_1."""
    torch.manual_seed(3)
    u = torch.randn(7, 3, 8)
    present = torch.ones(7, 3, dtype=torch.bool)
    out = global_alignment_loss(u, present, tau=0.7, lambda_pd=0.25)
    assert math.isclose(float(out.total), float(out.sv) + 0.25 * float(out.pd), rel_tol=1e-6)
    q = torch.linalg.svd(torch.nn.functional.normalize(u, dim=-1).transpose(1, 2), full_matrices=False)[0][:, :, 0]
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0, -1.0])[:, None]
    for qq in (q, q * signs):  # any per-patient sign of q_1 gives the same loss
        logits = (qq @ qq.T).abs() / 0.7
        want = torch.nn.functional.cross_entropy(logits, torch.arange(7))
        assert math.isclose(float(out.pd), float(want), rel_tol=1e-5)
    assert bool(((q @ q.T) < 0).any())  # the test data has anti-aligned pairs, so |.| matters


def test_singular_emphasis_of_a_patient_with_a_repeated_top_singular_value():
    """A patient whose top two singular values coincide (q_1 is used without gradient) still
    gets L_SV = -log softmax(sigma / tau)[0] with sigma sorted descending (eq. 5)."""
    ang = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
    plane = torch.zeros(1, 3, 6)
    plane[0, :, 0], plane[0, :, 1] = torch.cos(ang), torch.sin(ang)  # Gram eigenvalues 1.5, 1.5, 0
    present = torch.ones(1, 3, dtype=torch.bool)
    out = global_alignment_loss(plane, present, tau=0.5, lambda_pd=0.0)
    s = torch.linalg.svdvals(plane[0].T)
    assert float(s[0] - s[1]) < 1e-5 and float(s[2]) < 1e-5
    assert math.isclose(float(out.sv), float(-torch.log_softmax(s / 0.5, 0)[0]), rel_tol=1e-5)


def test_number_of_dropped_modalities_is_uniform_on_1_to_m_minus_1():
    """HAF §3.5: k ~ U{1..M_i-1}; with M_i = 5 each k in 1..4 has probability 1/4."""
    present = torch.ones(4000, 5, dtype=torch.bool)
    keep = random_modality_keep(present, torch.Generator().manual_seed(0))
    k = (present & ~keep).sum(1)
    freq = torch.bincount(k, minlength=5)[1:].double() / len(k)
    assert torch.all((freq - 0.25).abs() < 0.03), freq
