"""Cox partial likelihood (Breslow / Efron) and status BCE."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import CoxPHFitter

from shared_model.losses import cox_partial_nll, status_bce, task_loss
from test_model_fixtures import single_torch_thread  # noqa: F401  (autouse fixture)


def _tied_data(seed: int = 0, n: int = 60):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    time = rng.integers(1, 12, size=n).astype(float)  # few distinct days: many ties
    event = (rng.random(n) < 0.7).astype(int)
    return x, time, event


def test_efron_sum_equals_lifelines_partial_log_likelihood():
    x, time, event = _tied_data()
    df = pd.DataFrame(x, columns=["a", "b"]).assign(T=time, E=event)
    cph = CoxPHFitter().fit(df, "T", "E")  # lifelines uses Efron ties
    risk = torch.tensor(x @ cph.params_.values, dtype=torch.float64)
    nll = cox_partial_nll(risk, torch.tensor(time), torch.tensor(event), ties="efron", reduction="sum")
    assert float(nll) == pytest.approx(-cph.log_likelihood_, abs=1e-6)
    # Breslow differs when there are ties
    bres = cox_partial_nll(risk, torch.tensor(time), torch.tensor(event), ties="breslow", reduction="sum")
    assert float(bres) > float(nll) + 1e-3


def test_breslow_equals_efron_without_ties_and_matches_naive_formula():
    rng = np.random.default_rng(1)
    n = 25
    risk = torch.tensor(rng.normal(size=n), dtype=torch.float64)
    time = torch.tensor(rng.permutation(n).astype(float) + 1.0, dtype=torch.float64)
    event = torch.tensor((rng.random(n) < 0.6).astype(float), dtype=torch.float64)
    b = cox_partial_nll(risk, time, event, ties="breslow")
    e = cox_partial_nll(risk, time, event, ties="efron")
    naive = 0.0
    for i in range(n):
        if event[i]:
            naive -= float(risk[i] - torch.logsumexp(risk[time >= time[i]], 0))
    assert float(b) == pytest.approx(float(e), abs=1e-12)
    assert float(b) == pytest.approx(naive / n, abs=1e-10)  # eq. 8: mean over the N patients


def test_weighted_by_event_not_censoring_indicator():
    risk = torch.tensor([0.3, -0.2, 1.0])
    time = torch.tensor([1.0, 2.0, 3.0])
    only_first = cox_partial_nll(risk, time, torch.tensor([1.0, 0.0, 0.0]), reduction="sum")
    expected = -(0.3 - torch.logsumexp(risk, 0))
    assert float(only_first) == pytest.approx(float(expected), abs=1e-6)


def test_no_event_gives_zero_with_gradient_and_is_stable_for_large_risks():
    risk = torch.randn(5, requires_grad=True)
    loss = cox_partial_nll(risk, torch.arange(5.0), torch.zeros(5))
    loss.backward()
    assert float(loss.detach()) == 0.0 and risk.grad is not None and torch.all(risk.grad == 0)
    big = torch.tensor([800.0, 850.0, -900.0, 870.0], requires_grad=True)
    t = torch.tensor([1.0, 1.0, 2.0, 3.0])
    for ties in ("breslow", "efron"):
        loss = cox_partial_nll(big, t, torch.tensor([1.0, 1.0, 1.0, 0.0]), ties=ties)
        (g,) = torch.autograd.grad(loss, big)
        assert torch.isfinite(loss) and torch.all(torch.isfinite(g))
    # shift invariance
    r = torch.randn(6, dtype=torch.float64)
    tt = torch.tensor([3.0, 1, 1, 2, 5, 5], dtype=torch.float64)
    ee = torch.tensor([1.0, 1, 1, 0, 1, 1], dtype=torch.float64)
    for ties in ("breslow", "efron"):
        assert float(cox_partial_nll(r, tt, ee, ties=ties)) == pytest.approx(
            float(cox_partial_nll(r + 123.0, tt, ee, ties=ties)), abs=1e-9)


def test_efron_gradient_matches_finite_differences():
    x, time, event = _tied_data(seed=3, n=15)
    risk = torch.tensor(x[:, 0], dtype=torch.float64, requires_grad=True)
    args = (torch.tensor(time), torch.tensor(event, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda r: cox_partial_nll(r, *args, ties="efron"), (risk,))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="ties"):
        cox_partial_nll(torch.zeros(2), torch.zeros(2), torch.ones(2), ties="exact")
    with pytest.raises(ValueError, match="equal length"):
        cox_partial_nll(torch.zeros(2), torch.zeros(3), torch.ones(2))


def test_status_bce_uses_only_labelled_patients():
    logit = torch.tensor([2.0, -1.0, 0.5], requires_grad=True)
    label = torch.tensor([1.0, 0.0, 0.0])
    mask = torch.tensor([True, False, True])
    loss = status_bce(logit, label, mask)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logit[[0, 2]], label[[0, 2]])
    assert float(loss.detach()) == pytest.approx(float(ref.detach()))
    loss.backward()
    assert logit.grad[1] == 0
    none = status_bce(logit, label, torch.zeros(3, dtype=torch.bool))
    assert float(none.detach()) == 0.0 and none.requires_grad
    t = task_loss(torch.zeros(3), logit, torch.tensor([1.0, 2, 3]), torch.ones(3), label, mask, status_weight=0.5)
    assert float(t.total.detach()) == pytest.approx(float(t.cox) + 0.5 * float(t.bce.detach()))


def test_twice_differentiable_in_float32_for_gcs():
    """Hessian-vector products through both tie methods are finite and exact (float32 inputs)."""
    x, time, event = _tied_data(seed=4, n=20)
    t = torch.tensor(time, dtype=torch.float32)
    e = torch.tensor(event, dtype=torch.float32)
    e[:3] = 0.0
    t[:3] = t.max() + 1.0  # a tie group without events at the end of follow-up
    for ties in ("breslow", "efron"):
        r = torch.tensor(x[:, 0] * 30.0, dtype=torch.float32, requires_grad=True)  # spread > exp range
        (g,) = torch.autograd.grad(cox_partial_nll(r, t, e, ties=ties), r, create_graph=True)
        v = torch.randn(20)
        (hv,) = torch.autograd.grad(g, r, v)
        hess = torch.autograd.functional.hessian(lambda z: cox_partial_nll(z, t.double(), e.double(), ties=ties),
                                                 r.detach().double())
        assert torch.all(torch.isfinite(hv))
        torch.testing.assert_close(hv.double(), hess @ v.double(), atol=1e-6, rtol=1e-4)
