"""Guarantees of the classical baselines (shared_model.baselines), the fusion model's top level
(shared_model.model / heads) and the result plots / atomic writes that the other test modules
leave implicit. Tiny in-memory data; every test runs in well under a second or two."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from shared_model.baselines import ConcatFeatures, fit_coxph, fit_random_forest, principal_axes
from test_model_fixtures import CLIN, CT, SLIDES, make_site

# ---------------------------------------------------------------------------------- baselines


@pytest.fixture(scope="module")
def two_sites():
    """Two in-memory sites with CT, slides and a tabular block; ~20 % of each modality missing."""
    return (make_site("A", (CT, SLIDES, CLIN), 40, seed=11), make_site("B", (CT, SLIDES, CLIN), 36, seed=12))


def _offset(site, shift: dict[str, float]):
    """The site with a constant added to every stored value of the named modalities (a batch effect)."""
    mods = {m: dataclasses.replace(md, values=md.values + np.float32(shift[m])) if m in shift else md
            for m, md in site.modalities.items()}
    return dataclasses.replace(site, modalities=mods)


def test_principal_axes_keep_at_most_n_minus_one_centred_axes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 8)) + 10.0
    mean, axes = principal_axes(x, 16)
    np.testing.assert_allclose(mean, x.mean(axis=0))
    assert axes.shape == (4, 8)  # n - 1 = 4 directions carry the spread of 5 points; a 5th would be noise
    np.testing.assert_allclose(axes @ axes.T, np.eye(4), atol=1e-10)


def test_token_features_are_pca_scores_fitted_on_the_training_rows_with_the_modality(two_sites):
    """Features of any rows are (summary - training mean) @ training axes; the held-out rows never
    shape the reduction (changing them changes no training feature), absent patients are NaN."""
    a, b = two_sites
    train = {"A": np.arange(0, 40, 2), "B": np.arange(0, 36, 2)}
    test = np.arange(1, 40, 2)
    f = ConcatFeatures((CT, SLIDES, CLIN), pca_components=3).fit([(a, train["A"]), (b, train["B"])])
    assert f.columns() == [f"ct:pc{i}" for i in range(3)] + [f"slides:pc{i}" for i in range(3)] + \
        ["clin:a", "clin:b", "clin:c", "clin:d"]
    summ = np.concatenate([a.modalities["ct"].summaries(train["A"]), b.modalities["ct"].summaries(train["B"])])
    summ = summ[np.isfinite(summ).all(axis=1)]
    mean, axes = principal_axes(summ, 3)
    x = f.transform(a, test)
    raw = a.modalities["ct"].summaries(test)
    np.testing.assert_allclose(x[:, :3], (raw - mean) @ axes.T, atol=1e-10)
    assert np.isnan(x[~a.modalities["ct"].present[test], :3]).all()
    np.testing.assert_array_equal(x[:, 6:], a.modalities["clin"].values[test].astype(np.float64))
    # the test rows' embeddings are arbitrary: shifting them leaves the fit untouched
    shifted_ct = a.modalities["ct"]
    vals = shifted_ct.values.copy()
    for r in test:
        vals[shifted_ct.offsets[r]:shifted_ct.offsets[r + 1]] += 50.0
    a2 = dataclasses.replace(a, modalities={**a.modalities, "ct": dataclasses.replace(shifted_ct, values=vals)})
    f2 = ConcatFeatures((CT, SLIDES, CLIN), pca_components=3).fit([(a2, train["A"]), (b, train["B"])])
    np.testing.assert_allclose(f2.transform(a2, train["A"]), f.transform(a, train["A"]), atol=1e-10)


def test_agreement_column_ignores_a_sites_constant_embedding_offset(two_sites):
    """Each site's summaries are centred on its own training patients before the agreement map:
    a batch offset on one site's CT and slides changes no agreement value."""
    a, b = two_sites
    parts = [(a, np.arange(40)), (b, np.arange(36))]
    f = ConcatFeatures((CT, SLIDES), pca_components=2, agreement=True, agreement_components=3).fit(parts)
    a_off = _offset(a, {"ct": 3.0, "slides": -2.0})
    g = ConcatFeatures((CT, SLIDES), pca_components=2, agreement=True, agreement_components=3).fit(
        [(a_off, np.arange(40)), (b, np.arange(36))])
    x, y = f.transform(a, np.arange(40))[:, -1], g.transform(a_off, np.arange(40))[:, -1]
    both = a.modalities["ct"].present & a.modalities["slides"].present
    assert np.isfinite(x[both]).all() and np.std(x[both]) > 1e-3
    np.testing.assert_allclose(y, x, atol=1e-5)  # float32 rounding of the shifted tokens


def _cox_data(n: int = 80, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)) * np.array([1.0, 5.0, 0.2]) + np.array([0.0, 20.0, -3.0])
    lin = 1.2 * (x[:, 0]) - 0.15 * (x[:, 1] - 20.0)
    t_ev = rng.exponential(400.0 * np.exp(-lin))
    t_c = rng.uniform(100, 900, n)
    return x, np.minimum(t_ev, t_c).round() + 1, (t_ev <= t_c).astype(int)


def test_coxph_risk_is_the_standardised_linear_predictor_with_training_mean_imputation():
    x, t, e = _cox_data()
    x[::7, 1] = np.nan  # a partly missing column
    model = fit_coxph(x, t, e)
    mean, std = np.nanmean(x, axis=0), np.nanstd(x, axis=0)
    beta = model.fitter.params_.to_numpy()
    assert model.fitter.penalizer == 0.5  # the documented default
    z = (np.where(np.isfinite(x), x, mean) - mean) / std
    np.testing.assert_allclose(model.risk(x), z @ beta, rtol=1e-10, atol=1e-12)
    # the fitted model is lifelines' on that design: its own linear predictor agrees
    import pandas as pd
    df = pd.DataFrame(z, columns=[f"x{i}" for i in range(3)])
    np.testing.assert_allclose(model.risk(x), np.log(model.fitter.predict_partial_hazard(df)).to_numpy()
                               + float(model.fitter._norm_mean.to_numpy() @ beta), rtol=1e-6, atol=1e-8)
    # the coefficients are lifelines' on the training-mean-imputed, standardised design
    from lifelines import CoxPHFitter
    ref = CoxPHFitter(penalizer=0.5).fit(df.assign(T=t, E=e), duration_col="T", event_col="E")
    np.testing.assert_allclose(beta, ref.params_.to_numpy(), rtol=1e-6, atol=1e-8)
    # a new patient missing the column scores as one at the training mean
    row = np.array([[0.3, np.nan, -3.1]])
    np.testing.assert_allclose(model.risk(row), model.risk(np.array([[0.3, mean[1], -3.1]])))
    # higher risk = shorter survival (the first column raises the hazard, the second lowers it)
    assert beta[0] > 0 and beta[1] < 0
    # the penalty is the one asked for
    assert fit_coxph(x, t, e, penalizer=0.01).fitter.penalizer == 0.01


def test_coxph_drops_constant_columns_and_stratifies_two_sites():
    x, t, e = _cox_data()
    x = np.c_[x, np.full(len(x), 4.0), np.full(len(x), np.nan)]  # constant and all-missing columns
    model = fit_coxph(x, t, e, strata=np.array(["A", "B"] * 40))
    assert model.keep.tolist() == [True, True, True, False, False]
    assert np.isfinite(model.risk(x)).all()
    assert np.atleast_1d(model.fitter.strata).tolist() == ["site"]  # each of the two hospitals has its own baseline hazard
    assert not fit_coxph(x, t, e, strata=np.array(["A"] * 80)).fitter.strata


def test_random_forest_scores_status_one_with_most_frequent_training_imputation():
    rng = np.random.default_rng(0)
    n = 60
    x = np.c_[rng.normal(size=n), rng.choice([1.0, 2.0, 2.0, 7.0], size=n), rng.normal(size=n)]
    y = (x[:, 0] > 0).astype(int)
    x[::5, 2] = np.nan  # a partly missing column is kept (its observed values still count)
    x[:3, 1] = np.nan
    x = np.c_[x, np.full(n, np.nan)]  # an all-missing column is dropped
    model = fit_random_forest(x, y, seed=3, n_estimators=25)
    assert model.keep.tolist() == [True, True, True, False]
    for j in range(3):
        col = x[:, j][np.isfinite(x[:, j])]
        vals, counts = np.unique(col, return_counts=True)
        assert model.fill[j] == vals[np.argmax(counts)]
    assert model.fill[1] == 2.0
    assert model.model.random_state == 3 and model.model.n_estimators == 25
    p = model.score(np.array([[3.0, 2.0, 0.0, np.nan], [-3.0, 2.0, 0.0, np.nan]]))
    assert p[0] > 0.8 and p[1] < 0.2  # the probability of status 1
    # a missing value scores as the training mode (here the informative column: its mode is its minimum)
    q = np.array([[np.nan, np.nan, np.nan, np.nan]])
    filled = model.score(np.array([[model.fill[0], 2.0, model.fill[2], 0.0]]))
    np.testing.assert_array_equal(model.score(q), filled)
    assert filled[0] < 0.2


def test_documented_baseline_defaults():
    import inspect

    assert inspect.signature(fit_random_forest).parameters["n_estimators"].default == 500
    assert inspect.signature(fit_coxph).parameters["penalizer"].default == 0.5
    assert ConcatFeatures((CT,)).pca_components == 16


# ---------------------------------------------------------------------------------- model / heads

from shared_model.heads import AuxHead, HazardHead, StatusHead  # noqa: E402
from shared_model.model import build_model  # noqa: E402
from test_model_fixtures import ALL_SPECS, mixed_batch, small_cfg  # noqa: E402
from test_model_fixtures import single_torch_thread  # noqa: E402,F401  (autouse fixture)


def test_heads_are_the_documented_gelu_mlps_with_dropout():
    """HazardHead d -> H -> H -> 1 and StatusHead d -> H -> 1, GELU (smooth, so GCS's curvature
    is not piecewise zero) and dropout ``cfg.dropout``."""
    import torch.nn as nn

    hz, st = HazardHead(6, 5, 0.3), StatusHead(6, 5, 0.3)
    assert [(m.in_features, m.out_features) for m in hz.net if isinstance(m, nn.Linear)] == [(6, 5), (5, 5), (5, 1)]
    assert [(m.in_features, m.out_features) for m in st.net if isinstance(m, nn.Linear)] == [(6, 5), (5, 1)]
    for head, n_act in ((hz, 2), (st, 1)):
        acts = [m for m in head.net if not isinstance(m, (nn.Linear, nn.Dropout))]
        assert len(acts) == n_act and all(isinstance(m, nn.GELU) for m in acts)
        assert [m.p for m in head.net if isinstance(m, nn.Dropout)] == [0.3] * n_act
    assert hz(torch.zeros(4, 6)).shape == (4,) and st(torch.zeros(4, 6)).shape == (4,)


def test_aux_head_reads_risk_and_status_from_their_own_outputs():
    torch.manual_seed(0)
    head = AuxHead(5, with_status=True)
    x = torch.randn(7, 5)
    risk, status = head(x)
    full = head.net(x)
    torch.testing.assert_close(risk, full[:, 0])
    torch.testing.assert_close(status, full[:, 1])
    assert not torch.allclose(risk, status)
    assert AuxHead(5, with_status=False)(x)[1] is None


def test_status_logit_comes_from_the_status_head_not_the_hazard_head():
    model = build_model(ALL_SPECS, small_cfg(), seed=0).eval()
    batch = mixed_batch()
    with torch.no_grad():
        out = model(batch)
        torch.testing.assert_close(out.risk, model.hazard_head(out.fused))
        torch.testing.assert_close(out.status_logit, model.status_head(out.fused))
        assert not torch.allclose(out.risk, out.status_logit)
    assert build_model(ALL_SPECS, small_cfg(status_head=False), seed=0).eval()(batch).status_logit is None


def test_detached_stages_keep_the_alignment_loss_out_of_the_adapters():
    """With detach_stages the projection phi_m reads detached adapter outputs: a loss on the aligned
    vectors (L_GA) trains phi_m but no adapter parameter."""
    model = build_model(ALL_SPECS, small_cfg(detach_stages=True), seed=0)
    out = model(mixed_batch())
    out.aligned.pow(2).sum().backward()
    for name, enc in model.encoders.items():
        assert all(p.grad is None or not p.grad.any() for p in enc.adapter.parameters()), name
        assert any(p.grad is not None and p.grad.any() for p in enc.projection.parameters()), name


def test_random_drop_turns_only_the_kept_out_modality_into_its_missing_token():
    """``keep[b, j]`` False drops modality j for patient b in the fusion: exactly that column's
    presence changes, and the fused vector equals a forward where those patients lack j."""
    model = build_model(ALL_SPECS, small_cfg(), seed=0).eval()
    batch = mixed_batch()
    with torch.no_grad():
        enc = model.encode(batch)
        _, _, present, _ = model.fuse(batch, enc)
        for j in range(1, len(ALL_SPECS)):
            keep = torch.ones_like(present)
            keep[:, j] = False
            _, _, p2, _ = model.fuse(batch, enc, keep)
            expect = present.clone()
            expect[:, j] = False
            assert torch.equal(p2, expect), j


def test_adapter_level_missing_token_reaches_the_fusion_of_patients_lacking_the_modality():
    """LocXEmb reads the adapter-level token ``missing/<m>.adapter`` where a patient lacks m
    (an x-stream kind): changing it changes exactly those patients' fused vectors."""
    model = build_model(ALL_SPECS, small_cfg(), seed=0).eval()
    batch = mixed_batch()
    with torch.no_grad():
        out = model(batch)
        j = model.modality_names.index("ct")  # a sequence modality: in the default x-stream kinds
        lacking = ~out.present[:, j]
        assert lacking.any() and (~lacking).any()
        model.missing["ct"].adapter.add_(1.0)
        moved = (model(batch).fused - out.fused).abs().amax(dim=1) > 1e-6
    assert moved[lacking].all() and not moved[~lacking].any()


def test_bad_names_and_batches_are_refused_with_a_clear_error():
    from sites.types import ModalitySpec

    with pytest.raises(ValueError, match="contain no '.'"):
        build_model((ModalitySpec("ct.v2", "sequence", 4),), small_cfg(), seed=0)
    model = build_model(ALL_SPECS, small_cfg(), seed=0)
    batch = mixed_batch()
    wrong_dim = dataclasses.replace(batch.modalities["ct"], values=batch.modalities["ct"].values[..., :5])
    with pytest.raises(ValueError, match="expected token values"):
        model(dataclasses.replace(batch, modalities={**batch.modalities, "ct": wrong_dim}))
    with pytest.raises(ValueError, match="batch.expected has 1 columns"):
        model(dataclasses.replace(batch, expected=batch.expected[:, :1]))


# ---------------------------------------------------------------------------------- plots / atomic writes

import math  # noqa: E402

from server import plots  # noqa: E402
from shared_model import pooled_eval as PE  # noqa: E402
from shared_model.atomic import atomic_path, atomic_write_bytes  # noqa: E402


def _pooled(groups: int):
    rng = np.random.default_rng(1)
    n = 160
    x = rng.normal(size=n)
    t_ev = rng.exponential(1200 * np.exp(-x))
    t_c = rng.uniform(0, 3500, n)
    t, e = np.floor(np.minimum(t_ev, t_c)), (t_ev <= t_c).astype(int)
    grid = PE.make_grid(PE.site_moments(x), n_time_bins=64, n_risk_bins=32)
    return PE.pooled_metrics(PE.site_statistics(grid, t, e, x), grid, groups=groups)


@pytest.fixture()
def captured(monkeypatch, tmp_path):
    """The Figure each plot function draws (its file is still written)."""
    figs = []
    real = plots._save_atomic

    def keep(fig, path, dpi):
        figs.append(fig)
        return real(fig, path, dpi)

    monkeypatch.setattr(plots, "_save_atomic", keep)
    return figs


@pytest.mark.parametrize("n_groups", [2, 3])
def test_kaplan_meier_figure_draws_each_groups_curve_in_years_and_its_numbers_at_risk(tmp_path, captured, n_groups):
    pm = _pooled(n_groups)
    plots.plot_kaplan_meier(pm, tmp_path / "km.png")
    ax, ax_tab = captured[0].axes
    last = max(float(g.times_days[-1]) for g in pm.groups)
    x_max = math.ceil(last / plots.DAYS_PER_YEAR)
    assert ax.get_xlim() == (0, x_max)
    curves = [ln for ln in ax.get_lines() if ln.get_drawstyle() == "steps-post"]
    ticks = [ln for ln in ax.get_lines() if ln.get_marker() == "|"]
    assert len(curves) == len(ticks) == len(pm.groups)
    for g, curve, tick in zip(pm.groups, curves, ticks):
        np.testing.assert_allclose(curve.get_xdata(), np.r_[0.0, g.times_days] / plots.DAYS_PER_YEAR)
        np.testing.assert_allclose(curve.get_ydata(), np.r_[1.0, g.survival])
        cens = g.n_censored > 0
        np.testing.assert_allclose(tick.get_xdata(), g.times_days[cens] / plots.DAYS_PER_YEAR)
        np.testing.assert_allclose(tick.get_ydata(), g.survival[cens])
        assert curve.get_label().startswith(f"{g.label} risk (n={g.n_patients},")
    # the confidence bands reach the Greenwood limits
    bands = ax.collections[: len(pm.groups)]
    for g, band in zip(pm.groups, bands):
        ys = band.get_paths()[0].vertices[:, 1]
        assert ys.min() == pytest.approx(min(1.0, g.lower.min())) and ys.max() == pytest.approx(1.0)
    split = "median" if n_groups == 2 else "tertiles"
    assert ax.get_legend().get_title().get_text() == f"pooled {split} split of risk"
    title = ax.get_title()
    assert f"(95% CI {pm.hazard_ratio_ci_low:.2f}–{pm.hazard_ratio_ci_high:.2f})" in title
    assert f"N = {pm.n}, {pm.n_events} events" in title
    # numbers at risk: the row labelled with a group shows that group's counts at every whole year
    labels = {round(tick): lab.get_text() for tick, lab in zip(ax_tab.get_yticks(), ax_tab.get_yticklabels())}
    by_label = {g.label: g for g in pm.groups}
    seen = 0
    for text in ax_tab.texts:
        x, row = text.get_position()
        g = by_label[labels[round(row)]]
        assert int(text.get_text()) == int(g.at_risk([x * plots.DAYS_PER_YEAR])[0])
        seen += 1
    assert seen == (x_max + 1) * len(pm.groups)
    assert int(ax_tab.texts[0].get_text()) > 0


def test_cindex_plot_draws_each_series_where_defined_under_its_own_label(tmp_path, captured):
    history = [
        {"round": 1, "pooled": 0.61, "mean_of_sites": 0.64, "per_site": {"a": 0.7, "b": None}},
        {"round": 2, "pooled": None, "mean_of_sites": 0.66, "per_site": {"a": 0.71, "b": 0.5}},
        {"round": 3, "pooled": 0.63, "mean_of_sites": 0.65, "per_site": {"a": 0.72, "b": 0.52}},
    ]
    plots.plot_cindex_per_round(history, tmp_path / "c.png", metric="cindex_uno")
    ax = captured[0].axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    def xy(label):
        return list(lines[label].get_xdata()), list(lines[label].get_ydata())
    assert xy("pooled from site counts") == ([1, 3], [0.61, 0.63])  # the undefined round is left out
    assert xy("mean of sites (FL default)") == ([1, 2, 3], [0.64, 0.66, 0.65])
    assert xy("a") == ([1, 2, 3], [0.7, 0.71, 0.72]) and xy("b") == ([2, 3], [0.5, 0.52])
    assert ax.get_ylabel() == "Uno's C-index"


def test_cindex_plot_reads_the_server_records_plain_mean_and_client_metric_names(tmp_path, captured):
    sites = {"a": {"cindex": 0.6, "n_test": 10}, "b": {"cindex": 0.8, "n_test": 90}}
    mos = PE.mean_of_sites(sites)
    assert mos["mean"]["cindex_harrell"] != pytest.approx(mos["weighted_mean"]["cindex_harrell"])
    plots.plot_cindex_per_round([{"round": 1, "pooled": None, "mean_of_sites": mos, "sites": sites}],
                                tmp_path / "c.png")
    lines = {ln.get_label(): ln for ln in captured[0].axes[0].get_lines()}
    assert list(lines["mean of sites (FL default)"].get_ydata()) == [pytest.approx(0.7)]
    assert list(lines["a"].get_ydata()) == [0.6] and list(lines["b"].get_ydata()) == [0.8]


def test_atomic_write_stays_in_the_target_folder_syncs_and_creates_it(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_size), real_fsync(fd))[1])
    target = tmp_path / "new" / "deeper" / "out.bin"
    assert atomic_write_bytes(target, b"abc") == target
    assert target.read_bytes() == b"abc" and synced == [3]  # flushed before the fsync, so the bytes are synced
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]
    with atomic_path(tmp_path / "x.json") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".x.json.")  # same folder: os.replace is a rename
        tmp.write_text("{}")
    assert (tmp_path / "x.json").read_text() == "{}"


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_an_interrupted_atomic_write_reraises_and_leaves_the_old_file_and_no_temp(tmp_path, exc):
    target = tmp_path / "r.json"
    target.write_text("old")
    with pytest.raises(type(exc)):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise exc
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_an_atomic_write_gets_the_mode_open_would_give_not_mkstemps_0600(tmp_path, umask):
    """A new file: 0666 less the umask; a replaced file keeps its mode (results stay readable)."""
    import stat

    old = os.umask(umask)
    try:
        new = atomic_write_bytes(tmp_path / "new.json", b"{}")
        plain = tmp_path / "plain.json"
        plain.write_text("{}")
        kept = tmp_path / "kept.json"
        kept.write_text("{}")
        os.chmod(kept, 0o640)
        atomic_write_bytes(kept, b"[]")
    finally:
        os.umask(old)
    assert stat.S_IMODE(new.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_text() == "[]"


def test_kaplan_meier_refuses_an_object_that_is_not_pooled_metrics(tmp_path):
    with pytest.raises(TypeError, match="expected PooledMetrics"):
        plots.plot_kaplan_meier([0.5, 0.7], tmp_path / "km.png")
    assert not (tmp_path / "km.png").exists()


def test_agreement_term_enters_risk_and_status_with_its_own_weights_and_respects_random_drop():
    from shared_model.batch import SiteTensors

    cfg = small_cfg(unimodal_risk=True, unimodal_input="input", agreement_components=2)
    model = build_model((CT, SLIDES), cfg, seed=0).eval()
    assert list(model.agreement) == ["ct~slides"]
    assert not len(build_model((CT, SLIDES), small_cfg(agreement_components=2), seed=0).agreement)  # no residual
    site = make_site("s", (CT, SLIDES), 24, seed=2, p_missing=0.25)
    batch = SiteTensors.for_training(site, (CT, SLIDES), np.arange(24), "none").batch(np.arange(24))
    term = model.agreement["ct~slides"]
    g = torch.Generator().manual_seed(0)
    term.load_map(torch.randn(2, 12, generator=g), torch.randn(2, 10, generator=g), torch.eye(2))
    with torch.no_grad():
        term.missing.fill_(0.3)
        enc = model.encode(batch)
        r0, s0 = model.unimodal_terms(batch, enc)
        term.weight.copy_(torch.tensor([0.5, -2.0]))
        r1, s1 = model.unimodal_terms(batch, enc)
        value = model.agreement_value(batch, "ct~slides")
        torch.testing.assert_close(r1 - r0, 0.5 * value)
        torch.testing.assert_close(s1 - s0, -2.0 * value)
        both = (batch.modalities["ct"].present & batch.modalities["slides"].present).bool()
        assert both.any() and (~both).any()
        assert torch.all(value[~both] == 0.3) and torch.all(value[both] != 0.3)
        keep = torch.ones(24, 2, dtype=torch.bool)
        keep[:, 0] = False  # CT dropped for everyone: the term's missing value for everyone
        assert torch.all(model.agreement_value(batch, "ct~slides", keep) == 0.3)
