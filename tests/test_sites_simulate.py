"""The generator of the simulated CPTAC/TCGA embeddings: latent risk, split, geometry, learnability."""

from __future__ import annotations

import numpy as np
import pytest

from sites.cptac_tcga import read_labels, site_labels
from sites.simulate import (harrell_c, impute_event_times, kaplan_meier, latent_risk, load_params,
                            make_geometry, oracle_risk, radiology_tokens, rng_for, semantic_vectors,
                            simulate_cohort)


@pytest.fixture(scope="module")
def params():
    return load_params()


@pytest.fixture(scope="module")
def kirc(params):
    labels = read_labels("MMISTCCRCC.tsv", ("TCGA-",))
    return labels, simulate_cohort("tcga-kirc", labels.patient_ids, labels.time, labels.event,
                                   labels.n_slides, 0, params)


def test_harrell_c_refuses_nan_and_undefined_inputs() -> None:
    with pytest.raises(ValueError, match="finite"):
        harrell_c(np.array([1.0, 2.0]), np.array([np.nan, 1.0]), np.array([1, 1]))
    with pytest.raises(ValueError, match="no comparable pair"):
        harrell_c(np.array([1.0, 2.0]), np.array([0.0, 1.0]), np.array([0, 0]))


def test_kaplan_meier_and_imputation() -> None:
    time = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 8.0])
    event = np.array([1, 1, 0, 1, 0, 0])
    ts, s = kaplan_meier(time, event)
    np.testing.assert_allclose(ts, [1, 2, 3])
    np.testing.assert_allclose(s, [5 / 6, 5 / 6 * 4 / 5, 5 / 6 * 4 / 5 * 2 / 3])  # at risk 6, 5, 3
    tstar = impute_event_times(time, event, np.random.default_rng(0))
    assert (tstar[event == 1] == time[event == 1]).all()
    assert (tstar[event == 0] > time[event == 0]).all()  # beyond the censoring time


def test_latent_risk_hits_target_and_is_consistent(params) -> None:
    labels = read_labels("CPTACPDA.tsv")
    lat = latent_risk(labels.time, labels.event, "cptac-pda", 0, params)
    assert lat.oracle_c == pytest.approx(params.target_oracle_c, abs=0.01)
    np.testing.assert_allclose(lat.r + lat.p + lat.x, lat.eta, atol=1e-10)
    assert (lat.tstar >= labels.time).all()
    np.testing.assert_array_equal(oracle_risk(labels.time, labels.event, "cptac-pda", 0, params), lat.eta)
    # each component only sees part of the risk: worse than the oracle on its own
    c_r = harrell_c(labels.time, lat.r, labels.event)
    c_p = harrell_c(labels.time, lat.p, labels.event)
    c_rp = harrell_c(labels.time, lat.r + lat.p, labels.event)
    assert max(c_r, c_p) < c_rp < lat.oracle_c
    assert 0.55 < c_r < lat.oracle_c - 0.05 and 0.55 < c_p < lat.oracle_c - 0.05
    assert 0.3 < np.corrcoef(lat.r, lat.eta)[0, 1] < 0.85


def test_geometry_is_orthonormal_and_seeded(params) -> None:
    g = make_geometry(0, params)
    basis = np.column_stack([g.d_r, g.d_t, g.a_r, g.b_r, g.drift])
    np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-5)
    pb = np.column_stack([g.d_p, g.a_p, g.b_p])
    np.testing.assert_allclose(pb.T @ pb, np.eye(pb.shape[1]), atol=1e-5)
    assert not np.allclose(make_geometry(1, params).d_r, g.d_r)


def test_semantic_vectors_hide_rho_from_each_modality() -> None:
    rng = np.random.default_rng(0)
    cos_uv, first_coord = [], []
    rhos = rng.uniform(-0.95, 0.95, 4000)
    for rho in rhos:
        u, v = semantic_vectors(float(rho), rng, 8)
        assert np.linalg.norm(u) == pytest.approx(1) and np.linalg.norm(v) == pytest.approx(1)
        cos_uv.append(u @ v)
        first_coord.append((u[0], v[0], abs(v).max()))
    np.testing.assert_allclose(cos_uv, rhos, atol=1e-9)  # agreement = rho exactly
    fc = np.array(first_coord)
    for col in range(3):  # neither vector alone carries rho
        assert abs(np.corrcoef(fc[:, col], rhos)[0, 1]) < 0.06


def test_cohort_shapes_and_signal(kirc, params) -> None:
    labels, co = kirc
    g = make_geometry(0, params)
    lat = co.latent
    proj_r, proj_p, agree = [], [], []
    for i, pid in enumerate(labels.patient_ids):
        rad = co.radiology[pid].astype(np.float32)
        path = co.pathology[pid].astype(np.float32)
        assert co.radiology[pid].dtype == np.float16 and rad.shape[1] == 1024
        assert 40 <= rad.shape[0] <= 150 and path.shape == (1, 768)
        a, b = co.tumour_block[pid]
        assert 0.15 <= (b - a) / rad.shape[0] <= 0.40
        proj_r.append(rad[a:b].mean(0) @ g.d_r)
        proj_p.append(path.mean(0) @ g.d_p)
        s1, s2 = g.a_r.T @ rad[a:b].mean(0), g.a_p.T @ path.mean(0)
        agree.append(s1 @ s2 / np.linalg.norm(s1) / np.linalg.norm(s2))
    # the fixed directions carry r and p cleanly; the tumour-slice / slide agreement carries rho
    assert np.corrcoef(proj_r, lat.r)[0, 1] > 0.99
    assert np.corrcoef(proj_p, lat.p)[0, 1] > 0.99
    assert np.corrcoef(agree, lat.rho)[0, 1] > 0.85


def test_simulation_is_deterministic(params) -> None:
    labels = read_labels("CPTACUCEC.tsv")
    a = simulate_cohort("cptac-ucec", labels.patient_ids, labels.time, labels.event, None, 0, params)
    b = simulate_cohort("cptac-ucec", labels.patient_ids, labels.time, labels.event, None, 0, params)
    c = simulate_cohort("cptac-ucec", labels.patient_ids, labels.time, labels.event, None, 1, params)
    pid = labels.patient_ids[0]
    assert a.radiology[pid].tobytes() == b.radiology[pid].tobytes()
    assert a.pathology[pid].tobytes() == b.pathology[pid].tobytes()
    assert not np.array_equal(a.pathology[pid], c.pathology[pid])
    # another site built with the same seed: same geometry, its own batch effect and draws
    d = simulate_cohort("other-site", labels.patient_ids, labels.time, labels.event, None, 0, params)
    assert not np.array_equal(a.pathology[pid], d.pathology[pid])


def test_rng_streams_are_independent() -> None:
    x = rng_for(0, "site", "P1").random(4)
    assert np.array_equal(x, rng_for(0, "site", "P1").random(4))
    assert not np.array_equal(x, rng_for(0, "site", "P2").random(4))
    assert not np.array_equal(x, rng_for(1, "site", "P1").random(4))


def test_params_file_is_complete_and_checked(tmp_path) -> None:
    p = load_params()
    assert p.share_radiology + p.share_pathology + p.share_interaction == pytest.approx(1)
    with pytest.raises(ValueError, match="unknown generator parameters"):
        load_params(colour=1)
    with pytest.raises(ValueError, match="sum to 1"):
        load_params(share_radiology=0.9)


@pytest.mark.slow
def test_linear_cox_on_mean_pooled_tokens_learns_the_signal(params) -> None:
    """Learnability: a stratified linear Cox model on site-centred mean-pooled embeddings,
    PARACHUTE folds, fixed L2 (not tuned): fusion beats each modality and is close to the oracle."""
    import torch

    from sites.builtin import site_config

    feats = {"rad": [], "path": []}
    t_all, e_all, f_all, s_all, eta_all = [], [], [], [], []
    for si, name in enumerate(("cptac-pda", "cptac-ucec", "cptac-ccrcc", "tcga-kirc")):
        cfg = site_config(name)
        lab = site_labels(cfg)
        co = simulate_cohort(name, lab.patient_ids, lab.time, lab.event, lab.n_slides, 0, params)
        for key, src in (("rad", co.radiology), ("path", co.pathology)):
            x = np.stack([src[p].astype(np.float32).mean(0) for p in lab.patient_ids])
            feats[key].append(x - x.mean(0))
        t_all.append(lab.time), e_all.append(lab.event), f_all.append(lab.fold)
        s_all.append(np.full(len(lab.time), si)), eta_all.append(co.oracle_risk)
    t, e, f, s, eta = (np.concatenate(v) for v in (t_all, e_all, f_all, s_all, eta_all))

    def fit(z, tt, ee, ss, l2=0.01):
        z = torch.tensor(z, dtype=torch.float64)
        w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            risk = z @ w
            loss = 0.0
            for k in np.unique(ss):
                m = torch.as_tensor(ss == k)
                order = torch.as_tensor(np.argsort(-tt[ss == k], kind="stable"))
                r = risk[m][order]
                ev = torch.as_tensor(ee[ss == k][order.numpy()], dtype=torch.float64)
                loss = loss - ((r - torch.logcumsumexp(r, 0)) * ev).sum()
            loss = loss / len(tt) + l2 * (w * w).sum()
            loss.backward()
            return loss
        opt.step(closure)
        return w.detach().numpy()

    def cv(x):
        pred = np.zeros(len(t))
        for k in range(5):
            tr, te = f != k, f == k
            mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
            pred[te] = ((x[te] - mu) / sd) @ fit((x[tr] - mu) / sd, t[tr], e[tr], s[tr])
        return np.mean([harrell_c(t[s == k], pred[s == k], e[s == k]) for k in range(4)])

    rad, path = np.vstack(feats["rad"]), np.vstack(feats["path"])
    c_rad, c_path, c_both = cv(rad), cv(path), cv(np.hstack([rad, path]))
    oracle = np.mean([harrell_c(t[s == k], eta[s == k], e[s == k]) for k in range(4)])
    print(f"mean per-site C: radiology {c_rad:.3f}, pathology {c_path:.3f}, both {c_both:.3f}, "
          f"oracle {oracle:.3f}")
    assert c_both > max(c_rad, c_path) + 0.05
    assert c_both > oracle - 0.08


# ---- fourth review round (mutation testing of sites/) ----

def test_slice_count_is_inclusive_of_both_bounds() -> None:
    """n_slices ~ U{n_slices_min..n_slices_max}: both ends drawn; min == max is legal."""
    p = load_params(n_slices_min=7, n_slices_max=7)
    g = make_geometry(0, p)
    tok, _ = radiology_tokens(g, p, np.zeros(p.radiology_dim), 0.1, np.ones(p.semantic_dim) / 8 ** 0.5,
                              rng_for(0, "t"))
    assert tok.shape == (7, p.radiology_dim)
    p = load_params(n_slices_min=3, n_slices_max=4)
    g = make_geometry(0, p)
    counts = {radiology_tokens(g, p, np.zeros(p.radiology_dim), 0.0, np.ones(p.semantic_dim) / 8 ** 0.5,
                               rng_for(0, "t", i))[0].shape[0] for i in range(40)}
    assert counts == {3, 4}


def test_tumour_fraction_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="tumour_fraction"):
        load_params(tumour_fraction_min=0.5, tumour_fraction_max=0.2)
    with pytest.raises(ValueError, match="tumour_fraction"):
        load_params(tumour_fraction_min=0.0)


def test_tumour_slices_carry_exactly_the_lesion_semantic_vector() -> None:
    """Without token noise, the semantic coordinates (A_r^T token) of every tumour slice are
    radiology_semantic * v and nothing else (no background vector there); the other slices
    carry only the weak background vector of norm radiology_background_semantic."""
    p = load_params(radiology_token_noise=0.0)
    g = make_geometry(0, p)
    rng = rng_for(0, "semantic-check")
    u, v = semantic_vectors(0.7, rng, p.semantic_dim)
    tok, (a, b) = radiology_tokens(g, p, np.zeros(p.radiology_dim), 0.5, v, rng)
    sem = tok.astype(np.float64) @ g.a_r.astype(np.float64)  # [n, S]
    np.testing.assert_allclose(sem[a:b], np.tile(p.radiology_semantic * v, (b - a, 1)), atol=1e-4)
    other = np.r_[0:a, b:len(tok)]
    np.testing.assert_allclose(np.linalg.norm(sem[other], axis=1), p.radiology_background_semantic,
                               rtol=1e-3)
