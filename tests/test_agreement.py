"""The cross-modal agreement reader (shared_model.agreement), its CoxPH column and its wide term."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from shared_model.agreement import fit_agreement
from shared_model.baselines import ConcatFeatures
from shared_model.batch import SiteTensors, fit_input_stats
from shared_model.config import load_config
from shared_model.train import TrainPart, model_builder, predict_rows
from shared_model.warm_start import linear_design, warm_start_linear_terms
from simulations.cv import make_folds, run_classical, training_parts
from sites import load_site
from sites.synthetic import write_synthetic_site


def _paired(n: int, rho: np.ndarray, rng: np.random.Generator, k: int = 4, d_a: int = 20, d_b: int = 15):
    """Patients whose a- and b-embeddings carry unit vectors with cosine rho under an unknown
    rotation: a-tokens [T, d_a] (signal on 30 % of them) and one b-vector [1, d_b]."""
    qa = np.linalg.qr(rng.standard_normal((d_a, k)))[0]
    qb = np.linalg.qr(rng.standard_normal((d_b, k)))[0]
    rot = np.linalg.qr(rng.standard_normal((k, k)))[0]
    tok_a, tok_b = [], []
    for i in range(n):
        u = rng.standard_normal(k)
        u /= np.linalg.norm(u)
        w = rng.standard_normal(k)
        w -= (w @ u) * u
        w /= np.linalg.norm(w)
        v = rho[i] * u + np.sqrt(1 - rho[i] ** 2) * w
        t = 0.3 * rng.standard_normal((30, d_a))
        t[:9] += 3.0 * (qa @ (rot @ v))
        tok_a.append(t)
        tok_b.append(3.0 * (qb @ u)[None, :] + 0.1 * rng.standard_normal((1, d_b)))
    return tok_a, tok_b


def _summaries(tokens):
    return np.stack([t.mean(axis=0) for t in tokens])


def test_agreement_recovers_the_cosine_under_an_unknown_rotation_without_labels():
    rng = np.random.default_rng(0)
    rho = np.tanh(rng.standard_normal(400))
    tok_a, tok_b = _paired(400, rho, rng)
    ca, cb = np.mean([t.mean(0) for t in tok_a], 0), np.mean([t.mean(0) for t in tok_b], 0)
    tok_a, tok_b = [t - ca for t in tok_a], [t - cb for t in tok_b]
    amap = fit_agreement(tok_a, tok_b, _summaries(tok_a), _summaries(tok_b), k=4)
    s = amap.score(_summaries(tok_a), _summaries(tok_b))
    assert np.all(np.abs(s) <= 1 + 1e-9)
    r = np.corrcoef(s, rho)[0, 1]
    assert abs(r) > 0.9, r  # sign is arbitrary; the reading is not
    assert amap.eigen_gap > 1.1 and amap.patients == 400
    # with rho = 0 for everyone there is nothing to align: the same reader finds no signal
    tok_a0, tok_b0 = _paired(400, np.zeros(400), np.random.default_rng(1))
    null = fit_agreement(tok_a0, tok_b0, _summaries(tok_a0), _summaries(tok_b0), k=4)
    assert null.eigen_gap < amap.eigen_gap


def test_agreement_rejects_too_few_patients_and_bad_values_by_name():
    rng = np.random.default_rng(0)
    tok_a, tok_b = _paired(6, np.zeros(6), rng)
    with pytest.raises(ValueError, match="6 training patients have both ct and slide"):
        fit_agreement(tok_a, tok_b, _summaries(tok_a), _summaries(tok_b), k=4, names=("ct", "slide"))
    tok_a, tok_b = _paired(40, np.zeros(40), rng)
    tok_a[3] = tok_a[3].copy()
    tok_a[3][0, 0] = np.nan
    with pytest.raises(ValueError, match="ct tokens of patient 3 contain NaN"):
        fit_agreement(tok_a, tok_b, np.nan_to_num(_summaries(tok_a)), _summaries(tok_b), k=4, names=("ct", "slide"))
    amap = fit_agreement(tok_a[:3] + tok_a[4:], tok_b, np.nan_to_num(_summaries(tok_a)), _summaries(tok_b), k=4)
    with pytest.raises(ValueError, match="expected a"):
        amap.score(np.zeros((2, 3)), np.zeros((2, 15)))
    assert np.isnan(amap.score(np.full((1, 20), np.nan), np.ones((1, 15)))).all()
    with pytest.raises(ValueError, match="slide has 15 dimensions, fewer than the k = 16"):
        fit_agreement(tok_a[:3] + tok_a[4:], tok_b, np.nan_to_num(_summaries(tok_a)), _summaries(tok_b), k=16,
                      names=("ct", "slide"))


MODS = (("ct", "sequence", 12), ("slide", "vector", 10), ("lab", "tabular", 3))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("agreement")
    return load_site(write_synthetic_site(root, "s", 60, modalities=MODS, seed=5, n_folds=3))


def test_coxph_agreement_appends_one_label_free_column_per_pair_of_embedding_modalities(site):
    rows = np.arange(len(site))
    plain = ConcatFeatures(site.spec.modalities, pca_components=3).fit([(site, rows)])
    agree = ConcatFeatures(site.spec.modalities, pca_components=3, agreement=True, agreement_components=3
                           ).fit([(site, rows)])
    x, xa = plain.transform(site, rows), agree.transform(site, rows)
    assert agree.columns() == plain.columns() + ["ct~slide:agreement"]
    np.testing.assert_array_equal(xa[:, :-1], x)
    lacking = ~site.modalities["ct"].present | ~site.modalities["slide"].present
    assert lacking.any() and np.isnan(xa[lacking, -1]).all()
    assert np.all(np.abs(xa[~lacking, -1]) <= 1 + 1e-9)
    # fitted without labels: shuffling the survival labels leaves the column unchanged
    shuffled = dataclasses.replace(site, time=site.time[::-1].copy(), event=site.event[::-1].copy())
    again = ConcatFeatures(site.spec.modalities, pca_components=3, agreement=True, agreement_components=3
                           ).fit([(shuffled, rows)])
    np.testing.assert_allclose(again.transform(shuffled, rows)[:, -1], xa[:, -1])
    fold = make_folds([site], "fold_cv")[0]
    risk, _, _ = run_classical("coxph-agreement", {"s": site}, fold, seed=0)
    assert np.isfinite(risk["s"]).all()
    other = dataclasses.replace(site, spec=dataclasses.replace(site.spec, name="unseen"))
    with pytest.raises(ValueError, match="site 'unseen'"):
        agree.transform(other, rows)


SMALL = {"model.d_inter": 16, "model.d_token": 8, "model.hazard_hidden": 16, "model.dce_dim": 8,
         "model.n_heads": 2, "train.batch_size": 8, "train.num_threads": 1, "train.linear_warm_start": True,
         "train.linear_warm_start_pca": 3, "model.agreement_components": 3}


def test_agreement_term_needs_the_warm_start():
    with pytest.raises(ValueError, match="train.linear_warm_start=true"):
        load_config(None, {"model.agreement_components": 3})
    with pytest.raises(ValueError, match="agreement_components must be 0"):
        load_config(None, {**SMALL, "model.agreement_components": -1})


def _offset(site, shift: dict[str, float]):
    """The site with a constant added to every token of the named modalities (a batch effect)."""
    mods = {m: dataclasses.replace(md, values=md.values + np.float32(shift[m])) if m in shift else md
            for m, md in site.modalities.items()}
    return dataclasses.replace(site, modalities=mods)


def test_site_centres_are_the_training_patients_mean_summary(site):
    train = np.arange(0, len(site), 2)
    for mode in ("none", "per_dimension"):
        tensors = SiteTensors.for_training(site, site.spec.modalities, train, mode)
        stats = fit_input_stats(site, train, mode)
        for m in ("ct", "slide"):
            md = site.modalities[m]
            rows = [r for r in train if md.present[r]]
            st = stats.get(m)
            mean = np.mean([md.tokens(r).astype(np.float64).mean(axis=0) for r in rows], axis=0)
            expected = mean if st is None else (mean - st.mean) / st.std
            np.testing.assert_allclose(tensors.centres[m].numpy(), expected, rtol=1e-4, atol=1e-5)
            batch = tensors.batch(np.arange(5))
            assert batch.modalities[m].centre.shape == (5, md.spec.dim)
        assert "lab" not in tensors.centres and tensors.batch(np.arange(3)).modalities["lab"].centre is None


def test_agreement_term_under_raw_inputs_ignores_a_sites_constant_offset(site):
    """With raw embeddings (train.standardize_embeddings=none) the term still reads each site's
    centred summaries: adding a batch offset to a site's CT and slide embeddings leaves the
    fitted map's scores unchanged."""
    cfg = load_config(None, {**SMALL, "train.standardize_embeddings": "none"})
    fold = make_folds([site], "fold_cv")[0]
    rows = np.asarray(fold.test["s"])
    values = []
    for s in (site, _offset(site, {"ct": 4.0, "slide": -2.5})):
        specs, parts, tensors = training_parts({"s": s}, fold, cfg, 0)
        model = model_builder(specs, cfg, 0)()
        warm_start_linear_terms(model, parts, 0.5, 3)
        with torch.no_grad():
            values.append(model.agreement_value(tensors["s"].batch(rows), "ct~slide").numpy())
    assert np.std(values[0]) > 0.05
    np.testing.assert_allclose(values[1], values[0], atol=1e-3)
    bare = SiteTensors(site, specs)  # no centres: the term refuses rather than read uncentred inputs
    with pytest.raises(ValueError, match="ct: the batch carries no site centre"):
        model.agreement_value(bare.batch(rows), "ct~slide")


def test_warm_started_agreement_term_is_the_fitted_column_and_inert_until_fitted(site):
    cfg = load_config(None, SMALL)
    fold = make_folds([site], "fold_cv")[0]
    specs, parts, tensors = training_parts({"s": site}, fold, cfg, 0)
    model = model_builder(specs, cfg, 0)()
    assert list(model.agreement) == ["ct~slide"] and "agreement" in model.parameter_groups()
    term = model.agreement["ct~slide"]
    rows = np.asarray(fold.test["s"])
    batch = tensors["s"].batch(rows)
    before = model.unimodal_terms(batch, model.encode(batch))[0]
    assert float(term.fitted) == 0.0
    with torch.no_grad():
        term.weight.fill_(5.0)  # unfitted: contributes nothing whatever its weight
        assert torch.allclose(model.unimodal_terms(batch, model.encode(batch))[0], before)
        term.weight.zero_()
    full = [TrainPart(p.tensors, np.sort(np.concatenate([p.train_idx, p.val_idx]))) for p in parts]
    warm_start_linear_terms(model, full, 0.5, 3)
    assert float(term.fitted) == 1.0 and float(term.weight[0].detach()) != 0.0
    # the term's value: the map's score where both modalities are present, the training mean elsewhere
    design = linear_design(model, full, keep_tokens=["ct", "slide"])
    both = (design.present["ct"] & design.present["slide"]).numpy()
    value = model.agreement_value(tensors["s"].batch(full[0].train_idx), "ct~slide")
    assert np.allclose(value.detach().numpy()[~both], float(term.missing.detach()))
    assert np.isclose(float(term.missing.detach()), value.detach().numpy()[both].mean(), atol=1e-5)
    risk, _ = predict_rows(model, tensors["s"], rows)
    assert np.isfinite(risk).all()


def test_coxph_agreement_pairs_modalities_within_patients_when_sites_lack_one():
    """Sites with only CT, only slides, or both: the map is fitted on the patients that have
    both (not on one site's CT rows beside another site's slide rows), and a site without
    slides gets a NaN agreement column instead of an error."""
    from test_model_fixtures import CT, SLIDES, make_site

    only_ct = make_site("C", (CT,), 30, seed=3, p_missing=0.0)
    only_slides = make_site("D", (SLIDES,), 30, seed=4, p_missing=0.0)
    both = make_site("E", (CT, SLIDES), 60, seed=5, p_missing=0.0)
    f = ConcatFeatures((CT, SLIDES), agreement=True).fit(
        [(only_ct, np.arange(30)), (only_slides, np.arange(30)), (both, np.arange(60))])
    assert f._agree["ct", "slides"].patients == 60
    x = f.transform(only_ct, np.arange(5))
    assert np.isnan(x[:, -1]).all() and np.isfinite(f.transform(both, np.arange(5))[:, -1]).all()
    # different numbers of patients per modality used to fail to broadcast
    ConcatFeatures((CT, SLIDES), agreement=True).fit([(both, np.arange(60)), (only_slides, np.arange(20))])


def test_agreement_map_is_whitened_and_its_rotation_a_partial_isometry():
    """Steps 2-3 of shared_model.agreement: the axes whiten the paired training summaries (unit
    std per coordinate) and M is the polar factor U V^T (orthogonal when k_a = k_b)."""
    rng = np.random.default_rng(2)
    rho = np.tanh(rng.standard_normal(120))
    tok_a, tok_b = _paired(120, rho, rng)
    ca, cb = np.mean([t.mean(0) for t in tok_a], 0), np.mean([t.mean(0) for t in tok_b], 0)
    tok_a, tok_b = [t - ca for t in tok_a], [t - cb for t in tok_b]
    sa, sb = _summaries(tok_a), _summaries(tok_b)
    amap = fit_agreement(tok_a, tok_b, sa, sb, k=4)
    np.testing.assert_allclose((sa @ amap.axes_a.T).std(axis=0), 1.0, rtol=1e-9)
    np.testing.assert_allclose((sb @ amap.axes_b.T).std(axis=0), 1.0, rtol=1e-9)
    np.testing.assert_allclose(amap.rotation @ amap.rotation.T, np.eye(4), atol=1e-10)
    np.testing.assert_allclose(np.linalg.svd(amap.rotation, compute_uv=False), 1.0, atol=1e-10)


def test_warm_started_agreement_weight_is_lifelines_coefficient_on_its_column(site):
    """The agreement term enters the penalised Cox fit as one z-scored column; its fitted weight,
    mapped back to the column's units, is lifelines' CoxPHFitter(penalizer) coefficient on the
    same design (PCA-reduced embeddings, tabular summaries, agreement column), and the model's
    linear log-risk on the training rows is lifelines' up to a constant."""
    from lifelines import CoxPHFitter
    import pandas as pd

    cfg = load_config(None, {**SMALL, "model.cox_ties": "efron"})
    fold = make_folds([site], "fold_cv")[0]
    specs, parts, tensors = training_parts({"s": site}, fold, cfg, 0)
    model = model_builder(specs, cfg, 0)()
    warm_start_linear_terms(model, parts, 0.5, 3)
    design = linear_design(model, parts)
    raw = design.design({m: model.missing[m].input.detach().double() for m in model.modality_names})
    blocks = []
    for spec in specs:
        x = raw[spec.name].numpy()
        if spec.kind != "tabular":
            have = design.present[spec.name].numpy()
            centre = x[have].mean(axis=0)
            x = (x - centre) @ np.linalg.svd(x[have] - centre, full_matrices=False)[2][:3].T
        blocks.append(x)
    with torch.no_grad():
        batches = [p.tensors.batch(p.train_idx) for p in parts]
        agree = torch.cat([model.agreement_value(b, "ct~slide") for b in batches]).double().numpy()
        ours = torch.cat([model.unimodal_terms(b, model.encode(b))[0] for b in batches]).double().numpy()
    xr = np.concatenate([*blocks, agree[:, None]], axis=1)
    keep = xr.std(axis=0) > 1e-6
    assert keep[-1] and agree.std() > 0.05
    df = pd.DataFrame(xr[:, keep], columns=[f"x{i}" for i in range(int(keep.sum()))])
    df["T"], df["E"] = design.time.numpy(), design.event.numpy()
    cph = CoxPHFitter(penalizer=0.5).fit(df, "T", "E")
    term = model.agreement["ct~slide"]
    assert float(term.weight[0].detach()) == pytest.approx(cph.params_.values[-1], rel=1e-3, abs=1e-5)
    theirs = xr[:, keep] @ cph.params_.values
    np.testing.assert_allclose(ours - ours.mean(), theirs - theirs.mean(), atol=1e-3)
