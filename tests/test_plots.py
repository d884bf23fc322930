"""server.plots: the files are written (atomically), non-empty PNGs; bad input fails clearly.
(The pictures themselves were inspected by eye; see server/EVALUATION.md.)"""

from __future__ import annotations

import numpy as np
import pytest

from server.plots import format_p_value, plot_cindex_per_round, plot_kaplan_meier
from shared_model import pooled_eval as P

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pooled(groups: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    sites = []
    for n in (150, 80):
        x = rng.normal(size=n)
        t_ev = rng.exponential(1200 * np.exp(-x))
        t_c = rng.uniform(0, 3500, n)
        sites.append((np.floor(np.minimum(t_ev, t_c)), (t_ev <= t_c).astype(int), x + rng.normal(scale=0.5, size=n)))
    grid = P.make_grid(P.sum_moments([P.site_moments(r) for _, _, r in sites]), n_time_bins=128, n_risk_bins=64)
    stats = [P.site_statistics(grid, t, e, r) for t, e, r in sites]
    per_site = {f"site{i}": P.pooled_metrics(s, grid, groups=groups) for i, s in enumerate(stats)}
    return P.pooled_metrics(P.sum_statistics(stats), grid, groups=groups), per_site


def _is_png(path) -> bool:
    return path.exists() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("groups", [2, 3])
def test_kaplan_meier_png_written_atomically(tmp_path, groups):
    pm, _ = _pooled(groups)
    out = plot_kaplan_meier(pm, tmp_path / "plots" / "km.png", title="test")
    assert _is_png(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["km.png"]  # no temp file left behind
    # from the JSON results file as well (re-plotting a finished run)
    out2 = plot_kaplan_meier(pm.to_dict(), tmp_path / "km_from_dict.png")
    assert _is_png(out2)


def test_kaplan_meier_without_groups_fails_clearly(tmp_path):
    grid = P.make_grid(P.site_moments([1.0, 1.0]), n_time_bins=8, n_risk_bins=4, horizon_days=1000, horizons_days=[500])
    pm = P.pooled_metrics(P.site_statistics(grid, [10.0, 20.0], [1, 0], [1.0, 1.0]), grid)
    assert not pm.groups
    with pytest.raises(ValueError, match="cannot plot Kaplan–Meier"):
        plot_kaplan_meier(pm, tmp_path / "km.png")
    assert not (tmp_path / "km.png").exists()


def test_cindex_per_round_png_from_round_reports(tmp_path):
    pm, per_site = _pooled()
    history = [P.round_report(r, pm, per_site, exact_pooled={"cindex_harrell": 0.7}) for r in (1, 2, 3)]
    out = plot_cindex_per_round(history, tmp_path / "cindex.png")
    assert _is_png(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cindex.png"]


def test_cindex_per_round_flat_history_with_undefined_values(tmp_path):
    history = [
        {"round": 1, "pooled": 0.61, "mean_of_sites": 0.64, "per_site": {"a": 0.7, "b": None}},
        {"round": 2, "pooled": 0.66, "mean_of_sites": None, "per_site": {"a": 0.71, "b": 0.5}},
    ]
    assert _is_png(plot_cindex_per_round(history, tmp_path / "c.png", metric="cindex_harrell"))
    with pytest.raises(ValueError, match="empty history"):
        plot_cindex_per_round([], tmp_path / "d.png")
    with pytest.raises(ValueError, match="no 'round'"):
        plot_cindex_per_round([{"pooled": 0.5}], tmp_path / "e.png")


def test_cindex_per_round_from_server_round_records(tmp_path):
    """The layout of the server's history: pooled = PooledMetrics dict, mean_of_sites() output,
    per-site dicts with the client's metric names (a site without a C-index is skipped)."""
    pm, _ = _pooled()
    history = [
        {"round": r, "pooled": pm.to_dict(),
         "mean_of_sites": P.mean_of_sites({"a": {"cindex": 0.6 + r / 100, "n_test": 50}, "b": {"n_test": 5}}),
         "sites": {"a": {"cindex": 0.6 + r / 100, "n_test": 50}, "b": {"n_test": 5}}}
        for r in (1, 2, 3, 4)
    ]
    assert _is_png(plot_cindex_per_round(history, tmp_path / "c.png"))


def test_a_tiny_p_value_is_not_printed_as_zero():
    assert format_p_value(9.48e-17) == "9.5e-17" and format_p_value(8.1e-05) == "8.1e-05"
    assert format_p_value(0.0312) == "0.031" and format_p_value(None) == "n/a"


def test_summary_without_risk_groups_says_why_there_is_no_plot(tmp_path):
    """All risks equal: no pooled risk groups, so no km_final.png; the summary says so instead of
    listing the file (the run used to crash drawing it, before summary.md and DONE)."""
    from types import SimpleNamespace

    from server.summary import write_summary
    from shared_model.runconfig import settings_from_run_config

    grid = P.make_grid(P.site_moments([0.5, 0.5, 0.5, 0.5]), n_time_bins=16, n_risk_bins=8, horizon_days=1000,
                       horizons_days=[200])
    st = P.site_statistics(grid, [100.0, 300.0, 600.0, 900.0], [1, 0, 1, 1], [0.5, 0.5, 0.5, 0.5])
    pooled = P.pooled_metrics(st, grid).to_dict()
    assert pooled["groups"] == [] and pooled["undefined"]["groups"]
    history = [{"round": 1, "sites": {}, "pooled": pooled, "mean_of_sites": {}}]
    text = write_summary(tmp_path, settings_from_run_config({"min-sites": 1}), SimpleNamespace(sites={}),
                         history, seconds=1.0).read_text()
    assert "`km_final.png`" not in text and "No Kaplan–Meier plot: " + pooled["undefined"]["groups"] in text
