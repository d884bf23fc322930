"""The counts that weight the missing-token groups in aggregation (shared_model.groups), and
the two facts about training that make them differ from "patients lacking m" (DESIGN §7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared_model.groups import INCOMPLETE, input_token_key, lacks_key, token_key, training_counts, weight_key
from shared_model.model import build_model
from shared_model.objective import training_step
from test_model_fixtures import ALL_SPECS, CLIN, CT, make_site, small_cfg, tensors_for
from test_model_fixtures import single_torch_thread  # noqa: F401  (autouse fixture)

WIDE = dict(unimodal_risk=True, unimodal_input="input", use_gcs=False, use_alignment=False)


def test_weight_keys_of_the_missing_token_groups():
    assert weight_key("missing/ct") == token_key("ct") == "n-token:ct"
    assert weight_key("missing-input/ct") == input_token_key("ct") == "n-input-token:ct"
    assert weight_key("dce_missing") == INCOMPLETE


@pytest.mark.parametrize("random_drop", [False, True])
def test_counts_by_hand_on_a_site_that_collects_two_of_five_modalities(random_drop):
    site = make_site("two", (CT, CLIN), 40, seed=1, p_missing=0.4)
    rows = np.arange(3, 40)
    counts = training_counts(site, rows, ALL_SPECS, random_drop=random_drop)
    has_ct, has_clin = site.modalities["ct"].present[rows], site.modalities["clin"].present[rows]
    both = has_ct & has_clin
    assert 0 < both.sum() < len(rows) and (~has_ct).any() and (~has_clin).any()  # the fixture mixes
    n = len(rows)
    drop = both if random_drop else np.zeros(n, dtype=bool)
    assert counts[lacks_key("ct")] == (~has_ct).sum()
    # lacking ct: both passes; having ct and clin: the drop pass, with probability 1/2
    assert counts[token_key("ct")] == (~has_ct).sum() + 0.25 * drop.sum()
    assert counts[input_token_key("ct")] == counts[token_key("ct")]  # ct is collected here
    for other in ("slides", "tma", "lab"):  # never collected: every patient lacks them
        assert counts[token_key(other)] == n
        assert counts[input_token_key(other)] == 0
    # m(b) = 1: a collected modality missing (both passes), or every drop pass of a complete one
    assert counts[INCOMPLETE] == (~has_ct | ~has_clin).sum() + 0.5 * drop.sum()


def _grads(site_specs, p_missing, random_drop, seed=0):
    """One training step's gradients on a status-free site holding ``site_specs`` only
    (the model holds all five modalities); the linear heads get non-zero weights first."""
    site = make_site("s", site_specs, 24, seed=seed, p_missing=p_missing, with_status=False)
    model = build_model(ALL_SPECS, small_cfg(**WIDE, random_drop=random_drop), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in model.modality_names:
            for p in model.encoders[name].aux_head.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    training_step(model, tensors_for(site).batch(np.arange(len(site))), opt, rng=torch.Generator().manual_seed(2))
    return {k: (p.grad.abs().max().item() if p.grad is not None else 0.0) for k, p in model.named_parameters()}


def test_input_token_of_a_never_collected_modality_gets_no_task_gradient():
    """Why ``missing-input/<m>`` gets weight 0 where m is never collected: it shifts every
    patient's log-risk by one constant, which the Cox partial likelihood ignores, while
    m's fusion-level token (attended beside each patient's own tokens) does learn there."""
    grads = _grads((CT, CLIN), p_missing=0.3, random_drop=True)
    for never in ("slides", "tma", "lab"):
        assert grads[f"missing.{never}.input"] < 1e-7, never
        assert grads[f"missing.{never}.fusion"] > 1e-6, never
    assert grads["missing.ct.input"] > 1e-6  # collected and sometimes missing


def test_random_drop_trains_the_tokens_where_nobody_lacks_the_modality():
    """Why the drop-eligible patients count: with nobody lacking ct, ct's tokens and t_miss
    learn from the drop pass alone."""
    with_drop = _grads((CT, CLIN), p_missing=0.0, random_drop=True)
    without = _grads((CT, CLIN), p_missing=0.0, random_drop=False)
    for key in ("missing.ct.input", "missing.ct.fusion", "dce_missing.t_miss"):
        assert with_drop[key] > 1e-6, key
        assert without[key] == 0.0, key


def test_a_present_modality_is_dropped_with_probability_one_half():
    """The shares in shared_model.groups (1/4 for a token, 1/2 for t_miss) rest on this: HAF's
    drop removes k ~ U{1..M_i-1} of a patient's M_i present modalities, so each one goes with
    probability E[k]/M_i = 1/2, and every drop pass drops something."""
    from shared_model.alignment import random_modality_keep
    from shared_model.groups import DROP_INCOMPLETE_SHARE, DROP_TOKEN_SHARE

    present = torch.zeros(6, 5, dtype=torch.bool)
    for i, m in enumerate((2, 3, 4, 5)):
        present[i, :m] = True
    present[4, 0] = True  # one modality: never dropped
    rng = torch.Generator().manual_seed(0)
    draws = 4000  # the rate's standard error is 0.008
    dropped = torch.zeros(6, 5)
    any_drop = torch.zeros(6)
    for _ in range(draws):
        d = (present & ~random_modality_keep(present, rng)).float()
        dropped += d
        any_drop += d.amax(dim=1)
    rate = dropped / draws
    for i in range(4):
        np.testing.assert_allclose(rate[i][present[i]].numpy(), 0.5, atol=0.03)
        assert any_drop[i] == draws
    assert rate[4:].sum() == 0
    assert DROP_TOKEN_SHARE == 0.5 * 0.5 and DROP_INCOMPLETE_SHARE == 0.5  # one of the two passes
