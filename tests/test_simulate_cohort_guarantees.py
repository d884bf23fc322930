"""Guarantees of the simulated CPTAC/TCGA cohorts no other test pinned (mutation review of
sites/simulate.py and sites/cptac_tcga.py): days kept as days, the latent formula of the module
docstring checked value by value against the real label files, KM imputation on hand cases,
validation of parameters and label files, seeded streams, provenance of the built content."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from sites.builtin import site_config
from sites.cptac_tcga import (LABELS_DIR, build_content, content_from_labels, missing_pattern,
                              read_labels)
from sites.simulate import (DEFAULT_PARAMS_PATH, harrell_c, impute_event_times, latent_risk,
                            load_params, make_geometry, pathology_slides, radiology_tokens, rng_for,
                            simulate_cohort)


@pytest.fixture(scope="module")
def params():
    return load_params()


@pytest.fixture(scope="module")
def ucec():
    return read_labels("CPTACUCEC.tsv")


class _FixedU:
    """A stand-in generator whose ``uniform`` returns given values (the u of the KM draw)."""

    def __init__(self, u):
        self.u = np.asarray(u, dtype=np.float64)

    def uniform(self, low, high, size):
        assert size == len(self.u)
        return self.u.copy()


def _replay_z(seed: int, site: str, n: int) -> np.ndarray:
    """The z of step 1: the 'latent' stream draws the n imputation u's first, then z."""
    rng = rng_for(seed, site, "latent")
    rng.uniform(1e-6, 1.0, size=n)
    return rng.standard_normal(n)


# ----------------------------------------------------------------------------- parameters


def test_params_validation_refuses_each_bad_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shares"):  # sum 1, but one negative
        load_params(share_radiology=-0.1, share_pathology=0.9, share_interaction=0.2)
    with pytest.raises(ValueError, match="shares"):  # off by 0.01: not a rounding error
        load_params(share_radiology=0.41)
    with pytest.raises(ValueError, match="target_oracle_c"):
        load_params(target_oracle_c=0.3)
    with pytest.raises(ValueError, match="n_slices"):
        load_params(n_slices_min=50, n_slices_max=40)
    with pytest.raises(ValueError, match="n_slices"):
        load_params(n_slices_min=0, n_slices_max=5)
    with pytest.raises(ValueError, match="tumour_fraction"):
        load_params(tumour_fraction_max=1.5)
    doc = yaml.safe_load(DEFAULT_PARAMS_PATH.read_text())
    del doc["pathology_semantic"]
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match=r"missing \['pathology_semantic'\]"):
        load_params(tmp_path / "g.yaml")


# ----------------------------------------------------------------------------- harrell / KM


def test_harrell_c_refuses_non_finite_times() -> None:
    with pytest.raises(ValueError, match="finite"):
        harrell_c(np.array([1.0, np.inf, 3.0]), np.array([0.0, 1.0, 2.0]), np.array([1, 1, 1]))


def test_imputation_hand_case_follows_km_conditional_survival() -> None:
    """time [1,2,3,4,6,10], event [1,0,1,1,0,0]: KM at 1, 3, 4 = 5/6, 5/8, 5/12; crude hazard
    3 events / 26 person-days. T* = first event time with S <= u S(c), else the exponential
    tail 10 + log(S_end / (u S(c))) / hazard."""
    time = np.array([1.0, 2.0, 3.0, 4.0, 6.0, 10.0])
    event = np.array([1, 0, 1, 1, 0, 0])
    out = impute_event_times(time, event, _FixedU([0.5, 0.9, 0.5, 0.5, 0.5, 0.25]))
    hazard = 3 / 26
    # c=2: S(c)=5/6, target 0.75: S(3)=5/8 qualifies first (S(4)=5/12 too, later)
    # c=6: S(c)=5/12, target 5/24 < S_end: tail 10 + log(2) / hazard
    # c=10: target 5/48: tail 10 + log(4) / hazard
    np.testing.assert_allclose(out, [1, 3, 3, 4, 10 + math.log(2) / hazard, 10 + math.log(4) / hazard],
                               rtol=1e-12)


def test_imputation_conditions_on_survival_at_a_tied_censoring_time() -> None:
    """Censored at 2, an event time: S(c) is the KM *at* 2 (2/3), not just before it (5/6)."""
    time = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 8.0])
    event = np.array([1, 1, 0, 1, 0, 0])
    out = impute_event_times(time, event, _FixedU([0.5, 0.5, 0.65, 0.5, 0.5, 0.5]))
    # target 2/3 * 0.65 = 0.4333 < S(3) = 4/9: no event time qualifies -> tail, hazard 3/21
    assert out[2] == pytest.approx(8 + math.log((4 / 9) / (2 / 3 * 0.65)) * 7, rel=1e-12)


def test_imputed_survival_fraction_is_uniform() -> None:
    """200 events at days 1..200 and 200 patients censored at day 0.5: S(T*) ~ U(0, 1) for
    the censored, so about half their imputed times lie beyond day 100."""
    time = np.r_[np.arange(1.0, 201.0), np.full(200, 0.5)]
    event = np.r_[np.ones(200, int), np.zeros(200, int)]
    out = impute_event_times(time, event, np.random.default_rng(0))[200:]
    assert 0.4 < np.mean(out > 100) < 0.6
    assert 0.15 < np.mean(out > 150) < 0.35


# ----------------------------------------------------------------------------- latent risk


@pytest.mark.parametrize("file", ["CPTACUCEC.tsv", "CPTACPDA.tsv"])
def test_eta_is_minus_log_days_over_the_center_plus_noise(file: str, params) -> None:
    """eta - sigma z = -(log max(T*, 1 day) - log 1000 days) / 1: equal to the real OS_days
    term for an event patient, below it for a censored one (T* > c)."""
    lab = read_labels(file)
    lat = latent_risk(lab.time, lab.event, "site-x", 0, params)
    z = _replay_z(0, "site-x", len(lab.time))
    base = lat.eta - lat.sigma * z
    ev = lab.event == 1
    raw = pd.read_csv(LABELS_DIR / file, sep="\t", dtype={"case_id": str})
    days = raw.groupby("case_id", sort=False)["OS_days"].first().loc[lab.patient_ids].to_numpy(float)
    np.testing.assert_allclose(base[ev], -(np.log(np.maximum(days[ev], 1.0)) - np.log(1000.0)), atol=1e-9)
    np.testing.assert_allclose(base, -(np.log(np.maximum(lat.tstar, 1.0)) - np.log(1000.0)), atol=1e-9)
    assert (base[~ev] < -(np.log(np.maximum(days[~ev], 1.0)) - np.log(1000.0))).mean() > 0.9
    assert lat.sigma > 0
    assert lat.oracle_c == harrell_c(lab.time, lat.eta, lab.event)


def test_log_time_scale_and_min_time_are_used(ucec) -> None:
    p = load_params(log_time_scale=2.0, min_time_days=30.0)
    lat = latent_risk(ucec.time, ucec.event, "s", 0, p)
    base = lat.eta - lat.sigma * _replay_z(0, "s", len(ucec.time))
    np.testing.assert_allclose(base, -(np.log(np.maximum(lat.tstar, 30.0)) - np.log(1000.0)) / 2.0,
                               atol=1e-9)


def test_sigma_is_zero_when_the_noiseless_risk_is_already_below_target(params) -> None:
    """Times 0.3 and 0.6 days both clip to 1 day: a tie, C(base) = 5/6 < 0.85 -> sigma = 0."""
    time = np.array([0.3, 0.6, 3.0])
    event = np.array([1, 1, 1])
    lat = latent_risk(time, event, "tiny", 0, params)
    assert harrell_c(time, lat.eta, event) == pytest.approx(5 / 6)
    assert lat.sigma == 0.0
    np.testing.assert_allclose(lat.eta, -(np.log([1.0, 1.0, 3.0]) - np.log(1000.0)))


def test_components_follow_the_gaussian_conditional_split(ucec, params) -> None:
    """comp_k = g_k + share_k (eta - sum g), g_k ~ N(0, share_k var(eta)) from the site's
    'components' stream (step 2); rho = tanh(x / 0.6)."""
    lat = latent_risk(ucec.time, ucec.event, "cptac-ucec", 0, params)
    shares = np.array([0.4, 0.4, 0.2])
    g = rng_for(0, "cptac-ucec", "components").standard_normal((3, len(lat.eta)))
    g = g * np.sqrt(shares * np.var(lat.eta))[:, None]
    want = g + shares[:, None] * (lat.eta - g.sum(0))[None, :]
    np.testing.assert_allclose(lat.r, want[0], atol=1e-12)
    np.testing.assert_allclose(lat.p, want[1], atol=1e-12)
    np.testing.assert_allclose(lat.x, want[2], atol=1e-12)
    np.testing.assert_allclose(lat.rho, np.tanh(lat.x / 0.6), atol=1e-12)
    # another seed: other draws g (r - 0.4 eta = g_r - 0.4 sum g, in units of sd(eta))
    lat1 = latent_risk(ucec.time, ucec.event, "cptac-ucec", 1, params)
    assert not np.allclose((lat.r - 0.4 * lat.eta) / np.std(lat.eta),
                           (lat1.r - 0.4 * lat1.eta) / np.std(lat1.eta), atol=1e-3)


def test_latent_draws_depend_on_the_site(ucec, params) -> None:
    a = latent_risk(ucec.time, ucec.event, "site-a", 0, params)
    b = latent_risk(ucec.time, ucec.event, "site-b", 0, params)
    assert not np.allclose(a.eta, b.eta)


# ----------------------------------------------------------------------------- embeddings


def test_tumour_block_length_rounds_and_start_reaches_the_end() -> None:
    """n = 10 slices, fraction 0.35: round(3.5) = 4 tumour slices, start uniform on 0..6."""
    p = load_params(n_slices_min=10, n_slices_max=10, tumour_fraction_min=0.35,
                    tumour_fraction_max=0.35, radiology_token_noise=0.0)
    g = make_geometry(0, p)
    v = np.ones(p.semantic_dim) / np.sqrt(p.semantic_dim)
    starts = set()
    for i in range(80):
        tok, (a, b) = radiology_tokens(g, p, np.zeros(p.radiology_dim), 0.3, v, rng_for(0, "blk", i))
        assert b - a == 4
        starts.add(a)
        marker = tok.astype(np.float64) @ g.d_t.astype(np.float64)
        np.testing.assert_allclose(marker[a:b], p.radiology_tumour_marker, atol=1e-4)
        np.testing.assert_allclose(np.delete(marker, np.arange(a, b)), 0.0, atol=1e-4)
    assert starts == set(range(7))


def test_pathology_slide_noise_scale() -> None:
    p = load_params()
    g = make_geometry(0, p)
    u = np.ones(p.semantic_dim) / np.sqrt(p.semantic_dim)
    s = pathology_slides(g, p, np.zeros(p.pathology_dim), 0.2, u, 6, rng_for(0, "slides"))
    assert np.std(s - s.mean(0)) == pytest.approx(0.3 * np.sqrt(5 / 6), rel=0.05)
    p0 = load_params(pathology_slide_noise=0.0)
    s0 = pathology_slides(g, p0, np.zeros(p.pathology_dim), 0.2, u, 3, rng_for(0, "slides"))
    np.testing.assert_allclose(s0, np.tile(s0[0], (3, 1)), atol=1e-6)


def test_site_batch_effect_is_the_sites_own_offset(ucec, params) -> None:
    """The mean of a site's embeddings is its 'site-effect' offset (radiology, then pathology)."""
    for site in ("site-a", "site-b"):
        co = simulate_cohort(site, ucec.patient_ids, ucec.time, ucec.event, None, 0, params)
        rs = rng_for(0, site, "site-effect")
        rad_off = rs.standard_normal(params.radiology_dim) * params.radiology_site_offset
        path_off = rs.standard_normal(params.pathology_dim) * params.pathology_site_offset
        rad_mean = np.concatenate([a.astype(np.float64) for a in co.radiology.values()]).mean(0)
        path_mean = np.concatenate([a.astype(np.float64) for a in co.pathology.values()]).mean(0)
        assert np.corrcoef(rad_mean, rad_off)[0, 1] > 0.95
        assert np.corrcoef(path_mean, path_off)[0, 1] > 0.9
        assert np.std(rad_mean) == pytest.approx(params.radiology_site_offset, rel=0.2)
        assert np.std(path_mean) == pytest.approx(params.pathology_site_offset, rel=0.3)
        np.testing.assert_array_equal(co.event, ucec.event)
        np.testing.assert_array_equal(co.time, ucec.time)


def test_pathology_noise_stream_is_per_site(ucec, params) -> None:
    """Same patient at two sites: after removing both sites' signal subspaces and offsets the
    slide noise differs (independent streams per (site, patient))."""
    g = make_geometry(0, params)
    ids, t, e = ucec.patient_ids[:3], ucec.time[:3], ucec.event[:3]
    cos = [simulate_cohort(s, ids, t, e, None, 0, params) for s in ("site-a", "site-b")]
    offs = []
    for s in ("site-a", "site-b"):
        rs = rng_for(0, s, "site-effect")
        rs.standard_normal(params.radiology_dim)
        offs.append(rs.standard_normal(params.pathology_dim) * params.pathology_site_offset)
    basis = np.column_stack([g.d_p, g.a_p, g.b_p]).astype(np.float64)
    proj = np.eye(params.pathology_dim) - basis @ basis.T
    pid = ids[0]
    d = (cos[0].pathology[pid][0] - offs[0]) - (cos[1].pathology[pid][0] - offs[1])
    assert np.linalg.norm(proj @ d) > 0.3 * np.sqrt(params.pathology_dim)  # ~0.42 sqrt(768) expected


# ----------------------------------------------------------------------------- label files


def test_patients_keep_the_order_of_first_appearance_and_fold_counts() -> None:
    for file, n_folds in (("CPTACPDA.tsv", 5), ("CPTACUCEC.tsv", 4), ("MMISTCCRCC.tsv", 5)):
        raw = pd.read_csv(LABELS_DIR / file, sep="\t", dtype={"case_id": str})
        lab = read_labels(file)
        assert lab.patient_ids == list(dict.fromkeys(raw["case_id"]))
        assert lab.n_folds == n_folds
    pda = read_labels("CPTACPDA.tsv")
    assert pda.patient_ids[0] == "C3L-00017"  # first row of the file, not the sorted first


def _tsv(tmp_path: Path, rows, n_folds: int = 2) -> Path:
    cols = ["case_id", "OS_event", "OS_days", *[f"fold_{k}" for k in range(n_folds)]]
    pd.DataFrame(rows, columns=cols).to_csv(tmp_path / "L.tsv", sep="\t", index=False)
    return tmp_path


def test_read_labels_refuses_bad_events_times_and_disagreeing_rows(tmp_path: Path) -> None:
    d = _tsv(tmp_path, [["A", "maybe", 10, "test", "train"], ["B", "0", 20, "train", "test"]])
    with pytest.raises(ValueError, match=r"OS_event not 0/1/True/False for \['A'\]"):
        read_labels("L.tsv", labels_dir=d)
    d = _tsv(tmp_path, [["A", "1", "ten", "test", "train"], ["B", "0", 20, "train", "test"]])
    with pytest.raises(ValueError):
        read_labels("L.tsv", labels_dir=d)
    d = _tsv(tmp_path, [["A", "1", 10, "test", "train"], ["A", "0", 10, "test", "train"],
                        ["B", "0", 20, "train", "test"]])
    with pytest.raises(ValueError, match=r"disagree on time/event/folds: \['A'\]"):
        read_labels("L.tsv", labels_dir=d)
    d = _tsv(tmp_path, [["A", "1", 10, "test", "train"], ["A", "1", 10, "train", "test"],
                        ["B", "0", 20, "train", "test"]])
    with pytest.raises(ValueError, match=r"disagree on time/event/folds: \['A'\]"):
        read_labels("L.tsv", labels_dir=d)
    with pytest.raises(ValueError, match="no patient with id prefix"):
        read_labels("MMISTCCRCC.tsv", ("ZZZ-",))


def test_eleven_fold_columns_are_numbered_numerically(tmp_path: Path) -> None:
    rows = []
    for k in range(11):
        rows.append([f"P{k}", "1", 10 + k, *["test" if j == k else "train" for j in range(11)]])
    lab = read_labels("L.tsv", labels_dir=_tsv(tmp_path, rows, 11))
    np.testing.assert_array_equal(lab.fold, np.arange(11))
    assert lab.n_folds == 11


def test_missing_pattern_follows_the_seed_and_refuses_an_overflow_by_one() -> None:
    ids = [f"P{i}" for i in range(40)]
    sets = [frozenset(missing_pattern(ids, {"radiology": 0.25}, "s", seed)["radiology"]) for seed in range(4)]
    assert len(set(sets)) == 4
    assert all(len(s) == 10 for s in sets)
    assert sets[0] != frozenset(ids[:10])
    with pytest.raises(ValueError, match="sum to more than 1"):  # 6 + 5 = 11 of 10
        missing_pattern(ids[:10], {"radiology": 0.6, "pathology": 0.5}, "s", 0)


# ----------------------------------------------------------------------------- built content


def test_content_keeps_days_events_and_records_provenance(ucec) -> None:
    content, cohort = build_content("cptac-ucec", site_config("cptac-ucec"), seed=3)
    raw = pd.read_csv(LABELS_DIR / "CPTACUCEC.tsv", sep="\t", dtype={"case_id": str}).set_index("case_id")
    pts = content.patients.set_index("patient_id")
    np.testing.assert_array_equal(pts["time"].to_numpy(float), raw.loc[pts.index, "OS_days"].to_numpy(float))
    np.testing.assert_array_equal(pts["event"].to_numpy(), raw.loc[pts.index, "OS_event"].astype(int).to_numpy())
    lay = content.layout
    assert lay.spec.time_unit == "days"
    prov = lay.provenance
    assert prov["seed"] == 3 and prov["missing"] == "default" and prov["label_file"] == "CPTACUCEC.tsv"
    assert prov["patients_lacking"] == {"pathology": 3}
    assert len(content.tokens["pathology"]) == 31 and len(content.tokens["radiology"]) == 34
    assert prov["oracle_c_index"] == round(harrell_c(ucec.time, cohort.oracle_risk, ucec.event), 4)
    assert prov["outcome_noise_sigma"] == round(cohort.latent.sigma, 4)
    _, none = content_from_labels("x", "X", ucec, {}, 0, "d", "s", "none", "F.tsv")
    assert none.latent.sigma > 0
    c2, _ = content_from_labels("x", "X", ucec, {}, 0, "d", "s", "none", "F.tsv")
    assert c2.layout.provenance["missing"] == "none" and c2.layout.provenance["label_file"] == "F.tsv"
    assert c2.layout.provenance["patients_lacking"] == {}


# ----------------------------------------------------------------------------- defect found


def test_missing_pattern_refuses_a_negative_fraction() -> None:
    """-0.05 of 40 patients used to make 38 lack radiology (a negative count sliced from the end)."""
    ids = [f"P{i}" for i in range(40)]
    with pytest.raises(ValueError, match=r"missing fraction of .radiology. must be in \[0, 1\], got -0.05"):
        missing_pattern(ids, {"radiology": -0.05}, "s", 0)
