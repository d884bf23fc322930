"""Late-fusion residual (``model.unimodal_risk``): log-risk = hazard head(f) + sum_m a_m(b)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared_model.alignment import random_modality_keep
from shared_model.model import build_model
from shared_model.objective import training_step
from test_model_fixtures import (ALL_SPECS, CLIN, CT, adamw_step, assert_prediction_independent_of_batch,
                                 assert_risk_is_fused_head_plus, make_site, small_cfg, tensors_for)
from test_model_fixtures import mixed_batch as _batch
from test_model_fixtures import single_torch_thread  # noqa: F401  (autouse fixture)


def _by_hand(model, batch, keep=None):
    """sum_m a_m(b) computed patient by patient from the aux heads and missing tokens."""
    model.eval()
    enc = model.encode(batch)
    risk = torch.zeros(len(batch))
    status = torch.zeros(len(batch))
    for j, name in enumerate(model.modality_names):
        head = model.encoders[name].aux_head
        miss_r, miss_s = head(model.missing[name].adapter[None, :])
        e = enc[name]
        pos = {int(r): i for i, r in enumerate(e.rows)}
        for b in range(len(batch)):
            if b in pos and (keep is None or bool(keep[b, j])):
                risk[b] += e.aux_risk[pos[b]]
                status[b] += e.aux_status[pos[b]]
            else:
                risk[b] += miss_r[0]
                status[b] += miss_s[0]
    return risk, status


@torch.no_grad()
def test_prediction_is_fused_head_plus_each_modalitys_term():
    """Risk and status logit = heads(f) + per-modality aux head outputs; a patient lacking a
    modality gets that modality's missing-token term (some patients lack some modalities)."""
    model = build_model(ALL_SPECS, small_cfg(unimodal_risk=True), seed=0)
    batch = _batch()
    out, heads_r = assert_risk_is_fused_head_plus(model, batch, *_by_hand(model, batch))
    # the terms are not zero: switching the option off changes the prediction
    off = build_model(ALL_SPECS, small_cfg(unimodal_risk=False), seed=0)
    off.load_state_dict({k: v for k, v in model.state_dict().items() if ".aux_head." not in k})
    off.eval()
    off_risk = off(batch).risk
    torch.testing.assert_close(off_risk, heads_r)
    assert not torch.allclose(off_risk, out.risk)


@torch.no_grad()
def test_dropped_modality_contributes_its_missing_token_term():
    model = build_model(ALL_SPECS, small_cfg(unimodal_risk=True), seed=0)
    batch = _batch()
    model.eval()
    enc = model.encode(batch)
    out = model(batch)
    keep = random_modality_keep(out.present, torch.Generator().manual_seed(0))
    assert bool((out.present & ~keep).any())
    add_r, add_s = model.unimodal_terms(batch, enc, keep)
    want_r, want_s = _by_hand(model, batch, keep)
    torch.testing.assert_close(add_r, want_r, atol=1e-5, rtol=0)
    torch.testing.assert_close(add_s, want_s, atol=1e-5, rtol=0)


def test_off_builds_no_aux_heads_and_on_adds_no_group():
    assert all(build_model(ALL_SPECS, small_cfg(), seed=0).encoders[s.name].aux_head is None for s in ALL_SPECS)
    model = build_model(ALL_SPECS, small_cfg(unimodal_risk=True), seed=0)
    assert set(model.parameter_groups()) == set(build_model(ALL_SPECS, small_cfg(), seed=0).parameter_groups())
    assert model.unimodal_terms(_batch(), model.encode(_batch())) is not None


def test_no_aux_loss_unless_asked():
    """unimodal_risk alone adds no auxiliary loss (the aux heads are part of the prediction)."""
    model = build_model(ALL_SPECS, small_cfg(unimodal_risk=True), seed=0)
    stats = training_step(model, _batch(), torch.optim.SGD(model.parameters(), lr=0.0),
                          rng=torch.Generator().manual_seed(0))
    assert stats["aux"] == 0.0


def test_gate_forced_to_zero_equals_plain_step_with_unimodal_risk():
    """Under GCS the unimodal terms enter the head loss as detached leaves and get their plain
    gradient pushed back separately: with the gate at 0 the step equals the plain step,
    including the encoders' aux heads."""
    batch = _batch()
    plain, s_plain = adamw_step(small_cfg(unimodal_risk=True, use_gcs=False), batch)
    gcs, s_gcs = adamw_step(small_cfg(unimodal_risk=True, use_gcs=True, gcs_force_gate=0.0), batch)
    assert s_plain["total"] == pytest.approx(s_gcs["total"], rel=1e-6)
    assert s_plain["dropped"] > 0
    start = build_model(ALL_SPECS, small_cfg(unimodal_risk=True), seed=0).state_dict()
    sp, sg = plain.state_dict(), gcs.state_dict()
    for k in sp:
        torch.testing.assert_close(sg[k], sp[k], atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    aux_keys = [k for k in sp if ".aux_head." in k]
    assert aux_keys and all(not torch.equal(sp[k], start[k]) for k in aux_keys)  # they learned


def test_patient_prediction_independent_of_batch_with_unimodal_risk():
    assert_prediction_independent_of_batch(build_model(ALL_SPECS, small_cfg(unimodal_risk=True), seed=0))


def test_site_without_a_modality_gets_its_missing_token_term_for_every_patient():
    """Site-level absence: a site that never collects the slides gives every patient the
    slides' missing-token term (so within the site it shifts all risks by one constant):
    the terms equal those where the slides are dropped for everyone, and removing that
    constant from the terms leaves the other modalities' varying sum."""
    model = build_model(ALL_SPECS, small_cfg(unimodal_risk=True), seed=0)
    batch = tensors_for(make_site("ct_clin", (CT, CLIN), 12, seed=2)).batch(np.arange(12))
    assert not bool(batch.modalities["slides"].present.any())
    model.eval()
    with torch.no_grad():
        enc = model.encode(batch)
        j = model.modality_names.index("slides")
        r_all, _ = model.unimodal_terms(batch, enc)
        keep = torch.ones(12, len(ALL_SPECS), dtype=torch.bool)
        keep[:, j] = False
        r_dropped, _ = model.unimodal_terms(batch, enc, keep)
        miss_r = model.encoders["slides"].aux_head(model.missing["slides"].adapter[None, :])[0]
        others = torch.zeros(12)
        for name in ("ct", "clin"):
            e = enc[name]
            miss = model.encoders[name].aux_head(model.missing[name].adapter[None, :])[0]
            others += miss.expand(12).index_copy(0, e.rows, e.aux_risk)
        rest = sum(model.encoders[n].aux_head(model.missing[n].adapter[None, :])[0] for n in ("tma", "lab"))
    torch.testing.assert_close(r_all, r_dropped)
    torch.testing.assert_close(r_all, others + rest + miss_r, atol=1e-5, rtol=0)
    assert float(others.std()) > 0
