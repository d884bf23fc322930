"""Plots of the pooled (federated) evaluation: Kaplan–Meier of risk groups, C-index per round.

matplotlib's object API with the Agg canvas (no global backend switch, no display needed).
Every file is written atomically: a temporary file in the target folder, then ``os.replace``.
Times arrive in days (as everywhere in oncofed) and are drawn in years (days / 365.25).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from shared_model.atomic import atomic_path
from shared_model.pooled_eval import SITE_KEY_ALIASES, KMGroup, PooledMetrics

__all__ = ["plot_kaplan_meier", "plot_cindex_per_round", "kaplan_meier_problem", "DAYS_PER_YEAR"]

DAYS_PER_YEAR = 365.25
_GROUP_COLOURS = {"low": "#1f77b4", "intermediate": "#ff7f0e", "high": "#d62728"}


def kaplan_meier_problem(pooled: Mapping[str, Any] | None) -> str | None:
    """Why a round's pooled metrics (``PooledMetrics.to_dict()``, or None) give no Kaplan–Meier
    plot, e.g. every patient in one risk bin; None when they have risk groups to draw."""
    pooled = pooled or {}
    if pooled.get("groups"):
        return None
    return str((pooled.get("undefined") or {}).get("groups", "no pooled risk groups in the last round"))


def _save_atomic(fig: Figure, path: str | os.PathLike[str], dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    with atomic_path(path, suffix=".png.tmp") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return path


def format_p_value(p: float | None) -> str:
    """A p-value for a report: two significant digits, scientific below 1e-4 (never 0.0000)."""
    if p is None:
        return "n/a"
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def _as_pooled(pooled: PooledMetrics | Mapping[str, Any]) -> PooledMetrics:
    if isinstance(pooled, PooledMetrics):
        return pooled
    if isinstance(pooled, Mapping):
        return PooledMetrics.from_dict(pooled)
    raise TypeError(f"expected PooledMetrics or its to_dict(), got {type(pooled).__name__}")


def plot_kaplan_meier(
    pooled: PooledMetrics | Mapping[str, Any],
    path: str | os.PathLike[str],
    title: str = "Pooled Kaplan–Meier by predicted risk group",
    *,
    dpi: int = 130,
) -> Path:
    """Kaplan–Meier curves of the pooled risk groups, with a numbers-at-risk table.

    ``pooled``: :class:`PooledMetrics` (or its ``to_dict()``, e.g. read back from a round's
    results file). Draws each group's step curve with its Greenwood (exponential) confidence
    band and censoring ticks, the log-rank p-value and the hazard ratio high vs low (95 % CI)
    in the title, and the patients at risk at every year below the axis. x in years.
    Returns the written path. Raises ``ValueError`` when the metrics hold no risk groups.
    """
    pm = _as_pooled(pooled)
    if not pm.groups:
        reason = pm.undefined.get("groups", "no risk groups")
        raise ValueError(f"cannot plot Kaplan–Meier curves: {reason}")
    groups: list[KMGroup] = pm.groups
    last_day = max((float(g.times_days[-1]) for g in groups if g.times_days.size), default=DAYS_PER_YEAR)
    x_max_years = max(1, math.ceil(last_day / DAYS_PER_YEAR))
    ticks_years = np.arange(0, x_max_years + 1)

    fig = Figure(figsize=(8.0, 6.2))
    gs = fig.add_gridspec(2, 1, height_ratios=[4.2, 0.35 + 0.3 * len(groups)], hspace=0.22)
    ax = fig.add_subplot(gs[0])
    ax_tab = fig.add_subplot(gs[1], sharex=ax)

    for g in groups:
        colour = _GROUP_COLOURS.get(g.label, None)
        t = np.r_[0.0, g.times_days] / DAYS_PER_YEAR
        s = np.r_[1.0, g.survival]
        lo = np.r_[1.0, g.lower]
        up = np.r_[1.0, g.upper]
        label = f"{g.label} risk (n={g.n_patients}, {g.n_events_total} events)"
        line = ax.step(t, s, where="post", color=colour, lw=2, label=label)[0]
        colour = line.get_color()
        ax.fill_between(t, lo, up, step="post", color=colour, alpha=0.18, lw=0)
        cens = g.n_censored > 0
        ax.plot(g.times_days[cens] / DAYS_PER_YEAR, g.survival[cens], "|", color=colour, ms=7, mew=1.2)
    ax.set_ylim(0, 1.02)
    ax.set_xlim(0, x_max_years)
    ax.set_ylabel("Survival probability")
    ax.grid(alpha=0.3)
    hr = (
        f"HR high vs low {pm.hazard_ratio:.2f} (95% CI {pm.hazard_ratio_ci_low:.2f}–{pm.hazard_ratio_ci_high:.2f})"
        if pm.hazard_ratio is not None else f"HR n/a ({pm.undefined.get('hazard_ratio', 'undefined')})"
    )
    split = "median" if len(groups) == 2 else "tertiles"
    c_txt = f"pooled Harrell's C = {pm.cindex_harrell:.3f}" if pm.cindex_harrell is not None else "pooled C n/a"
    ax.set_title(f"{title}\n{c_txt}; N = {pm.n}, {pm.n_events} events\nlog-rank p = {format_p_value(pm.logrank_p)}; {hr}",
                 fontsize=10.5)
    handles, labels = ax.get_legend_handles_labels()
    handles.append(ax.fill_between([], [], [], color="grey", alpha=0.18, lw=0))
    labels.append("95% CI (Greenwood, log–log)")
    ax.legend(handles, labels, loc="best", fontsize=9, title=f"pooled {split} split of risk", title_fontsize=9)
    ax.tick_params(labelbottom=False)

    # numbers at risk
    ax_tab.set_ylim(-0.5, len(groups) - 0.5)
    ax_tab.set_yticks(range(len(groups)))
    ax_tab.set_yticklabels([g.label for g in groups][::-1], fontsize=9)
    for row, g in enumerate(groups[::-1]):
        counts = g.at_risk(ticks_years * DAYS_PER_YEAR)
        colour = _GROUP_COLOURS.get(g.label, "black")
        for x, n in zip(ticks_years, counts):
            ax_tab.text(x, row, str(int(n)), ha="center", va="center", fontsize=9, color=colour)
    for side in ("top", "right", "left"):
        ax_tab.spines[side].set_visible(False)
    ax_tab.tick_params(axis="y", length=0, pad=18)
    ax_tab.set_xticks(ticks_years)
    ax_tab.set_xlabel("Time (years; binned follow-up, days / 365.25)")
    ax_tab.set_title("Number at risk", fontsize=9, loc="left", pad=4)
    return _save_atomic(fig, path, dpi)


def _value(v: Any, metric: str) -> float | None:
    """A metric value from a float, a PooledMetrics.to_dict(), a mean_of_sites() output or a
    per-site dict (client names accepted: ``cindex``, ``auc``)."""
    if v is None or isinstance(v, (int, float)):
        return None if v is None else float(v)
    if isinstance(v, Mapping):
        if "mean" in v and isinstance(v["mean"], Mapping):  # mean_of_sites() output
            return _value(v["mean"].get(metric), metric)
        if metric in v:
            return _value(v[metric], metric)
        for alias, name in SITE_KEY_ALIASES.items():
            if name == metric and alias in v:
                return _value(v[alias], metric)
    return None


def _round_values(entry: Mapping[str, Any], metric: str) -> dict[str, Any]:
    """(pooled, mean_of_sites, exact_pooled, per_site) of one history entry, whatever its layout:
    a round_report (``side_by_side``), the server's round record (``pooled`` = PooledMetrics
    dict, ``mean_of_sites`` = mean_of_sites(), ``sites`` = per-site dicts) or flat floats."""
    if "side_by_side" in entry:
        entry = entry["side_by_side"].get(metric, {})
    sites = entry.get("per_site", entry.get("sites")) or {}
    return {
        "pooled": _value(entry.get("pooled"), metric),
        "mean_of_sites": _value(entry.get("mean_of_sites"), metric),
        "exact_pooled": _value(entry.get("exact_pooled"), metric),
        "per_site": {site: _value(v, metric) for site, v in sites.items()},
    }


def plot_cindex_per_round(
    history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    metric: str = "cindex_harrell",
    title: str | None = None,
    dpi: int = 130,
) -> Path:
    """Pooled, mean-of-sites, per-site (and exact pooled, when given) values per round.

    ``history``: one dict per evaluation round with a ``round`` key, in any of these layouts:
    a :func:`shared_model.pooled_eval.round_report` (its ``side_by_side[metric]`` is read); a
    round record with ``pooled`` = ``PooledMetrics.to_dict()``, ``mean_of_sites`` =
    ``mean_of_sites()`` output and ``sites``/``per_site`` = per-site dicts; or flat floats
    ``{"round", "pooled", "mean_of_sites", "per_site": {site: value}, "exact_pooled"?}``.
    Undefined (None or missing) values are left out. Returns the written path.
    """
    if not history:
        raise ValueError("empty history: nothing to plot")
    rounds: list[int] = []
    series: dict[str, list[tuple[int, float]]] = {"pooled": [], "mean_of_sites": [], "exact_pooled": []}
    sites: dict[str, list[tuple[int, float]]] = {}
    for k, entry in enumerate(history):
        if "round" not in entry:
            raise ValueError(f"history[{k}] has no 'round'")
        rnd = int(entry["round"])
        rounds.append(rnd)
        row = _round_values(entry, metric)
        for key in series:
            if row[key] is not None:
                series[key].append((rnd, row[key]))
        for site, v in row["per_site"].items():
            if v is not None:
                sites.setdefault(site, []).append((rnd, v))

    fig = Figure(figsize=(8.0, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    palette = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
    for i, (site, pts) in enumerate(sorted(sites.items())):
        x, y = zip(*pts)
        ax.plot(x, y, "o-", lw=1, ms=3.5, alpha=0.75, color=palette[i % len(palette)], label=str(site))
    styles = {
        "mean_of_sites": dict(color="0.35", ls="--", lw=2, marker="s", ms=4, label="mean of sites (FL default)"),
        "exact_pooled": dict(color="#2ca02c", ls=":", lw=2, marker="x", ms=6, label="exact pooled (all predictions)"),
        "pooled": dict(color="black", ls="-", lw=2.6, marker="D", ms=4, label="pooled from site counts"),
    }
    for key in ("mean_of_sites", "pooled", "exact_pooled"):
        if series[key]:
            x, y = zip(*series[key])
            ax.plot(x, y, **styles[key])
    ax.axhline(0.5, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("Server round")
    names = {"cindex_harrell": "Harrell's C-index", "cindex_uno": "Uno's C-index", "auc_status": "status AUC"}
    ax.set_ylabel(names.get(metric, metric))
    ax.set_title(title or f"{names.get(metric, metric)} per round: pooled vs per-site vs mean of sites", fontsize=11)
    if len(set(rounds)) <= 20:
        ax.set_xticks(sorted(set(rounds)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save_atomic(fig, path, dpi)
