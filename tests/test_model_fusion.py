"""FusionModel forward: shapes, per-patient independence, missing modalities, padding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from shared_model.batch import Batch, ModalityBatch
from shared_model.fusion import ParachuteFusion, topk_similarity_stats
from shared_model.model import build_model
from shared_model.objective import predict, training_step
from test_model_fixtures import ALL_SPECS, CLIN, CT, LAB, SLIDES, TMA, make_site, small_cfg, tensors_for
from test_model_fixtures import single_torch_thread  # noqa: F401  (autouse fixture)


def _model(**cfg):
    return build_model(ALL_SPECS, small_cfg(**cfg), seed=0)


def _full_site(n=24, seed=0, **kw):
    return make_site("full", ALL_SPECS, n, seed=seed, **kw)


def test_forward_shapes_and_flags():
    model = _model()
    st = tensors_for(_full_site())
    batch = st.batch(np.arange(10))
    out = model(batch)
    assert out.fused.shape == (10, 16)
    assert out.risk.shape == (10,) and out.status_logit.shape == (10,)
    assert out.aligned.shape == (10, 5, 16)
    present = torch.stack([batch.modalities[s.name].present for s in ALL_SPECS], dim=1)
    assert torch.equal(out.present, present)
    assert torch.equal(out.missing_flag.bool(), (batch.expected & ~present).any(1))
    assert torch.all(out.aligned[~present] == 0)
    # X = ct + clin + lab, Y = slides + tma -> 3 * 2 pairs
    assert out.locx.shape == (10, 12)
    assert torch.all(torch.isfinite(out.risk))


def test_patient_prediction_independent_of_batch():
    """Eval mode: a patient's risk is the same alone and in batches of different padding/modalities."""
    model = _model()
    site = _full_site(n=30, seed=1, max_tokens=9)
    other = make_site("other", (CT, CLIN), 10, seed=5, max_tokens=20)  # longer CT, different modalities
    st, st_other = tensors_for(site), tensors_for(other)
    alone = [predict(model, st.batch([i]))[0] for i in range(6)]
    together, _ = predict(model, st.batch(np.arange(30)))
    torch.testing.assert_close(torch.cat(alone), together[:6], atol=1e-5, rtol=0)
    # same patients, batch padded to a different length (another site's long CT sequences)
    mixed = _concat(st.batch(np.arange(6)), st_other.batch(np.arange(10)))
    assert mixed.modalities["ct"].values.shape[1] > st.batch(np.arange(30)).modalities["ct"].values.shape[1]
    risk_mixed, _ = predict(model, mixed)
    torch.testing.assert_close(risk_mixed[:6], together[:6], atol=1e-5, rtol=0)


def _concat(a: Batch, b: Batch) -> Batch:
    """Concatenate two batches (re-padding token kinds to the longer T)."""
    mods = {}
    for name, ma in a.modalities.items():
        mb = b.modalities[name]
        if ma.values.dim() == 3:
            t = max(ma.values.shape[1], mb.values.shape[1])

            def pad(x, t=t):
                return torch.nn.functional.pad(x, (0, 0, 0, t - x.shape[1]))

            def padm(x, t=t):
                return torch.nn.functional.pad(x, (0, t - x.shape[1]))

            mods[name] = ModalityBatch(torch.cat([pad(ma.values), pad(mb.values)]),
                                       torch.cat([padm(ma.mask), padm(mb.mask)]),
                                       torch.cat([ma.present, mb.present]))
        else:
            mods[name] = ModalityBatch(*(torch.cat([getattr(ma, f), getattr(mb, f)])
                                         for f in ("values", "mask", "present")))
    return Batch(mods, torch.cat([a.expected, b.expected]), torch.cat([a.time, b.time]),
                 torch.cat([a.event, b.event]), torch.cat([a.status, b.status]),
                 torch.cat([a.status_mask, b.status_mask]), torch.cat([a.index, b.index]))


def _corrupt_absent(batch: Batch) -> Batch:
    """Overwrite every stored value of absent modality entries (and their token masks)."""
    mods = {}
    for name, mb in batch.modalities.items():
        absent = ~mb.present
        vals = mb.values.clone()
        mask = mb.mask.clone()
        vals[absent] = 1e3 * torch.randn_like(vals[absent])
        if vals.dim() == 3:
            mask[absent] = True  # even a bogus mask must not let them in
        mods[name] = ModalityBatch(vals, mask, mb.present)
    return dataclasses.replace(batch, modalities=mods)


def test_absent_modality_values_are_never_used():
    torch.manual_seed(0)
    model = _model()
    st = tensors_for(_full_site(n=20, seed=2, p_missing=0.4))
    batch = st.batch(np.arange(20))
    assert any((~mb.present).any() for mb in batch.modalities.values())
    corrupted = _corrupt_absent(batch)
    # eval: identical predictions
    torch.testing.assert_close(predict(model, batch)[0], predict(model, corrupted)[0], atol=0, rtol=0)
    # training: identical losses and gradients (BN statistics exclude absent patients)
    grads = []
    for b in (batch, corrupted):
        m = _model()
        torch.manual_seed(1)
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        out = training_step(m, b, opt, rng=torch.Generator().manual_seed(0))
        grads.append((out["total"], [p.grad.clone() if p.grad is not None else None for p in m.parameters()],
                      [buf.clone() for buf in m.buffers()]))
    assert grads[0][0] == grads[1][0]
    for g0, g1 in zip(grads[0][1], grads[1][1]):
        assert (g0 is None) == (g1 is None)
        if g0 is not None:
            torch.testing.assert_close(g0, g1, atol=0, rtol=0)
    for b0, b1 in zip(grads[0][2], grads[1][2]):
        torch.testing.assert_close(b0, b1, atol=0, rtol=0)


def test_absent_patients_get_missing_tokens_and_site_level_absence_is_not_flagged():
    model = _model()
    site = make_site("ct-clin", (CT, CLIN), 12, seed=3, p_missing=0.3)
    st = tensors_for(site)
    batch = st.batch(np.arange(12))
    enc = model.encode(batch)
    assert enc["slides"].rows.numel() == 0  # site never has slides: encoder not run
    _, _, present, flag = model.fuse(batch, enc)
    lacks_own = (~present[:, [0, 3]]).any(1)  # ct or clin missing
    assert torch.equal(flag.bool(), lacks_own)
    # a patient lacking everything but clin still gets a finite prediction
    risk, _ = predict(model, batch)
    assert torch.all(torch.isfinite(risk))


def test_padding_never_leaks_in_training_mode():
    """Masked BatchNorm: train-mode output of a patient does not depend on the padding length."""
    model = _model(dropout=0.0, attn_dropout=0.0, bag_dropout=0.0)
    model.train()
    st = tensors_for(make_site("ct", (CT,), 6, seed=4, p_missing=0.0, max_tokens=5))
    b = st.batch(np.arange(6))
    mb = b.modalities["ct"]
    padded = ModalityBatch(torch.nn.functional.pad(mb.values, (0, 0, 0, 7)) + 0.0,
                           torch.nn.functional.pad(mb.mask, (0, 7)), mb.present)
    padded.values[:, mb.values.shape[1]:] = 5.0  # garbage at padding
    b2 = dataclasses.replace(b, modalities={**b.modalities, "ct": padded})
    torch.testing.assert_close(model(b).fused, model(b2).fused, atol=1e-5, rtol=0)


def test_topk_stats_follow_eq4_with_per_patient_k():
    hx = torch.randn(1, 3, 8)
    hy = torch.randn(1, 2, 8)
    mx = torch.tensor([[True, True, False]])
    my = torch.tensor([[True, True]])
    s = torch.nn.functional.normalize(hx[0, :2], dim=-1) @ torch.nn.functional.normalize(hy[0], dim=-1).T
    vals = s.flatten().sort(descending=True).values
    out = topk_similarity_stats(hx, mx, hy, my, topk=3)
    torch.testing.assert_close(out[0, 0], vals[:3].mean())
    torch.testing.assert_close(out[0, 1], vals[-3:].mean())
    out10 = topk_similarity_stats(hx, mx, hy, my, topk=10)  # k = min(10, 4 valid)
    torch.testing.assert_close(out10[0], torch.stack([vals.mean(), vals.mean()]))


@pytest.mark.parametrize("specs", [(CLIN, LAB), (SLIDES,), (CT, SLIDES), (TMA, CLIN, LAB)])
def test_any_modality_set_builds_and_runs(specs):
    model = build_model(specs, small_cfg(use_dce=len(specs) % 2 == 0), seed=0)
    site = make_site("s", specs, 8, seed=0)
    st = tensors_for(site, specs)
    out = model(st.batch(np.arange(8)))
    assert out.risk.shape == (8,) and torch.all(torch.isfinite(out.risk))
    fusion: ParachuteFusion = model.fusion
    assert len(fusion.pairs) >= 1


def test_detach_stages_trains_adapters_only_through_aux_heads():
    model = _model(detach_stages=True, random_drop=False, use_gcs=False)
    st = tensors_for(_full_site(n=16, seed=6))
    batch = st.batch(np.arange(16))
    out = model(batch)
    # task loss alone: no gradient reaches adapters or projections
    out.risk.sum().backward()
    for name in model.modality_names:
        assert all(p.grad is None for p in model.encoders[name].adapter.parameters())
        assert all(p.grad is None for p in model.encoders[name].projection.parameters())
    model.zero_grad(set_to_none=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    stats = training_step(model, batch, opt, rng=torch.Generator().manual_seed(0))
    assert stats["aux"] > 0
    assert model.encoders["ct"].adapter.conv1.weight.grad is not None
    assert model.encoders["ct"].aux_head.net.weight.grad is not None


def test_batch_without_model_modality_is_rejected():
    model = _model()
    st = tensors_for(make_site("c", (CT, CLIN), 6, seed=0), (CT, CLIN))
    with pytest.raises(ValueError, match="lacks model modalities"):
        model(st.batch(np.arange(6)))


def test_batched_locxemb_equals_pairwise_eq4():
    model = _model(topk=3)
    st = tensors_for(_full_site(n=12, seed=7, max_tokens=6))
    batch = st.batch(np.arange(12))
    enc = model.encode(batch)
    captured = {}
    orig = model.fusion.locxemb

    def spy(adapter, masks):
        captured["args"] = (adapter, masks)
        return orig(adapter, masks)

    model.fusion.locxemb = spy
    _, gamma, _, _ = model.fuse(batch, enc)
    adapter, masks = captured["args"]
    ref = torch.cat([topk_similarity_stats(adapter[i], masks[i], adapter[j], masks[j], 3)
                     for i, j in model.fusion.pairs], dim=1)
    torch.testing.assert_close(gamma, ref)


def test_packed_sequence_adapter_equals_masked_convolution():
    from shared_model.encoders import SequenceAdapter

    torch.manual_seed(0)
    ad = SequenceAdapter(6, 5, dropout=0.0).eval()
    with torch.no_grad():
        for bn in (ad.bn1, ad.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
    lengths = [4, 1, 7, 2]
    x = torch.randn(4, 7, 6)
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    out, _ = ad(x, mask)

    def bn_eval(h, bn):
        return (h - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps) * bn.weight[:, None] \
            + bn.bias[:, None]

    for p, n in enumerate(lengths):  # each patient alone, plain zero-padded convolutions
        h = torch.relu(ad.conv1(x[p, :n].T[None]))[0]
        h = bn_eval(h, ad.bn1)
        h = bn_eval(torch.relu(ad.conv2(h[None]))[0], ad.bn2)
        torch.testing.assert_close(out[p, :n], h.T, atol=1e-5, rtol=1e-5)
        assert torch.all(out[p, n:] == 0)


def test_masked_batch_norm_keeps_its_running_statistics_on_a_single_token():
    from shared_model.encoders import MaskedBatchNorm1d

    torch.manual_seed(0)
    bn = MaskedBatchNorm1d(3).train()
    bn(torch.randn(64, 3) * 5.0)  # a real batch moves the buffers towards var 25
    before = (bn.running_mean.clone(), bn.running_var.clone())
    x = torch.randn(1, 3)
    y = bn(x)  # one token: no variance to learn from
    torch.testing.assert_close(bn.running_mean, before[0], rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, before[1], rtol=0, atol=0)
    torch.testing.assert_close(y, (x - before[0]) / torch.sqrt(before[1] + bn.eps))  # weight 1, bias 0
