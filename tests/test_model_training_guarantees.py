"""Tests that a mutation slipped past (fourth review round, core model and training): metrics, encoders, fusion, train, pooled counts.

Each test names the mutation it kills; each was checked to fail under that mutation and
to pass on the unmutated code.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from shared_model import metrics as M
from test_model_fixtures import single_torch_thread  # noqa: F401  (autouse fixture)


# ------------------------------------------------------------------------------ metrics
def test_uno_cindex_leaves_out_an_event_exactly_at_tau_as_sksurv_does():
    """sksurv's concordance_index_ipcw keeps events with time < tau (strictly): an event at
    tau is no comparable 'i'. Kills ``t < tau`` -> ``t <= tau``."""
    from sksurv.metrics import concordance_index_ipcw
    from sksurv.util import Surv

    time = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    event = np.array([1, 0, 1, 1, 0, 1, 1, 0])
    risk = np.array([0.9, 0.1, 0.2, 0.8, 0.3, 0.7, 0.4, 0.5])  # the event at 4 is concordant
    y = Surv.from_arrays(event.astype(bool), time)
    tau = 4.0  # an event time
    ref = concordance_index_ipcw(y, y, risk, tau=tau)[0]
    assert M.uno_cindex(time, event, risk, tau=tau) == pytest.approx(ref, abs=1e-12)
    # and it equals the value with tau just below the event (the event at 4 is out)
    assert M.uno_cindex(time, event, risk, tau=tau) == pytest.approx(
        M.uno_cindex(time, event, risk, tau=3.5), abs=1e-12)
    assert M.uno_cindex(time, event, risk, tau=tau) != pytest.approx(
        M.uno_cindex(time, event, risk, tau=4.5), abs=1e-6)


def test_censoring_survival_beyond_the_last_train_time_is_refused_by_name():
    """Asking G beyond the train follow-up (G > 0 there) is refused with its own message, not
    read as G = 0. Kills the removal of that check in ``censoring_survival``."""
    G = M.censoring_survival(np.array([1.0, 2.0, 3.0]), np.array([0, 0, 1]))  # G(3) = 1/3 > 0
    np.testing.assert_allclose(G(np.array([1.0, 2.5, 3.0])), [2 / 3, 1 / 3, 1 / 3])
    with pytest.raises(M.MetricUndefinedError, match="beyond the last train time"):
        G(np.array([2.5, 4.0]))
    with pytest.raises(M.MetricUndefinedError, match="beyond the last train time"):
        M.uno_cindex([1.0, 4.0, 5.0], [1, 1, 0], [0.3, 0.2, 0.1],
                     time_train=[1.0, 2.0, 3.0], event_train=[0, 0, 1])


def test_check_finite_refuses_a_matrix_that_is_not_one_column_or_row():
    """[N, 1] / [1, N] are one value per patient; a [2, 2] array is not and must not be
    flattened into four 'patients'. Kills ``arr.ndim == 2 and 1 in arr.shape`` -> ``arr.ndim == 2``."""
    assert M.check_finite("risk", np.ones((3, 1))).shape == (3,)
    with pytest.raises(ValueError, match="1-dimensional"):
        M.check_finite("risk", np.ones((2, 2)))


# ------------------------------------------------------------------------------ encoders
def test_masked_batch_norm_running_statistics_equal_torch_batch_norm():
    """Training-mode MaskedBatchNorm1d on packed tokens = torch BatchNorm1d (momentum 0.1,
    unbiased running variance, biased batch variance for the output, affine weight and bias)
    for output and running buffers over several steps. Kills the biased running variance
    (``var * n/(n-1)`` -> ``var``), ``lerp_(..., 1 - momentum)``, the dropped ``+ self.bias`` and
    ``correction=1`` for the batch variance."""
    from shared_model.encoders import MaskedBatchNorm1d

    torch.manual_seed(0)
    ours = MaskedBatchNorm1d(5).train()
    ref = torch.nn.BatchNorm1d(5, momentum=0.1).train()
    with torch.no_grad():  # a learned affine map (not the identity it starts as)
        ours.weight.copy_(torch.rand(5) + 0.5), ours.bias.copy_(torch.randn(5))
        ref.weight.copy_(ours.weight), ref.bias.copy_(ours.bias)
    for step in range(3):
        x = torch.randn(7, 5) * (step + 2.0) + step
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-6, atol=1e-6)
    ours.eval(), ref.eval()
    x = torch.randn(4, 5)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_vector_adapter_blocks_are_residual():
    """PARACHUTE's pathology adapter: x + Linear(Dropout(GELU(LN(x)))) per block. With each
    block's last Linear zeroed the blocks are the identity, so the output is
    LN(proj(inp(x))). Kills ``x = x + blk(x)`` -> ``x = blk(x)``."""
    from shared_model.encoders import VectorAdapter

    torch.manual_seed(0)
    ad = VectorAdapter(6, 8, dropout=0.0).eval()
    with torch.no_grad():
        for blk in ad.blocks:
            blk[-1].weight.zero_()
            blk[-1].bias.zero_()
    values = torch.randn(3, 4, 6)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    out, out_mask = ad(values, mask)
    expected = ad.norm(ad.proj(ad.inp(values)))
    torch.testing.assert_close(out[mask], expected[mask], rtol=1e-5, atol=1e-6)
    assert torch.all(out[~mask] == 0) and torch.equal(out_mask, mask)


# ------------------------------------------------------------------------------ fusion
def test_cross_attention_block_is_residual_in_the_query():
    """out = q + Attn(...); out + FFN(LN out). With the attention's output projection and the
    FFN's last Linear zeroed, the block returns q itself. Kills ``out = q + drop(a)`` ->
    ``out = drop(a)``."""
    from shared_model.fusion import CrossAttentionBlock

    torch.manual_seed(0)
    blk = CrossAttentionBlock(8, 2, attn_dropout=0.0, dropout=0.0, ffn_mult=2).eval()
    with torch.no_grad():
        blk.attn.out_proj.weight.zero_(), blk.attn.out_proj.bias.zero_()
        blk.ffn[3].weight.zero_(), blk.ffn[3].bias.zero_()
    q, k = torch.randn(3, 4, 8), torch.randn(3, 5, 8)
    mask = torch.ones(3, 5, dtype=torch.bool)
    torch.testing.assert_close(blk(q, k, k, mask, value_bias=torch.randn(3, 8)), q)


def test_without_dce_the_fusion_does_not_read_the_dce_network_or_t_miss():
    """model.use_dce=false (PARACHUTE's -DCE ablation): e(b) = 0, so neither the DCE MLP nor
    t_miss changes the fused vector. Kills the ablation switch being ignored."""
    from shared_model.model import build_model
    from test_model_fixtures import ALL_SPECS, make_site, small_cfg, tensors_for

    batch = tensors_for(make_site("s", ALL_SPECS, 12, seed=0)).batch(np.arange(12))
    for use_dce in (False, True):
        model = build_model(ALL_SPECS, small_cfg(use_dce=use_dce), seed=0).eval()
        with torch.no_grad():
            before = model(batch).fused.clone()
            model.fusion.dce.out.bias.add_(3.0)
            model.dce_missing.t_miss.add_(3.0)
            after = model(batch).fused
        if use_dce:
            assert not torch.allclose(before, after, atol=1e-4)  # the probe does reach e(b)
        else:
            torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_one_stream_pairs_are_distinct_modalities_or_the_single_one():
    """With one stream, LocXEmb pairs distinct modalities i < j (eq. 4 is cross-modal), or the
    only modality with itself. Kills ``i < j`` -> ``i <= j`` (self-pairs in gamma)."""
    from shared_model.fusion import ParachuteFusion

    def pairs(kinds):
        f = ParachuteFusion(kinds, ("sequence", "tabular"), 8, 2, 0.0, 0.0, 2, 4, 4, True)
        return f.pairs, f.dce.mlp[0].in_features

    assert pairs(["tabular", "tabular", "sequence"]) == (((0, 1), (0, 2), (1, 2)), 6)
    assert pairs(["vector", "bag"]) == (((0, 1),), 2)
    assert pairs(["tabular"]) == (((0, 0),), 2)


def test_fusion_tokens_carry_the_modality_type_embedding():
    """z_m = u_m + e_m (the modality-type embedding, fusion group): changing e_m changes the
    fused vector. Kills dropping ``+ self.modality_embedding[i]`` in ParachuteFusion.forward."""
    from shared_model.model import build_model
    from test_model_fixtures import ALL_SPECS, make_site, small_cfg, tensors_for

    batch = tensors_for(make_site("s", ALL_SPECS, 10, seed=1)).batch(np.arange(10))
    model = build_model(ALL_SPECS, small_cfg(), seed=0).eval()
    with torch.no_grad():
        before = model(batch).fused.clone()
        model.fusion.modality_embedding.add_(torch.randn_like(model.fusion.modality_embedding))
        assert not torch.allclose(model(batch).fused, before, atol=1e-4)


def test_value_stream_of_mhca_v_is_y_plus_the_masked_mean_of_x():
    """Deviation documented in fusion.py: f_V = MHCA(X, Y, Y + pool(X)) with pool the masked
    mean of X's tokens. Kills ``y + pooled_x`` -> ``y``."""
    from shared_model.fusion import masked_mean
    from shared_model.model import build_model
    from test_model_fixtures import ALL_SPECS, make_site, small_cfg, tensors_for

    batch = tensors_for(make_site("s", ALL_SPECS, 8, seed=2, max_tokens=6)).batch(np.arange(8))
    model = build_model(ALL_SPECS, small_cfg(), seed=0).eval()
    seen = {}

    def capture(module, args):
        seen["q"], seen["k"], seen["v"], seen["mask"] = args[:4]

    fusion = model.fusion
    handle = fusion.mhca_v.register_forward_pre_hook(capture)
    seen_x = {}
    handle_q = fusion.mhca_q.register_forward_pre_hook(lambda m, a: seen_x.update(mask=a[3]))
    try:
        with torch.no_grad():
            model(batch)
    finally:
        handle.remove(), handle_q.remove()
    pooled = masked_mean(seen["q"], seen_x["mask"]).unsqueeze(1)  # X and its mask (mhca_q's keys)
    torch.testing.assert_close(seen["v"], seen["k"] + pooled)
    assert pooled.abs().max() > 1e-3  # the pooled X is not ~0, so the check has teeth


def test_concat_fusion_pools_only_real_tokens():
    """ConcatFusion mean-pools each modality's tokens over its mask: padding tokens (any value,
    any count) do not change a patient's fused vector. Kills the unmasked ``.mean(dim=1)``."""
    from shared_model.fusion import ConcatFusion

    torch.manual_seed(0)
    fus = ConcatFusion(2, 8, dropout=0.0).eval()
    a, b = torch.randn(3, 4, 8), torch.randn(3, 1, 8)
    ma = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    mb = torch.ones(3, 1, dtype=torch.bool)
    padded_a = torch.cat([a.masked_fill(~ma.unsqueeze(-1), 7.0), torch.full((3, 3, 8), -5.0)], dim=1)
    padded_ma = torch.cat([ma, torch.zeros(3, 3, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        ref, _ = fus([a, b], [a, b], [ma, mb], torch.zeros(3), torch.zeros(8))
        out, gamma = fus([padded_a, b], [padded_a, b], [padded_ma, mb], torch.zeros(3), torch.zeros(8))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert gamma.shape == (3, 0)


# ------------------------------------------------------------------------------ train
def _train_fixture(n=24, seed=3):
    from shared_model.model import build_model
    from shared_model.train import TrainPart, carve_validation
    from test_model_fixtures import ALL_SPECS, make_site, small_cfg, tensors_for

    site = make_site("sel", ALL_SPECS, n, seed=seed)
    fit, val = carve_validation(site.event, np.arange(len(site)), 0.3, seed=0)
    return build_model(ALL_SPECS, small_cfg(use_gcs=False), seed=0), TrainPart(tensors_for(site), fit, val)


def _scripted_run(monkeypatch, scores, **kw):
    """train_local with validation scores scripted per epoch; returns (result, weights after each epoch)."""
    import copy

    from shared_model import train as T
    from shared_model.config import TrainConfig

    model, part = _train_fixture()
    it = iter(scores)
    monkeypatch.setattr(T, "validation_score", lambda m, parts, metric: ("cindex", next(it)))
    snaps = []
    cfg = dataclasses.replace(TrainConfig(), batch_size=8, num_threads=1, select_metric="cindex",
                              scheduler="none", **kw)
    res = T.train_local(model, [part], cfg, epochs=len(scores), seed=0,
                        epoch_callback=lambda e, rec: snaps.append(copy.deepcopy(model.state_dict())))
    return model, res, snaps


def test_early_stopping_keeps_the_highest_score_from_min_epochs_and_stops_after_patience(monkeypatch):
    """Scores are 'higher is better'; epochs before min_epochs are never selected; training stops
    after ``early_stopping_patience`` epochs without improvement and the best epoch's weights are
    restored. Kills: best epoch chosen by the lowest score, min_epochs ignored, patience off by
    one (``>`` for ``>=``), the no-improvement counter not reset by an improvement."""
    scores = [0.99, 0.50, 0.60, 0.55, 0.70, 0.65, 0.64, 0.90, 0.95]
    # epoch 1 (0.99) is before min_epochs=2; best 0.50@2, 0.60@3, (0.55: 1 without), 0.70@5,
    # 0.65 and 0.64: 2 epochs without improvement = patience -> stop after epoch 7
    model, res, snaps = _scripted_run(monkeypatch, scores, min_epochs=2, early_stopping_patience=2)
    assert (res.best_epoch, res.best_score, res.epochs_run) == (5, 0.70, 7)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snaps[4][k], rtol=0, atol=0)


def test_an_improvement_smaller_than_the_tolerance_is_no_improvement(monkeypatch):
    """A score must beat the best by more than 1e-6 to be selected (ties keep the earlier epoch)."""
    _, res, _ = _scripted_run(monkeypatch, [0.6, 0.6, 0.6 + 5e-7, 0.59], min_epochs=1, early_stopping_patience=10)
    assert (res.best_epoch, res.epochs_run) == (1, 4)


def test_carve_validation_keeps_a_single_patient_stratum_in_the_fit_part():
    """'At least one patient of each non-empty stratum stays in the fit part', even when the
    fraction rounds a small stratum up to all of it. Kills removing ``k = min(k, len(rows) - 1)``."""
    from shared_model.train import carve_validation

    event = np.array([0] * 9 + [1])  # one event: its stratum has one patient
    for seed in range(5):
        fit, val = carve_validation(event, np.arange(10), 0.7, seed=seed)
        assert 9 in fit and 9 not in val
        assert sorted(np.r_[fit, val].tolist()) == list(range(10)) and not set(fit) & set(val)
    event = np.array([0, 0, 0, 1, 1, 1])  # strata of 3: round(0.9 * 3) = 3 -> 2
    fit, val = carve_validation(event, np.arange(6), 0.9, seed=0)
    assert len(val) == 4 and event[fit].tolist() == [0, 1]


def test_carve_validation_stratifies_by_status_label_as_well_as_event():
    """Strata are (event, status label): with 10 status-0 and 10 status-1 patients (all with an
    event) a 0.2 split puts exactly 2 of each in validation, for every seed. Kills ignoring
    ``status`` in the strata."""
    from shared_model.train import carve_validation

    event = np.ones(20, dtype=int)
    status = np.array([0] * 10 + [1] * 10)
    for seed in range(12):
        fit, val = carve_validation(event, np.arange(20), 0.2, seed=seed, status=status)
        assert len(val) == 4 and (status[val] == 1).sum() == 2, (seed, val)
    # unlabelled (-1) patients form their own stratum
    status = np.array([-1] * 10 + [1] * 10)
    for seed in range(12):
        _, val = carve_validation(event, np.arange(20), 0.2, seed=seed, status=status)
        assert (status[val] == -1).sum() == 2, (seed, val)


def test_predict_rows_refuses_non_finite_risk_scores_naming_the_site():
    """A diverged model's NaN scores must not reach a metric or a report. Kills removing the
    finite check of ``predict_rows``."""
    from shared_model.train import predict_rows

    model, part = _train_fixture()
    with torch.no_grad():
        model.hazard_head.net[-1].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="'sel'.*non-finite risk"):
        predict_rows(model, part.tensors, np.arange(5))


def test_validation_cindex_compares_patients_within_a_site_only(monkeypatch):
    """validation_score('cindex') is the stratified C (pairs within a site), not Harrell's C
    over the pooled sites. Kills giving every part the same stratum."""
    from shared_model import train as T
    from shared_model.train import TrainPart
    from test_model_fixtures import ALL_SPECS, make_site, tensors_for

    a, b = make_site("a", ALL_SPECS, 12, seed=1), make_site("b", ALL_SPECS, 12, seed=2)
    # within each site risk orders time perfectly; site b's scores sit 100 above site a's
    risks = {"a": -a.time.astype(float), "b": -b.time.astype(float) + 100.0 + 10 * b.time.max()}
    monkeypatch.setattr(T, "predict_rows", lambda model, tensors, idx: (risks[tensors.site.name][idx], None))
    idx = np.arange(12)
    parts = [TrainPart(tensors_for(s), idx[:2], idx) for s in (a, b)]
    metric, score = T.validation_score(torch.nn.Linear(1, 1), parts, "cindex")
    assert metric == "cindex" and score == pytest.approx(1.0)
    pooled = M.harrell_cindex(np.r_[a.time, b.time], np.r_[a.event, b.event], np.r_[risks["a"], risks["b"]])
    assert pooled < 0.99  # the pooled C would differ


def test_auto_device_is_cuda_when_present_and_cpu_otherwise(monkeypatch):
    """train.device=auto -> CUDA when available, else CPU; cuda requested without CUDA fails.
    Kills ``auto`` always resolving to the CPU."""
    from shared_model.train import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")


def test_plateau_scheduler_treats_a_rising_validation_score_as_improvement():
    """Selection scores are 'higher is better', so ReduceLROnPlateau must run in mode 'max':
    rising scores keep the learning rate, falling ones lower it. Kills mode='min'."""
    from shared_model.config import TrainConfig
    from shared_model.train import make_scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    cfg = dataclasses.replace(TrainConfig(), scheduler="plateau", plateau_patience=0, plateau_factor=0.5)
    sched = make_scheduler(opt, cfg)
    for s in (0.5, 0.6, 0.7, 0.8):
        sched.step(s)
    assert opt.param_groups[0]["lr"] == 1.0
    sched.step(0.4)
    assert opt.param_groups[0]["lr"] == 0.5


def test_loss_selection_score_is_minus_the_validation_loss():
    """select_metric=loss scores a model by minus its validation task loss (higher is better),
    patient-weighted over the parts. Kills the sign flip."""
    from shared_model.objective import evaluation_losses
    from shared_model.train import validation_score

    model, part = _train_fixture()
    metric, score = validation_score(model, [part], "loss")
    expected = evaluation_losses(model, part.tensors.batch(part.val_idx))["total"]
    assert metric == "loss" and expected > 0 and score == pytest.approx(-expected, rel=1e-6)


def test_fedprox_term_is_half_mu_squared_distance_and_train_local_applies_it():
    """FedProx (Li et al. 2020): mu/2 ||w - w_global||^2 over trainable parameters, added to the
    local objective whenever an anchor is given and train.proximal_mu > 0. Kills the term never
    being built in train_local and the factor 1/2 dropped."""
    from shared_model.config import TrainConfig
    from shared_model.train import proximal_term, train_local

    model, part = _train_fixture()
    anchor = {k: v.detach().clone() + 0.01 for k, v in model.named_parameters()}
    dist = sum(float((p.detach() - anchor[k]).pow(2).sum()) for k, p in model.named_parameters())
    assert float(proximal_term(anchor, 2.0)(model).detach()) == pytest.approx(dist, rel=1e-5)  # 0.5 * 2 * dist
    cfg = dataclasses.replace(TrainConfig(), batch_size=8, num_threads=1, scheduler="none", proximal_mu=1.0)
    res = train_local(model, [part], cfg, epochs=1, early_stopping=False, proximal_anchor=anchor, seed=0)
    assert res.history[0]["train_extra"] > 0
    model2, _ = _train_fixture()
    res2 = train_local(model2, [part], dataclasses.replace(cfg, proximal_mu=0.0), epochs=1,
                       early_stopping=False, proximal_anchor=anchor, seed=0)
    assert res2.history[0]["train_extra"] == 0


def test_validation_auc_scores_only_status_labelled_patients(monkeypatch):
    """select_metric=auc: unlabelled patients (status -1) are left out of the status AUC.
    Kills the label mask ``status >= 0`` letting them in."""
    from shared_model import train as T
    from shared_model.train import TrainPart
    from test_model_fixtures import ALL_SPECS, make_site, tensors_for

    site = make_site("u", ALL_SPECS, 16, seed=4)
    site.status[:] = np.array([0, 1] * 6 + [-1] * 4)
    prob = np.linspace(0.1, 0.9, 16)
    monkeypatch.setattr(T, "predict_rows", lambda model, tensors, idx: (np.zeros(len(idx)), prob[idx]))
    idx = np.arange(16)
    metric, score = T.validation_score(torch.nn.Linear(1, 1), [TrainPart(tensors_for(site), idx[:2], idx)], "auc")
    assert metric == "auc"
    assert score == pytest.approx(M.binary_auc(site.status[:12], prob[:12]))


def test_fewer_than_four_training_patients_get_no_validation_split():
    """A site with < 4 training patients keeps them all for fitting (a validation C-index on one
    patient is meaningless and the fit part would lose its risk set). Kills removing the guard."""
    from shared_model.train import carve_validation

    fit, val = carve_validation(np.array([1, 1, 1]), np.array([5, 2, 7]), 0.5, seed=0)
    assert fit.tolist() == [2, 5, 7] and val.size == 0 and val.dtype == np.int64


def test_carve_validation_follows_its_seed():
    """Different seeds carve different validation rows (``oncofed cv`` over seeds relies on it);
    the same seed the same rows. Kills the generator ignoring ``seed``."""
    from shared_model.train import carve_validation

    event = np.array([0, 1] * 20)
    splits = {tuple(carve_validation(event, np.arange(40), 0.25, seed=s)[1]) for s in range(6)}
    assert len(splits) > 1
    a, b = carve_validation(event, np.arange(40), 0.25, seed=4), carve_validation(event, np.arange(40), 0.25, seed=4)
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])


def test_train_num_threads_sets_torch_threads():
    """train.num_threads > 0 sets torch's intra-op threads (0 leaves them). Kills the setting
    being ignored. (The autouse fixture restores the thread count.)"""
    from shared_model.config import TrainConfig
    from shared_model.train import train_local

    model, part = _train_fixture()
    torch.set_num_threads(1)
    cfg = dataclasses.replace(TrainConfig(), batch_size=8, num_threads=2, scheduler="none")
    train_local(model, [part], cfg, epochs=1, early_stopping=False, seed=0)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    train_local(model, [part], dataclasses.replace(cfg, num_threads=0), epochs=1, early_stopping=False, seed=0)
    assert torch.get_num_threads() == 1


def test_train_local_returns_the_model_in_eval_mode():
    """The returned model is in eval mode (dropout off, BatchNorm on running statistics), whether
    or not an epoch was selected. Kills dropping the final ``model.eval()``."""
    from shared_model.config import TrainConfig
    from shared_model.train import train_local

    model, part = _train_fixture()
    cfg = dataclasses.replace(TrainConfig(), batch_size=8, num_threads=1, scheduler="none")
    train_local(model, [part], cfg, epochs=1, early_stopping=False, seed=0)
    assert not model.training and not any(m.training for m in model.modules())


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides", [{"train.lr.x": 0.5}, {"train": {"lr": {"x": 0.5}}}, {"model.d_token.y": 8}])
def test_a_key_with_more_than_two_parts_is_refused_not_read_as_its_prefix(overrides):
    """'train.lr.x' is no config key: it must fail, not silently set train.lr. Kills dropping
    the ``len(parts) != 2`` check of apply_overrides."""
    from shared_model.config import Config, apply_overrides

    with pytest.raises(KeyError, match="unknown config key"):
        apply_overrides(Config(), overrides)


def test_run_config_refuses_risk_groups_other_than_two_or_three():
    """eval-risk-groups is 2 (median split) or 3 (tertiles); 4 must fail when the run config is
    read, not after round 1's training. Kills dropping that check."""
    from shared_model.runconfig import settings_from_run_config

    assert settings_from_run_config({"min-sites": 1, "eval-risk-groups": 3}).eval_risk_groups == 3
    for bad in (1, 4):
        with pytest.raises(ValueError, match="eval-risk-groups"):
            settings_from_run_config({"min-sites": 1, "eval-risk-groups": bad})


def test_model_overrides_split_each_item_at_its_first_equals_sign():
    """Only the first '=' separates key and value. Kills ``split('=')[:2]`` (drops the rest)."""
    from shared_model.runconfig import parse_overrides

    assert parse_overrides("a.b=x=y; c.d = 1 ") == {"a.b": "x=y", "c.d": "1"}


# ------------------------------------------------------------------------------ model
def test_a_token_modality_flagged_present_without_a_real_token_counts_as_absent():
    """modality_present: a token modality needs ``present`` and at least one real token; a
    patient flagged present with an all-padding row gets the missing tokens, exactly as if the
    flag were off. Kills ``modality_present`` reading the flag alone."""
    from shared_model.model import build_model, modality_present
    from shared_model.objective import predict
    from test_model_fixtures import ALL_SPECS, make_site, small_cfg, tensors_for

    batch = tensors_for(make_site("p", ALL_SPECS, 16, seed=0, p_missing=0.4)).batch(np.arange(16))
    mb = batch.modalities["slides"]
    lacking = torch.nonzero(~mb.present.bool()).squeeze(1)
    assert lacking.numel() > 0 and not mb.mask[lacking].any()
    model = build_model(ALL_SPECS, small_cfg(), seed=0)
    ref, _ = predict(model, batch)
    mb.present[lacking] = True  # flagged present, no token
    assert not modality_present(mb, "vector")[lacking].any()
    out, _ = predict(model, batch)
    assert torch.all(torch.isfinite(out))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_detach_stages_keeps_the_alignment_loss_out_of_the_adapters():
    """HAF §3.6 stage separation: phi_m learns from L_GA (stage 2) on detached adapter outputs,
    so L_GA gives the projection a gradient and the adapters none. Kills dropping
    ``h.detach()`` before the projection."""
    from shared_model.alignment import global_alignment_loss
    from shared_model.model import build_model
    from test_model_fixtures import ALL_SPECS, make_site, small_cfg, tensors_for

    batch = tensors_for(make_site("d", ALL_SPECS, 16, seed=0)).batch(np.arange(16))
    model = build_model(ALL_SPECS, small_cfg(detach_stages=True), seed=0).train()
    out = model(batch)
    loss = global_alignment_loss(out.aligned, out.present, tau=1.0, lambda_pd=0.01).total
    loss.backward()
    for name, enc in model.encoders.items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.projection.parameters()), name
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in enc.adapter.parameters()), name


def test_agreement_term_uses_its_missing_value_where_random_drop_removes_a_modality():
    """In the drop pass a patient whose modality a (or b) is dropped gets the agreement term's
    learned missing value, as a patient lacking it does. Kills ``keep`` being ignored by
    FusionModel.agreement_value."""
    from shared_model.batch import SiteTensors
    from shared_model.model import agreement_key, build_model
    from test_model_fixtures import ALL_SPECS, make_site, small_cfg

    site = make_site("ag", ALL_SPECS, 12, seed=0, p_missing=0.0)
    st = SiteTensors.for_training(site, ALL_SPECS, np.arange(12), "none")
    batch = st.batch(np.arange(12))
    model = build_model(ALL_SPECS, small_cfg(unimodal_risk=True, unimodal_input="input", agreement_components=2),
                        seed=0)
    key = agreement_key("ct", "slides")
    term = model.agreement[key]
    g = torch.Generator().manual_seed(0)
    term.load_map(torch.randn(2, 12, generator=g), torch.randn(2, 10, generator=g), torch.eye(2))
    with torch.no_grad():
        term.missing.fill_(0.7)
    full = model.agreement_value(batch, key)
    assert not torch.any(full == 0.7)  # everyone has both modalities
    keep = torch.ones(12, len(ALL_SPECS), dtype=torch.bool)
    keep[:4, 1] = False  # slides dropped for the first four patients
    dropped = model.agreement_value(batch, key, keep)
    torch.testing.assert_close(dropped[:4], torch.full((4,), 0.7))
    torch.testing.assert_close(dropped[4:], full[4:])


# ------------------------------------------------------------------------------ groups, specs
def test_status_head_weight_counts_every_status_labelled_patient_including_label_zero():
    """n-status (the status head's aggregation weight) counts patients with a label 0 or 1, not
    only the positives; -1 is unlabelled. Kills ``status >= 0`` -> ``status > 0``."""
    from shared_model.groups import STATUS, training_counts
    from test_model_fixtures import ALL_SPECS, make_site

    site = make_site("g", ALL_SPECS, 12, seed=0)
    site.status[:] = np.array([0, 0, 0, 1, 1, -1, -1, 0, 1, -1, 0, 0])
    counts = training_counts(site, np.arange(10), ALL_SPECS, random_drop=True)
    assert counts[STATUS] == 7


def test_model_specs_survive_the_json_round_trip_and_unknown_kinds_are_refused():
    """The server sends the union of the sites' specs as JSON; every field (tabular column names
    included) must come back, and an unknown kind must fail. Kills dropping ``columns`` on
    decoding and the kind check."""
    from shared_model.specs import specs_from_json, specs_to_json
    from test_model_fixtures import ALL_SPECS

    assert specs_from_json(specs_to_json(ALL_SPECS)) == tuple(ALL_SPECS)
    assert specs_from_json(specs_to_json(ALL_SPECS))[3].columns == ("a", "b", "c", "d")
    with pytest.raises(ValueError, match="unknown kind 'image'"):
        specs_from_json('[{"name": "x", "kind": "image", "dim": 3}]')


# ------------------------------------------------------------------------------ pooled counts
def test_risk_bins_are_left_closed_a_score_on_an_edge_goes_up():
    """Risk bin b = [q_{b-1}, q_b): a score equal to an interior edge is counted in the bin above
    it (the module's documented convention, which the KM risk groups' ranges use). Kills
    ``side='right'`` -> ``side='left'`` in EvalGrid.risk_bin."""
    from shared_model import pooled_eval as PE

    grid = PE.make_grid(np.array([4.0, 0.0, 4.0]), n_time_bins=4, n_risk_bins=4, horizon_days=100.0,
                        horizons_days=(50.0,))
    edges = grid.risk_edges
    assert grid.risk_bin(edges).tolist() == [1, 2, 3]
    assert grid.risk_bin(np.nextafter(edges, -np.inf)).tolist() == [0, 1, 2]


def _two_group_metrics():
    from shared_model import pooled_eval as PE

    time = np.array([10.0, 20.0, 30.0, 40.0, 5.0, 15.0, 25.0, 35.0])
    event = np.array([1, 1, 1, 1, 1, 1, 0, 1])
    risk = np.array([-2.0, -1.9, -1.8, -1.7, 1.7, 1.8, 1.9, 2.0])  # first four: low-risk group
    grid = PE.make_grid(PE.site_moments(risk), n_time_bins=100, n_risk_bins=8, horizon_days=100.0,
                        horizons_days=(50.0,))
    pm = PE.pooled_metrics(PE.site_statistics(grid, time, event, risk), grid)
    return pm, time, event


def test_pooled_km_median_is_the_first_time_survival_reaches_one_half():
    """Median survival = first time S(t) <= 0.5 (lifelines' median_survival_time_). Low group:
    events at 10, 20, 30, 40 -> S = .75, .5, ... -> median 20. Kills ``<= 0.5`` -> ``< 0.5``."""
    from lifelines import KaplanMeierFitter

    pm, time, event = _two_group_metrics()
    low = pm.groups[0]
    assert low.label == "low" and low.n_patients == 4
    ref = KaplanMeierFitter().fit(time[:4], event[:4]).median_survival_time_
    assert low.median_survival_days == ref == 20.0


def test_pooled_km_numbers_at_risk_include_the_patients_leaving_at_t():
    """KMGroup.at_risk(t) counts binned times >= t (lifelines' at_risk column). Kills
    ``side='left'`` -> ``side='right'``."""
    from lifelines import KaplanMeierFitter

    pm, time, event = _two_group_metrics()
    high = pm.groups[1]
    table = KaplanMeierFitter().fit(time[4:], event[4:]).event_table
    for t in (5.0, 15.0, 25.0, 35.0):
        assert int(high.at_risk([t])[0]) == int(table.loc[t, "at_risk"]), t
    assert high.at_risk([0.0, 36.0]).tolist() == [4, 0]


def test_censoring_km_is_evaluated_mid_bin():
    """The IPCW weight of events in time bin j uses G_{j-1} (1 - c_j / (2 (Y_j - d_j))): half of the
    bin's censorings precede its events (documented in _censoring_km). Kills returning the
    end-of-bin G_j."""
    from shared_model.pooled_eval import _censoring_km

    n_tot, d = np.array([4.0, 4.0, 2.0]), np.array([1.0, 2.0, 1.0])
    # c = [3, 2, 1], at risk [10, 6, 2], Y - d = [9, 4, 1], ratio = [1/3, 1/2, 1], G = [2/3, 1/3, 0]
    np.testing.assert_allclose(_censoring_km(n_tot, d), [1 * (1 - 1 / 6), (2 / 3) * (1 - 1 / 4), (1 / 3) * 0.5])


def test_pooled_km_counts_events_beyond_the_horizon_as_at_risk_throughout():
    """Patients whose time lies beyond the grid's horizon are at risk along the whole curve,
    events and censorings alike. Kills counting only the censored ones in n_beyond_horizon."""
    from shared_model import pooled_eval as PE

    time = np.array([10.0, 20.0, 150.0, 160.0, 5.0, 15.0, 25.0, 35.0])
    event = np.array([1, 1, 1, 0, 1, 1, 1, 1])  # two low-risk patients beyond 100 days, one an event
    risk = np.array([-2.0, -1.9, -1.8, -1.7, 1.7, 1.8, 1.9, 2.0])
    grid = PE.make_grid(PE.site_moments(risk), n_time_bins=100, n_risk_bins=8, horizon_days=100.0,
                        horizons_days=(50.0,))
    low = PE.pooled_metrics(PE.site_statistics(grid, time, event, risk), grid).groups[0]
    assert low.n_beyond_horizon == 2 and low.n_patients == 4 and low.n_events_total == 3
    assert low.at_risk([15.0, 50.0]).tolist() == [3, 2]
    np.testing.assert_allclose(low.survival_at([10.0, 20.0, 99.0]), [0.75, 0.5, 0.5])


def test_pooled_same_bin_event_censored_pair_with_equal_risk_gets_half_credit():
    """same_time_bin='half': an event and a censoring in the same time bin are comparable with
    probability 1/2, and in the same risk bin the pair is a risk tie (credit 1/2), so C = 1/2.
    Kills dropping the ``+ 0.5 * cn`` same-risk-bin term of ec_conc."""
    from shared_model import pooled_eval as PE

    grid = PE.make_grid(np.array([4.0, 0.0, 4.0]), n_time_bins=10, n_risk_bins=4, horizon_days=100.0,
                        horizons_days=(50.0,))
    st = PE.site_statistics(grid, [12.0, 13.0], [1, 0], [0.01, 0.02])  # same time bin, same risk bin
    pm = PE.pooled_metrics(st, grid)
    assert pm.cindex_harrell == pytest.approx(0.5)


def test_pooled_uno_truncation_leaves_out_events_in_the_bin_after_tau():
    """Uno's C is truncated at tau = a time edge: events whose time bin ends after tau are no
    comparable 'i' (binned time <= tau only). Moving such an event from just after tau to much
    later does not change the value. Kills ``< tau_k`` -> ``<= tau_k``."""
    from shared_model import pooled_eval as PE

    def uno(t_late):
        time = np.array([10.0, 30.0, t_late, 60.0, 70.0, 75.0, 90.0, 95.0])
        event = np.array([1, 1, 1, 0, 1, 0, 1, 0])
        risk = np.array([2.0, 1.0, -3.0, 0.5, 0.0, -0.5, -1.0, -2.0])  # the late event: lowest risk
        grid = PE.make_grid(PE.site_moments(risk), n_time_bins=100, n_risk_bins=16, horizon_days=100.0,
                            horizons_days=(50.0,))
        return PE.pooled_metrics(PE.site_statistics(grid, time, event, risk), grid, uno_tau_days=50.0).cindex_uno

    assert uno(50.5) == pytest.approx(uno(80.0), abs=1e-12)
