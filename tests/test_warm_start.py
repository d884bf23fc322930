"""Linear warm start (``train.linear_warm_start``): the per-modality linear terms fitted alone
(penalised Cox / logistic on the training rows) before the network trains."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from shared_model.config import TrainConfig
from shared_model.model import build_model
from shared_model.train import TrainPart, train_selected
from shared_model.warm_start import linear_design, warm_start_linear_terms
from test_model_fixtures import ALL_SPECS, CLIN, CT, LAB, SLIDES, make_site, small_cfg, tensors_for
from test_model_fixtures import single_torch_thread  # noqa: F401  (autouse fixture)

WIDE = dict(unimodal_risk=True, unimodal_input="input")


def _parts(specs=ALL_SPECS, n=(40, 30)):
    """Two sites of the same modalities; the first 3/4 of each site's rows are training rows."""
    parts = []
    for i, size in enumerate(n):
        site = make_site(f"s{i}", specs, size, seed=10 + i)
        parts.append(TrainPart(tensors_for(site, specs), np.arange(size * 3 // 4)))
    return parts


def _design_matrix(model, parts):
    design = linear_design(model, parts)
    x = design.design({m: model.missing[m].input.detach().double() for m in model.modality_names})
    return design, torch.cat([x[m] for m in model.modality_names], dim=1).numpy()


@torch.no_grad()
@pytest.mark.parametrize("pca", [0, 3])
def test_warm_started_model_is_the_penalised_linear_model(pca):
    """After the warm start the model's log-risk and status logit on every patient (training
    or not, some lacking modalities) are the linear terms alone: missing tokens = the mean
    summary of the training patients with the modality, the heads' last layers zero."""
    model = build_model(ALL_SPECS, small_cfg(**WIDE), seed=0)
    parts = _parts()
    fit = warm_start_linear_terms(model, parts, l2=0.5, pca=pca)
    assert fit.patients == sum(len(p.train_idx) for p in parts) and fit.status_objective is not None
    design = linear_design(model, parts)
    for m in model.modality_names:
        have = design.present[m]
        torch.testing.assert_close(model.missing[m].input.double(), design.summaries[m][have].mean(0),
                                   atol=1e-6, rtol=0)
    model.eval()
    for part in parts:
        batch = part.tensors.batch(np.arange(part.tensors.n))
        out = model(batch)
        assert not bool(out.present.all())
        heads_r, heads_s = model.heads_forward(out.fused)
        assert float(heads_r.abs().max()) == 0.0 and float(heads_s.abs().max()) == 0.0
        terms_r, terms_s = model.unimodal_terms(batch, model.encode(batch))
        torch.testing.assert_close(out.risk, terms_r)
        torch.testing.assert_close(out.status_logit, terms_s)
        assert float(terms_r.std()) > 0.1  # the linear terms were fitted, not left at 0


def test_cox_fit_equals_lifelines_penalised_coxph():
    """The linear terms' Cox weights are lifelines' CoxPHFitter(penalizer=l2) coefficients on the
    same design (Efron ties, baseline stratified by site)."""
    from lifelines import CoxPHFitter

    specs = (CT, CLIN)
    model = build_model(specs, small_cfg(**WIDE, cox_ties="efron"), seed=0)
    parts = _parts(specs, n=(60, 50))
    warm_start_linear_terms(model, parts, l2=0.3)
    # lifelines on the design the warm start used (its missing tokens are now the fitted ones)
    design, x = _design_matrix(model, parts)
    keep = x.std(axis=0) > 1e-6  # lifelines cannot take constant columns; their weight is 0 here
    assert keep.sum() > 10 and not keep.all()
    df = pd.DataFrame(x[:, keep], columns=[f"x{i}" for i in range(int(keep.sum()))])
    df["T"], df["E"], df["site"] = design.time.numpy(), design.event.numpy(), design.site.numpy()
    cph = CoxPHFitter(penalizer=0.3).fit(df, "T", "E", strata=["site"])
    ours = torch.cat([model.encoders[m].aux_head.net.weight[0].detach().double() for m in model.modality_names])
    np.testing.assert_allclose(ours.numpy()[keep], cph.params_.values, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(ours.numpy()[~keep], 0.0, atol=1e-6)


def test_principal_component_fit_equals_lifelines_on_the_components():
    """With ``pca`` = k an embedding modality enters as its first k principal components over the
    training patients that have it (tabular columns as they are): the model's log-risk equals
    lifelines' CoxPHFitter on that reduced design, up to a constant, and its status logit
    scikit-learn's ridge logistic regression on it."""
    from lifelines import CoxPHFitter
    from sklearn.linear_model import LogisticRegression

    k = 4
    specs = (CT, SLIDES, CLIN)
    model = build_model(specs, small_cfg(**WIDE, cox_ties="efron"), seed=0)
    parts = _parts(specs, n=(60, 50))
    warm_start_linear_terms(model, parts, l2=0.3, pca=k)
    design = linear_design(model, parts)
    tokens = {m: model.missing[m].input.detach().double() for m in model.modality_names}
    raw = design.design(tokens)
    blocks = []
    for spec in specs:
        x = raw[spec.name].numpy()
        if spec.kind != "tabular":
            have = design.present[spec.name].numpy()
            assert 0 < have.sum() < len(have)  # some patients lack it: they sit at the mean (PC scores 0)
            centre = x[have].mean(axis=0)
            vt = np.linalg.svd(x[have] - centre, full_matrices=False)[2][:k]
            x = (x - centre) @ vt.T
        blocks.append(x)
    xr = np.concatenate(blocks, axis=1)
    keep = xr.std(axis=0) > 1e-6
    assert keep.sum() >= 2 * k
    df = pd.DataFrame(xr[:, keep], columns=[f"x{i}" for i in range(int(keep.sum()))])
    df["T"], df["E"], df["site"] = design.time.numpy(), design.event.numpy(), design.site.numpy()
    cph = CoxPHFitter(penalizer=0.3).fit(df, "T", "E", strata=["site"])
    heads = [model.encoders[m].aux_head.net for m in model.modality_names]
    ours = sum(raw[m].numpy() @ h.weight[0].detach().double().numpy() for m, h in zip(model.modality_names, heads))
    theirs = xr[:, keep] @ cph.params_.values
    np.testing.assert_allclose(ours - ours.mean(), theirs - theirs.mean(), atol=1e-3)
    lab = design.status_mask.numpy()
    z = (xr[:, keep] - xr[:, keep].mean(axis=0)) / xr[:, keep].std(axis=0, ddof=1)
    lr = LogisticRegression(C=1.0 / (0.3 * lab.sum()), tol=1e-10, max_iter=10_000).fit(z[lab], design.status.numpy()[lab])
    logit = sum(raw[m].numpy() @ h.weight[1].detach().double().numpy() + float(h.bias.detach()[1])
                for m, h in zip(model.modality_names, heads))
    np.testing.assert_allclose(logit[lab], lr.decision_function(z[lab]), atol=1e-4)


def test_status_fit_equals_sklearn_ridge_logistic_regression():
    """Status weights and intercept = scikit-learn's L2 logistic regression with C = 1 / (l2 N)."""
    from sklearn.linear_model import LogisticRegression

    specs = (SLIDES, LAB)
    model = build_model(specs, small_cfg(**WIDE), seed=0)
    parts = _parts(specs, n=(60, 50))
    warm_start_linear_terms(model, parts, l2=0.2)
    design, x = _design_matrix(model, parts)
    lab = design.status_mask.numpy()
    y = design.status.numpy()[lab]
    mean, std = x.mean(axis=0), x.std(axis=0, ddof=1)  # the warm start z-scores over all training rows
    std = np.where(std > 1e-8, std, 1.0)
    z = (x - mean) / std
    lr = LogisticRegression(C=1.0 / (0.2 * lab.sum()), tol=1e-10, max_iter=10_000).fit(z[lab], y)
    heads = [model.encoders[m].aux_head.net for m in model.modality_names]
    ours = torch.cat([h.weight[1].detach().double() for h in heads]).numpy()
    np.testing.assert_allclose(ours, lr.coef_[0] / std, rtol=1e-3, atol=1e-5)
    # same logits on the raw design
    logit = x[lab] @ ours + sum(float(h.bias.detach()[1]) for h in heads)
    np.testing.assert_allclose(logit, lr.decision_function(z[lab]), atol=1e-4)


def test_reads_only_training_rows():
    """Relabelling (or corrupting) rows outside ``train_idx`` leaves the fit unchanged."""
    def fitted(scramble: bool):
        model = build_model(ALL_SPECS, small_cfg(**WIDE), seed=0)
        parts = _parts()
        if scramble:
            for p in parts:
                rest = np.setdiff1d(np.arange(p.tensors.n), p.train_idx)
                p.tensors.time[rest] = 1.0
                p.tensors.event[rest] = 1.0
                p.tensors.status[rest] = 1.0 - p.tensors.status[rest]
        warm_start_linear_terms(model, parts, l2=0.5)
        return model.state_dict()

    a, b = fitted(False), fitted(True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_train_selected_warm_starts_selection_and_refit(monkeypatch):
    """train_selected warm-starts the selection model on its fit rows and the refit model on
    fit + validation rows; with the option off it never calls the warm start."""
    import shared_model.train as train_mod

    seen = []
    real = train_mod.warm_start_linear_terms
    monkeypatch.setattr(train_mod, "warm_start_linear_terms",
                        lambda model, parts, l2, pca: seen.append(sum(len(p.train_idx) for p in parts))
                        or real(model, parts, l2, pca))
    site = make_site("s", ALL_SPECS, 40, seed=5)
    part = TrainPart(tensors_for(site), np.arange(30), np.arange(30, 40))
    cfg = dataclasses.replace(TrainConfig(), epochs=3, min_epochs=1, refit=True, linear_warm_start=True,
                              select_metric="cindex", num_threads=1)
    build = lambda: build_model(ALL_SPECS, small_cfg(**WIDE), seed=0)  # noqa: E731
    model, result = train_selected(build, [part], cfg, seed=0)
    assert seen == [30, 40] and 1 <= result.best_epoch <= 3
    seen.clear()
    train_selected(build, [part], dataclasses.replace(cfg, linear_warm_start=False), seed=0)
    assert seen == []


def test_refuses_without_linear_terms_or_penalty():
    parts = _parts()
    with pytest.raises(ValueError, match="model.unimodal_risk=true.*also set train.linear_warm_start=false"):
        warm_start_linear_terms(build_model(ALL_SPECS, small_cfg(), seed=0), parts, l2=0.5)
    with pytest.raises(ValueError, match="linear_warm_start_l2 must be a finite penalty > 0"):
        warm_start_linear_terms(build_model(ALL_SPECS, small_cfg(**WIDE), seed=0), parts, l2=0.0)
    with pytest.raises(ValueError, match="linear_warm_start_pca must be 0 .no reduction. or a number"):
        warm_start_linear_terms(build_model(ALL_SPECS, small_cfg(**WIDE), seed=0), parts, l2=0.5, pca=-1)


def test_config_refuses_a_warm_start_without_linear_terms_when_loaded():
    """The contradiction is reported when the config is read, before any data is loaded or trained."""
    from shared_model.config import load_config

    with pytest.raises(ValueError, match="model.unimodal_risk=true.*also set train.linear_warm_start=false"):
        load_config(overrides={"train.linear_warm_start": "true", "model.unimodal_risk": "false"})
    with pytest.raises(ValueError, match="linear_warm_start_pca must be 0"):
        load_config(overrides={"train.linear_warm_start": "true", "train.linear_warm_start_pca": "-2"})
    assert load_config("parachute", {"train.linear_warm_start_pca": "16"}).train.linear_warm_start is False
    assert load_config(overrides={"train.linear_warm_start": "true"}).train.linear_warm_start_pca == 16
