"""Federated evaluation that equals pooled evaluation (issue #5; DESIGN.md §6).

The mean of per-site C-indices (Flower's default, FLamby's metric) ignores every pair of patients
from different sites and lets a site with one test event swing the result. Here every site turns
its held-out predictions into **additive counts on a shared grid**; the server sums them and
computes the metrics a central statistician would get from all test patients together, up to the
grid resolution. Documentation of the grid, of what a site reveals, of the measured accuracy and
of the cost: ``server/EVALUATION.md``.

One evaluation round, two additive passes (pure numpy/scipy; imported by clients and server):

1. **moments** — each site sends ``site_moments(risk)`` = ``[n, sum s, sum s^2]`` of its risk
   scores (and of its status-head scores over status-labelled patients). The server sums them
   (:func:`sum_moments`) and fixes the round's :class:`EvalGrid` with :func:`make_grid`:
   risk-bin edges at the pooled mean + pooled std x standard-normal quantiles of equal
   probability (outermost bins open to +-inf), time-bin edges uniform on
   ``[0, horizon_days]`` plus one overflow bin beyond the horizon. No patient value is seen.
2. **counts** — each site sends :func:`site_statistics` (time bin x risk bin x event counts, and
   status-score bin x label counts), sparsely encoded (:meth:`SiteStatistics.to_arrays`, at most
   one cell per patient). The server decodes (:meth:`SiteStatistics.from_arrays`, which checks
   shapes and grid identity), sums (:func:`sum_statistics`) and calls :func:`pooled_metrics`,
   whose inputs are the count arrays only: cost O(T x R), independent of the number of patients.

Conventions: times in **days**; higher risk <-> shorter survival; time bins are right-closed,
``bin j = (e_j, e_{j+1}]`` (bin 0 also holds time 0), bin T = ``(horizon, inf)``; risk bins are
left-closed, ``bin b = [q_{b-1}, q_b)``. A patient's binned time (:func:`binned_times`) is the upper
edge of its bin (overflow: one bin width beyond the horizon).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from shared_model.atomic import atomic_write_bytes
from scipy import special
from scipy import stats as sstats

from shared_model.metrics import check_finite, check_survival, ratio_with_interval

__all__ = [
    "DEFAULT_HORIZON_DAYS",
    "DEFAULT_TIME_BINS",
    "DEFAULT_RISK_BINS",
    "DEFAULT_TD_AUC_HORIZONS_DAYS",
    "EvalGrid",
    "SiteStatistics",
    "KMGroup",
    "PooledMetrics",
    "site_moments",
    "sum_moments",
    "normal_quantile_edges",
    "make_grid",
    "binned_times",
    "site_statistics",
    "sum_statistics",
    "pooled_metrics",
    "mean_of_sites",
    "round_report",
    "write_round_report",
]

#: Study horizon (days) covering the built-in cohorts (HANCOCK follow-up reaches 5163 days).
DEFAULT_HORIZON_DAYS = 5500.0
#: Finite time bins on [0, horizon] (one overflow bin is added).
DEFAULT_TIME_BINS = 512
#: Risk-score bins (and status-score bins unless set otherwise).
DEFAULT_RISK_BINS = 512
#: Horizons of the cumulative/dynamic AUC: 1, 3 and 5 years.
DEFAULT_TD_AUC_HORIZONS_DAYS = (365.0, 1095.0, 1825.0)
#: Version of the wire format of :meth:`SiteStatistics.to_arrays`.
FORMAT_VERSION = 1
_Z95 = float(special.ndtri(0.975))


# =============================================================================================
# pass 1: moments and the grid
# =============================================================================================
def site_moments(scores: object) -> np.ndarray:
    """Additive moments of one site's scores: float64 ``[3] = [n, sum s, sum s^2]``.

    ``scores`` float [N] (risk scores, or status-head scores of the status-labelled patients).
    Send ``site_moments(s).tolist()`` (a ``list[float]`` fits a Flower ``MetricRecord``).
    """
    s = check_finite("scores", scores)
    return np.array([float(s.size), float(s.sum()), float(np.dot(s, s))], dtype=np.float64)


def sum_moments(moments: Iterable[object]) -> np.ndarray:
    """Sum per-site ``[n, sum s, sum s^2]`` vectors (server side); validates each."""
    total = np.zeros(3)
    for k, m in enumerate(moments):
        arr = check_finite(f"moments[{k}]", m)
        if arr.shape != (3,) or arr[0] < 0 or arr[2] < 0 or arr[0] != round(arr[0]):
            raise ValueError(f"moments[{k}] must be [n >= 0 (integer), sum, sum of squares >= 0], got {arr.tolist()}")
        total += arr
    return total


def normal_quantile_edges(moments: object, n_bins: int) -> np.ndarray:
    """Interior edges ``[n_bins - 1]`` of equal-probability bins under N(pooled mean, pooled std).

    ``edges_k = mean + std * Phi^-1(k / n_bins)``, k = 1..n_bins-1; the outermost bins are open to
    -inf / +inf. With an even ``n_bins`` the middle edge is the pooled mean. A zero pooled
    variance (all scores equal) uses std = 1: identical scores still share one bin.
    """
    m = check_finite("moments", moments)
    if m.shape != (3,):
        raise ValueError(f"moments must be [n, sum, sum of squares], got shape {m.shape}")
    if int(n_bins) < 2:
        raise ValueError(f"need at least 2 bins, got {n_bins}")
    n, s1, s2 = m
    if n <= 0:
        raise ValueError("no scores were reported (pooled n = 0): cannot set score-bin edges")
    mean = s1 / n
    var = max(s2 / n - mean * mean, 0.0)
    std = math.sqrt(var) if var > 0 else 1.0
    levels = np.arange(1, int(n_bins)) / int(n_bins)
    edges = mean + std * special.ndtri(levels)
    if np.any(np.diff(edges) <= 0):  # std tiny relative to |mean|: float resolution exhausted
        raise ValueError(
            f"score-bin edges collapse (pooled mean {mean:g}, std {std:g}): centre the scores"
        )
    return edges


def _fingerprint(time_edges: np.ndarray, risk_edges: np.ndarray, status_edges: np.ndarray | None) -> str:
    h = hashlib.sha256()
    for arr in (time_edges, risk_edges):
        h.update(np.ascontiguousarray(arr, dtype="<f8").tobytes())
        h.update(b"|")
    h.update(b"none" if status_edges is None else np.ascontiguousarray(status_edges, dtype="<f8").tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class EvalGrid:
    """The round's shared grid, fixed by the server before any count is computed.

    * ``time_edges`` float64 [T+1], days: ``0 = e_0 < e_1 < ... < e_T = horizon``. Bin j
      (j < T) is ``(e_j, e_{j+1}]`` (bin 0 includes 0); bin T is the overflow ``(horizon, inf)``.
    * ``risk_edges`` float64 [R-1], strictly increasing interior edges; bin b = ``[q_{b-1}, q_b)``
      with ``q_{-1} = -inf``, ``q_{R-1} = +inf``.
    * ``status_edges`` float64 [R_s-1] for the status-head scores, or None when no site has a
      status label (then no status counts exist).
    * ``horizons_days``: td-AUC horizons snapped to the nearest edge in ``e_1..e_T``;
      ``requested_horizons_days``: as configured.
    """

    time_edges: np.ndarray
    risk_edges: np.ndarray
    status_edges: np.ndarray | None = None
    horizons_days: tuple[float, ...] = ()
    requested_horizons_days: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        te = check_finite("time_edges", self.time_edges)
        if te.size < 2 or te[0] != 0.0 or np.any(np.diff(te) <= 0):
            raise ValueError("time_edges must start at 0 and increase strictly, with at least 2 edges")
        re = check_finite("risk_edges", self.risk_edges)
        if re.size < 1 or np.any(np.diff(re) <= 0):
            raise ValueError("risk_edges must be at least one strictly increasing interior edge")
        se = None
        if self.status_edges is not None:
            se = check_finite("status_edges", self.status_edges)
            if se.size < 1 or np.any(np.diff(se) <= 0):
                raise ValueError("status_edges must be at least one strictly increasing interior edge")
        req = tuple(float(h) for h in self.requested_horizons_days)
        hz = tuple(float(h) for h in self.horizons_days)
        if not hz and req:
            hz = tuple(float(te[_snap_index(te, h)]) for h in req)
        if not req:
            req = hz
        if len(hz) != len(req):
            raise ValueError("horizons_days and requested_horizons_days must have the same length")
        for h in hz:
            if h not in set(te[1:].tolist()):
                raise ValueError(f"td-AUC horizon {h} days is not a time edge of the grid")
        object.__setattr__(self, "time_edges", te.copy())
        object.__setattr__(self, "risk_edges", re.copy())
        object.__setattr__(self, "status_edges", None if se is None else se.copy())
        object.__setattr__(self, "horizons_days", hz)
        object.__setattr__(self, "requested_horizons_days", req)
        for arr in (self.time_edges, self.risk_edges, self.status_edges):
            if arr is not None:
                arr.setflags(write=False)

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def horizon_days(self) -> float:
        return float(self.time_edges[-1])

    @property
    def n_time_bins(self) -> int:
        """T, the finite time bins (as in ``make_grid(n_time_bins=T)``)."""
        return int(self.time_edges.size - 1)

    @property
    def n_time_rows(self) -> int:
        """T + 1: the finite time bins plus the overflow bin (first axis of the counts)."""
        return int(self.time_edges.size)

    @property
    def n_risk_bins(self) -> int:
        return int(self.risk_edges.size + 1)

    @property
    def n_status_bins(self) -> int:
        """R_s, or 0 when the grid has no status bins."""
        return 0 if self.status_edges is None else int(self.status_edges.size + 1)

    @property
    def surv_shape(self) -> tuple[int, int, int]:
        return (self.n_time_rows, self.n_risk_bins, 2)

    @property
    def status_shape(self) -> tuple[int, int] | None:
        return None if self.status_edges is None else (self.n_status_bins, 2)

    @property
    def fingerprint(self) -> str:
        """16 hex digits identifying the edges (not the horizons): sites echo it back."""
        return _fingerprint(self.time_edges, self.risk_edges, self.status_edges)

    # -- binning -------------------------------------------------------------------------------
    def time_bin(self, time: np.ndarray) -> np.ndarray:
        """int64 bin index in 0..T of each time (days)."""
        return np.searchsorted(self.time_edges[1:], np.asarray(time, dtype=np.float64), side="left").astype(np.int64)

    def risk_bin(self, score: np.ndarray) -> np.ndarray:
        """int64 bin index in 0..R-1 of each risk score."""
        return np.searchsorted(self.risk_edges, np.asarray(score, dtype=np.float64), side="right").astype(np.int64)

    def status_bin(self, score: np.ndarray) -> np.ndarray:
        if self.status_edges is None:
            raise ValueError("this grid has no status-score bins (no site reported status labels)")
        return np.searchsorted(self.status_edges, np.asarray(score, dtype=np.float64), side="right").astype(np.int64)

    @property
    def bin_times(self) -> np.ndarray:
        """float64 [T+1] representative time (days) of each time bin: its upper edge; overflow:
        horizon + last bin width (a placeholder; pooled KM curves stop at the horizon)."""
        te = self.time_edges
        return np.r_[te[1:], te[-1] + (te[-1] - te[-2])]

    def snap(self, horizon_days: float) -> tuple[float, int]:
        """(edge value, edge index k in 1..T) nearest to ``horizon_days``; cases of a td-AUC at that
        edge are exactly the time bins < k. Raises ``ValueError`` outside ``(0, horizon]``."""
        h = float(horizon_days)
        if not (0 < h <= self.horizon_days) or not math.isfinite(h):
            raise ValueError(
                f"td-AUC horizon {h} days is outside the grid (0, {self.horizon_days:g}] days"
            )
        k = _snap_index(self.time_edges, h)
        return float(self.time_edges[k]), k

    # -- transport -----------------------------------------------------------------------------
    def to_record(self, prefix: str = "eval-") -> dict[str, Any]:
        """Plain lists / floats / str / bool, ready for a Flower ``ConfigRecord``."""
        return {
            f"{prefix}time-edges": self.time_edges.tolist(),
            f"{prefix}risk-edges": self.risk_edges.tolist(),
            f"{prefix}has-status": self.status_edges is not None,
            f"{prefix}status-edges": [] if self.status_edges is None else self.status_edges.tolist(),
            f"{prefix}horizons-days": list(self.horizons_days),
            f"{prefix}requested-horizons-days": list(self.requested_horizons_days),
            f"{prefix}grid-fingerprint": self.fingerprint,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any], prefix: str = "eval-") -> "EvalGrid":
        """Inverse of :meth:`to_record`; checks the fingerprint (a damaged record fails loudly)."""
        try:
            grid = cls(
                time_edges=np.asarray(record[f"{prefix}time-edges"], dtype=np.float64),
                risk_edges=np.asarray(record[f"{prefix}risk-edges"], dtype=np.float64),
                status_edges=(
                    np.asarray(record[f"{prefix}status-edges"], dtype=np.float64)
                    if bool(record[f"{prefix}has-status"]) else None
                ),
                horizons_days=tuple(record[f"{prefix}horizons-days"]),
                requested_horizons_days=tuple(record[f"{prefix}requested-horizons-days"]),
            )
            expected = str(record[f"{prefix}grid-fingerprint"])
        except KeyError as exc:
            raise ValueError(f"evaluation grid record lacks key {exc.args[0]!r}") from exc
        if grid.fingerprint != expected:
            raise ValueError(
                f"evaluation grid record is inconsistent: edges hash to {grid.fingerprint}, "
                f"record says {expected}"
            )
        return grid

    def summary(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "time_bins": self.n_time_bins,
            "overflow_bin": True,
            "horizon_days": self.horizon_days,
            "time_bin_width_days": float(np.median(np.diff(self.time_edges))),
            "risk_bins": self.n_risk_bins,
            "status_bins": self.n_status_bins,
            "td_auc_horizons_days": list(self.horizons_days),
            "td_auc_requested_horizons_days": list(self.requested_horizons_days),
        }


def _snap_index(edges: np.ndarray, h: float) -> int:
    inner = edges[1:]
    return int(np.argmin(np.abs(inner - h))) + 1


def make_grid(
    risk_moments: object,
    status_moments: object | None = None,
    *,
    n_time_bins: int = DEFAULT_TIME_BINS,
    n_risk_bins: int = DEFAULT_RISK_BINS,
    n_status_bins: int | None = None,
    horizon_days: float | None = None,
    horizons_days: Sequence[float] = DEFAULT_TD_AUC_HORIZONS_DAYS,
) -> EvalGrid:
    """Server side of pass 1: the round's grid from the **summed** moments only.

    * ``risk_moments``: summed ``[n, sum s, sum s^2]`` of the risk scores;
    * ``status_moments``: the same for the status-head scores of status-labelled patients, or
      None / n = 0 when no site has a status label (the grid then has no status bins);
    * ``n_time_bins`` T uniform bins on ``[0, horizon_days]`` (+ overflow); ``horizon_days`` None or
      0 = :data:`DEFAULT_HORIZON_DAYS` (run config ``eval-horizon-days = 0.0``);
    * ``n_risk_bins`` R (and ``n_status_bins``, default R) equal-probability normal-quantile bins;
    * ``horizons_days``: td-AUC horizons (days), snapped to the nearest time edge.
    """
    if int(n_time_bins) < 1:
        raise ValueError(f"n_time_bins must be >= 1, got {n_time_bins}")
    hd = DEFAULT_HORIZON_DAYS if horizon_days in (None, 0, 0.0) else float(horizon_days)
    if not (math.isfinite(hd) and hd > 0):
        raise ValueError(f"horizon_days must be a positive number of days, got {horizon_days}")
    time_edges = np.linspace(0.0, hd, int(n_time_bins) + 1)
    risk_edges = normal_quantile_edges(risk_moments, int(n_risk_bins))
    status_edges = None
    if status_moments is not None and check_finite("status_moments", status_moments)[0] > 0:
        status_edges = normal_quantile_edges(status_moments, int(n_status_bins or n_risk_bins))
    req = tuple(float(h) for h in horizons_days)
    for h in req:
        if not (0 < h <= hd):
            raise ValueError(f"td-AUC horizon {h} days is outside (0, {hd:g}] days (the grid's horizon)")
    return EvalGrid(time_edges, risk_edges, status_edges, requested_horizons_days=req)


def grid_problem(grid: EvalGrid, *, min_time_bin_days: float, max_time_bins: int, max_score_bins: int) -> str | None:
    """Site side of pass 2: why ``grid`` is finer than this site's limits (None: within them).

    The server alone chooses the grid; a site counts its patients on it only when every finite
    time bin is at least ``min_time_bin_days`` wide, there are at most ``max_time_bins`` of them,
    and at most ``max_score_bins`` risk (and status) bins — so a fine grid cannot read exact
    follow-up times back out of the counts (EVALUATION.md §4), nor make the site allocate
    an oversized table."""
    widths = np.diff(grid.time_edges)
    if widths.min() < min_time_bin_days:
        return (f"its narrowest time bin is {widths.min():.3g} days, below this site's "
                f"{min_time_bin_days:g}-day minimum")
    if grid.n_time_bins > max_time_bins:
        return f"it has {grid.n_time_bins} time bins, above this site's maximum of {max_time_bins}"
    for name, edges in (("risk", grid.risk_edges), ("status", grid.status_edges)):
        if edges is not None and edges.size + 1 > max_score_bins:
            return f"it has {edges.size + 1} {name} bins, above this site's maximum of {max_score_bins}"
    return None


def binned_times(time: object, grid: EvalGrid) -> np.ndarray:
    """float64 [N]: each patient's time replaced by its bin's representative time (days).

    Tests compare the pooled KM / log-rank / Cox results with lifelines fitted on these.
    """
    t = check_finite("time", time)
    return grid.bin_times[grid.time_bin(t)]


# =============================================================================================
# pass 2: counts
# =============================================================================================
@dataclass(eq=False)
class SiteStatistics:
    """Additive evaluation statistics of one site (or a sum of sites) on one grid.

    * ``surv`` int64 [T+1, R, 2]: patients per (time bin, risk bin, event 0/1);
    * ``status`` int64 [R_s, 2]: status-labelled patients per (status-score bin, label 0/1), or
      None when the grid has no status bins;
    * ``grid_fingerprint``: :attr:`EvalGrid.fingerprint` of the grid they were built on.
    """

    surv: np.ndarray
    status: np.ndarray | None
    grid_fingerprint: str

    def __post_init__(self) -> None:
        self.surv = _check_counts("surv", self.surv, 3)
        if self.surv.shape[2] != 2:
            raise ValueError(f"surv must have shape [T+1, R, 2], got {self.surv.shape}")
        if self.status is not None:
            self.status = _check_counts("status", self.status, 2)
            if self.status.shape[1] != 2:
                raise ValueError(f"status must have shape [R_s, 2], got {self.status.shape}")

    @property
    def n_patients(self) -> int:
        return int(self.surv.sum())

    @property
    def n_events(self) -> int:
        return int(self.surv[..., 1].sum())

    @property
    def n_status_labelled(self) -> int:
        return 0 if self.status is None else int(self.status.sum())

    def check_grid(self, grid: EvalGrid, source: str = "statistics") -> None:
        """Raise ``ValueError`` unless these counts were built on ``grid``."""
        if self.grid_fingerprint != grid.fingerprint:
            raise ValueError(
                f"{source}: counts were built on grid {self.grid_fingerprint}, the server's grid "
                f"for this round is {grid.fingerprint} (stale or foreign grid)"
            )
        if self.surv.shape != grid.surv_shape:
            raise ValueError(f"{source}: surv counts have shape {self.surv.shape}, grid needs {grid.surv_shape}")
        shape = None if self.status is None else self.status.shape
        if shape != grid.status_shape:
            raise ValueError(f"{source}: status counts have shape {shape}, grid needs {grid.status_shape}")

    # -- transport -----------------------------------------------------------------------------
    def to_arrays(self, *, dense: bool = False) -> dict[str, np.ndarray]:
        """Arrays for a Flower ``ArrayRecord``.

        Sparse (default): ``meta`` int64 [5] = [format version, T+1, R, R_s, grid hash], then
        ``surv_index``/``surv_count`` and ``status_index``/``status_count`` (int32): flat
        C-order index and count of every non-empty cell — at most one cell per patient, 8 bytes
        per non-empty cell. ``dense=True`` sends the full count arrays (int64; for summation
        schemes that need fixed-size vectors, e.g. secure aggregation).
        """
        meta = np.array(
            [FORMAT_VERSION, *self.surv.shape[:2], 0 if self.status is None else self.status.shape[0],
             int.from_bytes(bytes.fromhex(self.grid_fingerprint)[:8], "little", signed=True)],
            dtype=np.int64,
        )
        if dense:
            out = {"meta": meta, "surv": self.surv.astype(np.int64)}
            if self.status is not None:
                out["status"] = self.status.astype(np.int64)
            return out
        out = {"meta": meta}
        for name, arr in (("surv", self.surv), ("status", self.status)):
            flat = np.zeros(0, np.int64) if arr is None else arr.reshape(-1)
            if flat.size >= 2**31 or (flat.size and flat.max() >= 2**31):
                raise ValueError(f"{name} counts too large for the int32 sparse encoding; use dense=True")
            idx = np.flatnonzero(flat)
            out[f"{name}_index"] = idx.astype(np.int32)
            out[f"{name}_count"] = flat[idx].astype(np.int32)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], grid: EvalGrid, *, source: str = "site") -> "SiteStatistics":
        """Decode :meth:`to_arrays` (sparse or dense) and validate it against the server's ``grid``.

        ``source`` names the sender in error messages (site name or node id).
        """
        if "meta" not in arrays:
            raise ValueError(f"{source}: evaluation statistics lack the 'meta' array")
        meta = np.asarray(arrays["meta"])
        if meta.shape != (5,) or meta.dtype.kind not in "iu":
            raise ValueError(f"{source}: 'meta' must be 5 integers, got {meta.dtype} {meta.shape}")
        version, t1, r, rs, fp = (int(v) for v in meta)
        if version != FORMAT_VERSION:
            raise ValueError(f"{source}: statistics format version {version}, server expects {FORMAT_VERSION}")
        fp_hex = fp.to_bytes(8, "little", signed=True).hex()
        if fp_hex != grid.fingerprint:
            raise ValueError(
                f"{source}: counts were built on grid {fp_hex}, the server's grid for this round is "
                f"{grid.fingerprint} (stale or foreign grid)"
            )
        if (t1, r) != grid.surv_shape[:2] or rs != grid.n_status_bins:
            raise ValueError(
                f"{source}: statistics for a {t1}x{r} grid with {rs} status bins, server grid is "
                f"{grid.surv_shape[0]}x{grid.surv_shape[1]} with {grid.n_status_bins}"
            )
        shapes = {"surv": grid.surv_shape, "status": grid.status_shape}
        decoded: dict[str, np.ndarray | None] = {}
        for name, shape in shapes.items():
            if shape is None:
                for key in (name, f"{name}_index", f"{name}_count"):
                    arr = arrays.get(key)
                    if arr is not None and np.asarray(arr).size:
                        raise ValueError(f"{source}: '{key}' sent but the grid has no status bins")
                decoded[name] = None
            elif name in arrays:
                dense = np.asarray(arrays[name])
                if dense.shape != shape or dense.dtype.kind not in "iu":
                    raise ValueError(f"{source}: dense '{name}' must be integer {shape}, got {dense.dtype} {dense.shape}")
                decoded[name] = dense.astype(np.int64)
            else:
                decoded[name] = _decode_sparse(arrays, name, shape, source)
        stats_ = cls(decoded["surv"], decoded["status"], grid.fingerprint)
        return stats_


def _check_counts(name: str, arr: np.ndarray, ndim: int) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim != ndim:
        raise ValueError(f"{name} counts must have {ndim} dimensions, got shape {a.shape}")
    if a.dtype.kind not in "iu":
        if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            a = a.astype(np.int64)
        else:
            raise ValueError(f"{name} counts must be integers, got dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise ValueError(f"{name} counts must be >= 0, found {int(np.count_nonzero(a < 0))} negative cell(s)")
    return a.astype(np.int64, copy=False)


def _decode_sparse(arrays: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...], source: str) -> np.ndarray:
    try:
        idx = np.asarray(arrays[f"{name}_index"])
        cnt = np.asarray(arrays[f"{name}_count"])
    except KeyError as exc:
        raise ValueError(f"{source}: evaluation statistics lack the array {exc.args[0]!r}") from exc
    if idx.ndim != 1 or cnt.ndim != 1 or idx.size != cnt.size:
        raise ValueError(f"{source}: '{name}_index' and '{name}_count' must be 1-D of equal length")
    if idx.size == 0:  # empty lists (e.g. via a MetricRecord) may arrive as float arrays
        return np.zeros(shape, dtype=np.int64)
    if idx.dtype.kind not in "iu" or cnt.dtype.kind not in "iu":
        raise ValueError(f"{source}: sparse '{name}' arrays must be integers")
    size = int(np.prod(shape))
    if idx.size and (idx.min() < 0 or idx.max() >= size):
        raise ValueError(f"{source}: '{name}_index' has cell indices outside [0, {size})")
    if idx.size > 1 and np.any(np.diff(idx) <= 0):
        raise ValueError(f"{source}: '{name}_index' must be strictly increasing (no duplicate cells)")
    if cnt.size and cnt.min() <= 0:
        raise ValueError(f"{source}: '{name}_count' must be positive")
    flat = np.zeros(size, dtype=np.int64)
    flat[idx.astype(np.int64)] = cnt
    return flat.reshape(shape)


def site_statistics(
    grid: EvalGrid,
    time: object,
    event: object,
    risk: object,
    status_label: object | None = None,
    status_score: object | None = None,
) -> SiteStatistics:
    """Client side of pass 2: count one site's held-out predictions on the round's grid.

    Shapes [N]: ``time`` days (>= 0), ``event`` 0/1, ``risk`` (higher = shorter survival).
    Optional ``status_label`` [M] in {0, 1, -1} (-1 = unlabelled, not counted) with
    ``status_score`` [M] (finite where labelled; ignored where unlabelled). The status table is
    separate from the survival table, so M need not equal N: pass every test patient (with -1
    where unlabelled) or only the labelled ones. Returns counts only.
    """
    t, e, r = check_survival(time, event, ("risk", risk))
    surv = np.zeros(grid.surv_shape, dtype=np.int64)
    np.add.at(surv, (grid.time_bin(t), grid.risk_bin(r), e.astype(np.int64)), 1)
    status = None
    if (status_label is None) != (status_score is None):
        raise ValueError("give both status_label and status_score, or neither")
    if grid.status_edges is not None:
        status = np.zeros(grid.status_shape, dtype=np.int64)
    if status_label is not None:
        lab = check_finite("status_label", status_label)
        bad = int(np.count_nonzero(~np.isin(lab, (-1, 0, 1))))
        if bad:
            raise ValueError(f"status_label must be 0, 1 or -1 (unlabelled); {bad} other value(s)")
        sc = np.asarray(status_score, dtype=np.float64).reshape(-1)
        if sc.size != lab.size:
            raise ValueError(f"status_score has {sc.size} entries, status_label has {lab.size}")
        labelled = lab >= 0
        if labelled.any():
            s = check_finite("status_score (status-labelled patients)", sc[labelled])
            if status is None:
                raise ValueError(
                    "site has status labels but the round's grid has no status bins "
                    "(its status moments were not included in pass 1)"
                )
            np.add.at(status, (grid.status_bin(s), lab[labelled].astype(np.int64)), 1)
    return SiteStatistics(surv, status, grid.fingerprint)


def sum_statistics(stats_list: Sequence[SiteStatistics]) -> SiteStatistics:
    """Cell-wise sum of several sites' statistics (all on the same grid)."""
    stats_list = list(stats_list)
    if not stats_list:
        raise ValueError("no site statistics to sum")
    first = stats_list[0]
    surv = np.zeros_like(first.surv)
    status = None if first.status is None else np.zeros_like(first.status)
    for k, s in enumerate(stats_list):
        if s.grid_fingerprint != first.grid_fingerprint or s.surv.shape != first.surv.shape:
            raise ValueError(
                f"statistics #{k} were built on grid {s.grid_fingerprint} {s.surv.shape}, "
                f"#0 on {first.grid_fingerprint} {first.surv.shape}"
            )
        if (s.status is None) != (status is None) or (s.status is not None and s.status.shape != status.shape):
            raise ValueError(f"statistics #{k}: status counts do not match those of #0")
        surv += s.surv
        if status is not None:
            status += s.status
    return SiteStatistics(surv, status, first.grid_fingerprint)


# =============================================================================================
# server: pooled metrics from counts
# =============================================================================================
@dataclass
class KMGroup:
    """Kaplan–Meier curve of one risk group on the binned times (days), up to the horizon.

    Arrays [K] list only the finite time bins where the group has an event or a censoring:
    ``times_days`` = the bin's representative (upper-edge) time; ``survival`` = S just after it;
    ``lower``/``upper`` = exponential-Greenwood ``1-alpha`` band (lifelines' default);
    ``n_at_risk`` = patients at risk at the start of the bin; ``n_events``/``n_censored`` in
    the bin. ``n_beyond_horizon`` patients have times beyond the grid's horizon (at risk
    throughout the curve). ``risk_range`` = ``[lower, upper)`` risk-score edges (None =
    unbounded). Equal, to rounding, to lifelines' ``KaplanMeierFitter`` on
    :func:`binned_times`.
    """

    label: str
    risk_range: tuple[float | None, float | None]
    n_patients: int
    n_events_total: int
    times_days: np.ndarray
    survival: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    n_at_risk: np.ndarray
    n_events: np.ndarray
    n_censored: np.ndarray
    n_beyond_horizon: int
    median_survival_days: float | None

    def survival_at(self, times_days: object) -> np.ndarray:
        """S(t) (step function, 1 before the first listed time), float [len(times_days)]."""
        t = np.atleast_1d(np.asarray(times_days, dtype=np.float64))
        idx = np.searchsorted(self.times_days, t, side="right") - 1
        return np.where(idx >= 0, self.survival[np.maximum(idx, 0)], 1.0)

    def at_risk(self, times_days: object) -> np.ndarray:
        """Patients whose binned time is >= t (lifelines' numbers at risk), int64 [len(times_days)].

        Meant for t up to the horizon (the plots' range): the ``n_beyond_horizon`` patients,
        whose times the grid does not resolve, count as at risk at every t."""
        t = np.atleast_1d(np.asarray(times_days, dtype=np.float64))
        leaving = self.n_events + self.n_censored
        after = np.r_[np.cumsum(leaving[::-1])[::-1], 0]  # sum over listed bins from index i on
        return after[np.searchsorted(self.times_days, t, side="left")] + self.n_beyond_horizon

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.tolist() if isinstance(v, np.ndarray) else (list(v) if isinstance(v, tuple) else v)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "KMGroup":
        kw = dict(d)
        for k in ("times_days", "survival", "lower", "upper"):
            kw[k] = np.asarray(kw[k], dtype=np.float64)
        for k in ("n_at_risk", "n_events", "n_censored"):
            kw[k] = np.asarray(kw[k], dtype=np.int64)
        kw["risk_range"] = tuple(kw["risk_range"])
        return cls(**kw)


_SCALAR_KEYS_BASE = ("cindex_harrell", "cindex_harrell_within_sites", "cindex_uno", "auc_status")


@dataclass
class PooledMetrics:
    """Everything the server derives from (summed) counts. Undefined values are ``None`` and
    ``undefined[field]`` says why; never NaN. Times in days.

    * ``n`` / ``n_events`` — patients / events counted; ``n_status_labelled`` /
      ``n_status_positive`` — status-labelled patients / positives.

    * ``cindex_harrell`` — Harrell's C from the counts: pairs in the same risk bin count 1/2, pairs in
      the same time bin per ``same_time_bin``; ``cindex_harrell_bounds`` = a guaranteed interval for
      the exact value (every same-risk-bin pair fully (dis)concordant, every same-time-bin pair
      comparable with any credit or not comparable), ``cindex_harrell_max_error`` its half-width seen
      from the estimate — worst cases, far above the measured errors; ``cindex_harrell_pairs`` =
      comparable / concordant / tied-risk-bin pairs across time bins and same-time-bin pairs.
    * ``cindex_uno`` — Uno's IPCW C truncated at ``uno_tau_days`` (None there = not truncated);
      censoring KM from the binned censorings, evaluated mid-bin.
    * ``auc_status`` — AUC of the binary status label from the status counts (same bin = 1/2),
      ``auc_status_max_error`` its worst-case bound.
    * ``td_auc`` — ``{"<requested horizon>d": AUC or None}`` (cumulative/dynamic AUC, IPCW case
      weights), e.g. ``"365d"``; ``td_auc_detail`` — per horizon ``{horizon_days (snapped),
      requested_days, auc, n_cases, n_controls}``.
    * ``risk_split_edges`` — risk scores splitting the groups (pooled median or tertiles, at
      risk-bin edges); ``groups`` — :class:`KMGroup` per risk group, low to high.
    * ``logrank_chi2/df/p`` — log-rank test across the groups; ``hazard_ratio`` with
      ``hazard_ratio_ci_low/high`` (``1-alpha`` CI), ``log_hr``, ``log_hr_se`` — Cox (Efron ties)
      high-risk vs low-risk group.
    """

    n: int
    n_events: int
    n_status_labelled: int
    n_status_positive: int
    cindex_harrell: float | None = None
    cindex_harrell_max_error: float | None = None
    cindex_harrell_bounds: list[float] | None = None
    cindex_harrell_pairs: dict[str, float] = field(default_factory=dict)
    cindex_harrell_within_sites: float | None = None
    cindex_uno: float | None = None
    uno_tau_days: float | None = None
    auc_status: float | None = None
    auc_status_max_error: float | None = None
    td_auc: dict[str, float | None] = field(default_factory=dict)
    td_auc_detail: list[dict[str, Any]] = field(default_factory=list)
    risk_split_edges: list[float] = field(default_factory=list)
    groups: list[KMGroup] = field(default_factory=list)
    logrank_chi2: float | None = None
    logrank_df: int | None = None
    logrank_p: float | None = None
    hazard_ratio: float | None = None
    hazard_ratio_ci_low: float | None = None
    hazard_ratio_ci_high: float | None = None
    log_hr: float | None = None
    log_hr_se: float | None = None
    same_time_bin: str = "half"
    undefined: dict[str, str] = field(default_factory=dict)
    grid: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists, floats, ints, str, None; no NaN/Inf)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "groups":
                v = [g.to_dict() for g in v]
            out[f.name] = v
        _assert_json_safe(out, "PooledMetrics")
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PooledMetrics":
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        kw["groups"] = [KMGroup.from_dict(g) for g in d.get("groups", [])]
        return cls(**kw)

    def scalars(self) -> dict[str, float | None]:
        """Flat scalar view: cindex_harrell, cindex_uno, auc_status, td_auc_<h>d, logrank_p, hazard_ratio."""
        out: dict[str, float | None] = {k: getattr(self, k) for k in _SCALAR_KEYS_BASE}
        for label, auc in self.td_auc.items():
            out[f"td_auc_{label}"] = auc
        out["logrank_p"] = self.logrank_p
        out["hazard_ratio"] = self.hazard_ratio
        return out


def _assert_json_safe(obj: Any, where: str) -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{where}: non-finite value {obj} would reach a metric report")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _assert_json_safe(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _assert_json_safe(v, f"{where}[{i}]")


def _censoring_km(n_tot: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Censoring survival G at the events of each time bin, float [T+1].

    Reverse KM with scikit-survival's convention (events leave the risk set before the
    censorings at the same time): ``G_j = prod_{a <= j} (1 - c_a / (Y_a - d_a))`` at the bin's
    upper edge. An event inside bin j is, on average, preceded by half of that bin's censorings,
    so the IPCW weight uses ``G_{j-1} * (1 - c_j / (2 (Y_j - d_j)))`` (measured: halves the
    error of Uno's C and the td-AUC versus the end-of-bin value; EVALUATION.md)."""
    c = n_tot - d
    at_risk = n_tot[::-1].cumsum()[::-1]
    denom = at_risk - d
    ratio = np.divide(c, denom, out=np.zeros_like(c, dtype=np.float64), where=denom > 0)
    G = np.cumprod(1.0 - ratio)
    return np.r_[1.0, G[:-1]] * (1.0 - 0.5 * ratio)


def _pair_terms(cen: np.ndarray, dev: np.ndarray) -> dict[str, np.ndarray]:
    """Per-time-bin pair counts for concordance, O(T*R); ``cen``/``dev`` float [T+1, R] counts
    of censored patients / events per (time bin, risk bin), risk bins in increasing order.

    For events in time bin a, against patients in strictly later time bins (comparable pairs):
    ``conc[a]`` pairs with a lower risk bin (concordant), ``tied[a]`` pairs in the same risk bin,
    ``comp[a]`` all of them. Against patients in the same time bin (order unknown):
    ``ee[a]`` event-event pairs, ``ec[a]`` event-censored pairs, ``ec_conc[a]`` event-censored
    pairs with the event in a higher risk bin (+1/2 per same-risk-bin pair).
    Only time bins with events are touched by the O(R) work.
    """
    n_tot = cen + dev
    d_row = dev.sum(axis=1)
    c_row = cen.sum(axis=1)
    rows = np.flatnonzero(d_row > 0)
    T1 = n_tot.shape[0]
    from_bin = np.cumsum(n_tot[::-1], axis=0)[::-1]  # patients in time bins >= a, per risk bin
    later = np.zeros((rows.size, n_tot.shape[1]))  # ... in time bins > a, for the event rows
    has_later = rows + 1 < T1
    later[has_later] = from_bin[rows[has_later] + 1]
    dv, cn = dev[rows], cen[rows]
    later_below = np.cumsum(later, axis=1) - later
    cen_below = np.cumsum(cn, axis=1) - cn
    out = {k: np.zeros(T1) for k in ("conc", "tied", "comp", "ee", "ec", "ec_conc")}
    out["conc"][rows] = (dv * later_below).sum(axis=1)
    out["tied"][rows] = (dv * later).sum(axis=1)
    out["comp"][rows] = d_row[rows] * later.sum(axis=1)
    out["ee"] = d_row * (d_row - 1) / 2
    out["ec"] = d_row * c_row
    out["ec_conc"][rows] = (dv * (cen_below + 0.5 * cn)).sum(axis=1)
    return out


def _concordance(terms: dict[str, np.ndarray], w: np.ndarray, same_time_bin: str) -> tuple[float, float]:
    """(numerator, denominator) of a concordance index with event weights ``w`` [T+1] per time
    bin (1 for Harrell, G^-2 for Uno). Pairs across time bins: concordant + 1/2 tied risk.
    Same-time-bin pairs (``"half"``): event-event pairs comparable with credit 1/2;
    event-censored pairs comparable with probability 1/2, credited by risk order."""
    if same_time_bin not in ("exclude", "half"):
        raise ValueError(f"same_time_bin must be 'exclude' or 'half', got {same_time_bin!r}")
    num = float(w @ (terms["conc"] + 0.5 * terms["tied"]))
    den = float(w @ terms["comp"])
    if same_time_bin == "half":
        num += float(w @ (0.5 * terms["ee"] + 0.5 * terms["ec_conc"]))
        den += float(w @ (terms["ee"] + 0.5 * terms["ec"]))
    return num, den


def _auc_from_counts(pos: np.ndarray, neg: np.ndarray, wpos: np.ndarray | None = None) -> tuple[float, float, float]:
    """(numerator, denominator, same-bin weight) of an AUC from per-bin positive/negative counts
    (bins in increasing score order); ``wpos`` optional per-bin weighted positive counts."""
    wp = pos if wpos is None else wpos
    neg_below = np.cumsum(neg) - neg
    num = float(wp @ (neg_below + 0.5 * neg))
    den = float(wp.sum() * neg.sum())
    same = float(wp @ neg)
    return num, den, same


def _choose_split_edges(marginal: np.ndarray, n_groups: int) -> np.ndarray:
    """Edge indices k (1..R-1; split = risk_edges[k-1]) closest to the pooled quantiles
    g/n_groups, g = 1..n_groups-1, keeping every group non-empty. Raises ValueError if impossible."""
    n = marginal.sum()
    below = np.cumsum(marginal)[:-1]  # below[i] = patients with risk bin <= i (edge index i + 1)
    idx = np.arange(below.size)
    chosen: list[int] = []
    prev_i, prev_count = -1, 0
    for g in range(1, n_groups):
        target = n * g / n_groups
        cand = np.flatnonzero((idx > prev_i) & (below > prev_count) & (below < n))
        if cand.size == 0:
            raise ValueError(f"cannot form {n_groups} non-empty risk groups: the scores fill too few risk bins")
        i = int(cand[np.argmin(np.abs(below[cand] - target))])
        chosen.append(i + 1)
        prev_i, prev_count = i, below[i]
    return np.asarray(chosen, dtype=np.int64)


def _km(d: np.ndarray, c: np.ndarray, alpha: float = 0.05) -> tuple[np.ndarray, ...]:
    """Binned KM with exponential-Greenwood band (as lifelines). d, c: [K] per bin."""
    n = (d + c)[::-1].cumsum()[::-1].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(n > 0, d / np.where(n > 0, n, 1), 0.0)
        s = np.cumprod(1.0 - q)
        gw = np.where((n > d) & (n > 0), d / (n * (n - d)), 0.0)
        var = np.cumsum(gw)
        z = float(special.ndtri(1 - alpha / 2))
        v = np.log(s)
        inner = (s > 0) & (s < 1)
        lower = np.where(s >= 1, 1.0, 0.0).astype(np.float64)
        upper = lower.copy()
        vi, vari = v[inner], var[inner]
        lower[inner] = np.exp(-np.exp(np.log(-vi) - z * np.sqrt(vari) / vi))
        upper[inner] = np.exp(-np.exp(np.log(-vi) + z * np.sqrt(vari) / vi))
    return s, lower, upper, n


def _logrank(d_g: np.ndarray, n_g: np.ndarray) -> tuple[float, int, float]:
    """Log-rank chi-square, df, p from per-bin events d_g [G, K] and at-risk n_g [G, K]."""
    d = d_g.sum(0)
    n = n_g.sum(0)
    use = (n > 0) & (d > 0)
    d_g, n_g, d, n = d_g[:, use], n_g[:, use], d[use], n[use]
    frac = n_g / n
    obs_minus_exp = (d_g - d * frac).sum(1)
    factor = np.where(n > 1, d * (n - d) / np.maximum(n - 1, 1), 0.0)
    G = d_g.shape[0]
    V = np.empty((G, G))
    for a in range(G):
        for b in range(G):
            V[a, b] = (factor * frac[a] * ((a == b) - frac[b])).sum()
    om, Vr = obs_minus_exp[:-1], V[:-1, :-1]
    if np.any(np.diag(Vr) <= 0) or np.linalg.matrix_rank(Vr) < Vr.shape[0]:
        raise ValueError("log-rank variance is zero: no event happened while the groups were at risk together")
    chi2 = float(om @ np.linalg.solve(Vr, om))
    df = G - 1
    return chi2, df, float(sstats.chi2.sf(chi2, df))


def _cox_binary_efron(n0: np.ndarray, n1: np.ndarray, d0: np.ndarray, d1: np.ndarray,
                      max_iter: int = 100, tol: float = 1e-12) -> tuple[float, float]:
    """MLE of beta and its standard error for a Cox model with one binary covariate (group 1 vs 0)
    on per-time-bin counts, Efron's tie correction (Efron 1977), Newton–Raphson with step halving.

    Per bin with d = d0 + d1 events, u = e^beta: R = n0 + n1 u, D = d0 + d1 u, c = D/d, x = R/c;
    Efron's term ``sum_{l<d} log(R - l c) = d log c + lgamma(x+1) - lgamma(x-d+1)`` and its
    derivatives use digamma / trigamma, so the cost is O(bins), independent of the patients.
    """
    use = (d0 + d1) > 0
    n0, n1, d0, d1 = (a[use].astype(np.float64) for a in (n0, n1, d0, d1))
    d = d0 + d1

    def parts(beta: float) -> tuple[float, float, float]:
        u = math.exp(beta)
        R = n0 + n1 * u
        R1 = n1 * u
        D = d0 + d1 * u
        D1 = d1 * u
        c = D / d
        x = R / c
        ll = float((beta * d1 - (d * np.log(c) + special.gammaln(x + 1) - special.gammaln(x - d + 1))).sum())
        rho = D1 / D
        kappa = (R1 - rho * R) / c
        h1 = special.digamma(x + 1) - special.digamma(x - d + 1)
        h2 = special.polygamma(1, x - d + 1) - special.polygamma(1, x + 1)
        sum_p = d * rho + kappa * h1
        sum_p2 = d * rho**2 + 2 * rho * kappa * h1 + kappa**2 * h2
        score = float((d1 - sum_p).sum())
        info = float((sum_p - sum_p2).sum())
        return ll, score, info

    beta = 0.0
    ll, score, info = parts(beta)
    for _ in range(max_iter):
        if info <= 0:
            raise ValueError("Cox information matrix is not positive: hazard ratio not estimable")
        step = score / info
        new = beta + step
        ll_new, score_new, info_new = parts(new)
        halvings = 0
        while ll_new < ll - 1e-12 and halvings < 50:
            step /= 2
            new = beta + step
            ll_new, score_new, info_new = parts(new)
            halvings += 1
        beta, ll, score, info = new, ll_new, score_new, info_new
        if abs(step) < tol:
            break
    else:  # still moving after max_iter steps: no finite maximum (groups separated in time)
        raise ValueError(f"the Cox fit has no finite maximum (log hazard ratio still moving at {beta:.3g} "
                         f"after {max_iter} Newton steps); the risk groups are separated in time")
    if not math.isfinite(beta) or info <= 0:
        raise ValueError("Cox Newton–Raphson did not converge")
    return beta, 1.0 / math.sqrt(info)


def within_site_cindex(
    stats_list: Sequence[SiteStatistics], grid: EvalGrid, *, same_time_bin: Literal["half", "exclude"] = "half",
) -> float | None:
    """Harrell's C over pairs of patients of the **same** site, from each site's counts.

    The stratified C-index: the sites' concordant and comparable pair counts (each from
    that site's own table, same rules as :func:`pooled_metrics`) are summed before the
    ratio. A model trained with within-site risk sets (site-stratified Cox) is not asked
    to rank patients of different hospitals; this is the pooled number that matches it.
    O(sites x grid), no patients. None when no site has a comparable pair.
    """
    num = den = 0.0
    for st in stats_list:
        st.check_grid(grid)
        _, n, d = _harrell_terms(st.surv.astype(np.float64), grid, same_time_bin)
        num += n
        den += d
    return num / den if den > 0 else None


def _harrell_terms(surv: np.ndarray, grid: EvalGrid, same_time_bin: str) -> tuple[dict[str, np.ndarray], float, float]:
    """Pair terms of one count table ``surv`` [T+1, R, 2] and Harrell's numerator / denominator."""
    terms = _pair_terms(np.ascontiguousarray(surv[:, :, 0]), np.ascontiguousarray(surv[:, :, 1]))
    num, den = _concordance(terms, np.ones(grid.n_time_rows), same_time_bin)
    return terms, num, den


def pooled_metrics(
    stats: SiteStatistics,
    grid: EvalGrid,
    *,
    horizons_days: Sequence[float] | None = None,
    groups: int = 2,
    uno_tau_days: float | None = None,
    same_time_bin: Literal["half", "exclude"] = "half",
    alpha: float = 0.05,
) -> PooledMetrics:
    """Server side: all pooled metrics from (summed) counts; O((T+1) x R + R_s), no patients.

    * ``horizons_days``: td-AUC horizons (days), snapped to time edges; None = the grid's.
    * ``groups``: 2 (split at the pooled median risk) or 3 (tertiles); the split is at the
      risk-bin edge whose count below is closest to the pooled quantile.
    * ``uno_tau_days``: truncation of Uno's C (events with binned time <= tau, snapped to an
      edge); None = the largest td-AUC horizon; ``math.inf`` = no truncation.
    * ``same_time_bin``: how pairs of patients in the same time bin (order unknown) enter
      Harrell's and Uno's C. ``"half"`` (default): their expected contribution if the order
      within a bin is uniform — an event-event pair is comparable with credit 1/2, an
      event-censored pair is comparable with probability 1/2 and then gets its risk-order
      credit. ``"exclude"`` leaves them out (biased upwards by ~+0.001 on the simulated data,
      "half" ~0.0001; EVALUATION.md).
    * ``alpha``: 1 - confidence level of the KM bands and the hazard-ratio CI.
    """
    stats.check_grid(grid)
    if groups not in (2, 3):
        raise ValueError(f"groups must be 2 (median split) or 3 (tertiles), got {groups}")
    surv = stats.surv.astype(np.float64)
    n_tot = surv.sum(axis=2)
    n_time = n_tot.sum(axis=1)
    d_time = surv[:, :, 1].sum(axis=1)
    status = stats.status
    pm = PooledMetrics(
        n=stats.n_patients,
        n_events=stats.n_events,
        n_status_labelled=stats.n_status_labelled,
        n_status_positive=0 if status is None else int(status[:, 1].sum()),
        same_time_bin=same_time_bin,
        grid=grid.summary(),
    )
    und = pm.undefined

    # --- Harrell's C ------------------------------------------------------------------------
    terms, num, den = _harrell_terms(surv, grid, same_time_bin)
    cross_num = float((terms["conc"] + 0.5 * terms["tied"]).sum())
    cross_den = float(terms["comp"].sum())
    same_pairs = float((terms["ee"] + terms["ec"]).sum())
    pm.cindex_harrell_pairs = {
        "comparable": cross_den,
        "concordant": float(terms["conc"].sum()),
        "tied_risk_bin": float(terms["tied"].sum()),
        "same_time_bin": same_pairs,
    }
    if den > 0:
        pm.cindex_harrell = num / den
        # Guaranteed interval for the exact C: pairs in the same risk bin (credit 1/2 here) may
        # be fully (dis)concordant, pairs in the same time bin may all be comparable with any
        # credit, or none comparable.
        pw, nx, half_t = same_pairs, cross_num, 0.5 * pm.cindex_harrell_pairs["tied_risk_bin"]
        lo = max(nx - half_t, 0.0) / (cross_den + pw)
        hi = min((nx + half_t + pw) / (cross_den + pw), 1.0)
        pm.cindex_harrell_bounds = [min(lo, pm.cindex_harrell), max(hi, pm.cindex_harrell)]
        pm.cindex_harrell_max_error = max(pm.cindex_harrell - pm.cindex_harrell_bounds[0], pm.cindex_harrell_bounds[1] - pm.cindex_harrell)
    else:
        und["cindex_harrell"] = f"no comparable pair across time bins ({pm.n} patients, {pm.n_events} events)"

    # --- censoring KM (for Uno's C and td-AUC) -----------------------------------------------
    G = _censoring_km(n_time, d_time)

    # --- Uno's C -----------------------------------------------------------------------------
    horizons = grid.horizons_days if horizons_days is None else tuple(grid.snap(h)[0] for h in horizons_days)
    requested = grid.requested_horizons_days if horizons_days is None else tuple(float(h) for h in horizons_days)
    if uno_tau_days is None:
        tau_k = max((grid.snap(h)[1] for h in horizons), default=grid.n_time_bins)
    elif math.isinf(uno_tau_days) and uno_tau_days > 0:
        tau_k = grid.n_time_rows  # every bin, overflow included
    else:
        tau_k = grid.snap(uno_tau_days)[1]
    pm.uno_tau_days = float(grid.time_edges[tau_k]) if tau_k < grid.n_time_rows else None
    in_tau = np.arange(grid.n_time_rows) < tau_k
    has_ev = d_time > 0
    if np.any(in_tau & has_ev & (G <= 0)):
        und["cindex_uno"] = ("censoring survival reaches 0 in a time bin with events before tau: "
                        "choose a smaller uno_tau_days")
    else:
        w_uno = np.where(in_tau & has_ev, 1.0 / np.where(G > 0, G, 1.0) ** 2, 0.0)
        num_u, den_u = _concordance(terms, w_uno, same_time_bin)
        if den_u > 0:
            pm.cindex_uno = num_u / den_u
        else:
            und["cindex_uno"] = "no comparable pair with an event before tau"

    # --- status AUC --------------------------------------------------------------------------
    if status is None or pm.n_status_labelled == 0:
        und["auc_status"] = "no status-labelled patient at any site"
    else:
        pos, neg = status[:, 1].astype(np.float64), status[:, 0].astype(np.float64)
        num_s, den_s, same_s = _auc_from_counts(pos, neg)
        if den_s > 0:
            pm.auc_status = num_s / den_s
            pm.auc_status_max_error = 0.5 * same_s / den_s
        else:
            und["auc_status"] = f"only one class among {pm.n_status_labelled} status-labelled patients " \
                                f"({pm.n_status_positive} positive)"

    # --- time-dependent AUC -----------------------------------------------------------------
    risk_all = n_tot  # [T1, R]
    for h, req in zip(horizons, requested):
        _, k = grid.snap(h)
        case_w = np.zeros(grid.n_time_rows)
        ok = np.arange(grid.n_time_rows) < k
        row = {"horizon_days": float(h), "requested_days": float(req), "auc": None,
               "n_cases": int(d_time[:k].sum()), "n_controls": int(n_time[k:].sum())}
        pm.td_auc_detail.append(row)
        pm.td_auc[f"{round(req)}d"] = None
        key = f"td_auc_{round(req)}d"
        if row["n_cases"] == 0 or row["n_controls"] == 0:
            und[key] = f"{row['n_cases']} case(s) and {row['n_controls']} control(s) at {h:g} days"
            continue
        if np.any(ok & has_ev & (G <= 0)):
            und[key] = f"censoring survival reaches 0 before {h:g} days"
            continue
        case_w[ok] = 1.0 / np.where(G[ok] > 0, G[ok], 1.0)
        pos_w = (surv[:k, :, 1] * case_w[:k, None]).sum(axis=0)  # weighted cases per risk bin
        ctrl = risk_all[k:].sum(axis=0)
        num_t, den_t, _ = _auc_from_counts(pos_w, ctrl)
        row["auc"] = pm.td_auc[f"{round(req)}d"] = num_t / den_t

    # --- risk groups, KM, log-rank, hazard ratio --------------------------------------------
    marginal = n_tot.sum(axis=0)
    try:
        ks = _choose_split_edges(marginal, groups) if pm.n > 0 else None
        if ks is None:
            raise ValueError("no patients")
    except ValueError as exc:
        for f_ in ("groups", "logrank_p", "hazard_ratio"):
            und[f_] = f"risk groups undefined: {exc}"
        return pm
    pm.risk_split_edges = [float(grid.risk_edges[k - 1]) for k in ks]
    bounds = np.r_[0, ks, grid.n_risk_bins]
    labels = ("low", "high") if groups == 2 else ("low", "intermediate", "high")
    d_g, n_g, c_g = [], [], []
    T = grid.n_time_bins
    for g in range(groups):
        sl = slice(bounds[g], bounds[g + 1])
        dg = surv[:, sl, 1].sum(axis=1)
        cg = surv[:, sl, 0].sum(axis=1)
        s, lo, up, n_at = _km(dg, cg, alpha)
        seen = np.flatnonzero((dg[:T] + cg[:T]) > 0)
        below_half = np.flatnonzero(s[:T] <= 0.5)
        lo_edge = None if bounds[g] == 0 else float(grid.risk_edges[bounds[g] - 1])
        hi_edge = None if bounds[g + 1] == grid.n_risk_bins else float(grid.risk_edges[bounds[g + 1] - 1])
        pm.groups.append(KMGroup(
            label=labels[g], risk_range=(lo_edge, hi_edge),
            n_patients=int(dg.sum() + cg.sum()), n_events_total=int(dg.sum()),
            times_days=grid.bin_times[seen], survival=s[seen], lower=lo[seen], upper=up[seen],
            n_at_risk=n_at[seen].astype(np.int64), n_events=dg[seen].astype(np.int64),
            n_censored=cg[seen].astype(np.int64), n_beyond_horizon=int(dg[T] + cg[T]),
            median_survival_days=float(grid.bin_times[below_half[0]]) if below_half.size else None,
        ))
        d_g.append(dg)
        n_g.append(n_at)
        c_g.append(cg)
    d_g_arr, n_g_arr = np.array(d_g), np.array(n_g)
    if d_time.sum() == 0:
        und["logrank_p"] = "no events"
    else:
        try:
            pm.logrank_chi2, pm.logrank_df, pm.logrank_p = _logrank(d_g_arr, n_g_arr)
        except ValueError as exc:
            und["logrank_p"] = str(exc)
    lo_g, hi_g = 0, groups - 1
    if d_g_arr[lo_g].sum() == 0 or d_g_arr[hi_g].sum() == 0:
        und["hazard_ratio"] = (f"no event in the {labels[lo_g] if d_g_arr[lo_g].sum() == 0 else labels[hi_g]} "
                               "risk group: the hazard ratio is 0 or infinite")
    else:
        try:
            beta, se = _cox_binary_efron(n_g_arr[lo_g], n_g_arr[hi_g], d_g_arr[lo_g], d_g_arr[hi_g])
        except ValueError as exc:
            und["hazard_ratio"] = str(exc)
        else:
            ratios = ratio_with_interval(beta, se, float(special.ndtri(1 - alpha / 2)))
            if ratios is None:  # the rule of metrics.hazard_ratio: a ratio or bound that is 0 or infinite
                und["hazard_ratio"] = (f"the Cox fit has no finite estimate (log hazard ratio {beta:.3g}, "
                                       f"se {se:.3g}); the risk groups are separated in time")
            else:
                pm.log_hr, pm.log_hr_se = beta, se
                pm.hazard_ratio, pm.hazard_ratio_ci_low, pm.hazard_ratio_ci_high = ratios
    return pm


# =============================================================================================
# side-by-side reporting
# =============================================================================================
_MEAN_KEYS_PREFIX = ("cindex_harrell", "cindex_uno", "auc_status", "td_auc_")


#: Accepted synonyms in per-site dicts (the client's MetricRecord names -> report names).
SITE_KEY_ALIASES = {"cindex": "cindex_harrell", "auc": "auc_status", "n_test": "n_patients",
                    "num-examples": "n_patients", "n": "n_patients", "n_status": "n_status_labelled"}


def _site_scalars(v: PooledMetrics | Mapping[str, Any]) -> tuple[dict[str, float | None], float, float]:
    if isinstance(v, PooledMetrics):
        return v.scalars(), float(v.n), float(v.n_status_labelled)
    v = {SITE_KEY_ALIASES.get(k, k): x for k, x in v.items()}
    sc = {k: (None if x is None else float(x)) for k, x in v.items()
          if k.startswith(_MEAN_KEYS_PREFIX) and (x is None or isinstance(x, (int, float)))}
    n = float(v.get("n_patients", 0) or 0)
    return sc, n, float(v.get("n_status_labelled", n) or 0)


def mean_of_sites(per_site: Mapping[str, PooledMetrics | Mapping[str, Any]]) -> dict[str, Any]:
    """The Flower / FLamby-style summary of per-site values, for side-by-side reporting.

    For each discrimination metric (cindex_harrell, cindex_uno, auc_status, td_auc_<h>d): the unweighted
    mean over the sites where it is defined (FLamby), the mean weighted by the site's patients
    (status-labelled patients for auc_status; Flower's default ``num-examples`` weighting),
    the number of sites used and the sites left out (undefined there). ``per_site`` values are
    :class:`PooledMetrics` or dicts with those keys (+ ``n_patients``, ``n_status_labelled``);
    the client-side names ``cindex``, ``auc``, ``n_test``/``num-examples``, ``n_status`` are
    accepted as synonyms (:data:`SITE_KEY_ALIASES`). A key missing at a site counts as undefined
    there.
    """
    parsed = {site: _site_scalars(v) for site, v in per_site.items()}
    keys = sorted({k for sc, _, _ in parsed.values() for k in sc if k.startswith(_MEAN_KEYS_PREFIX)})
    values: dict[str, dict[str, tuple[float | None, float]]] = {}
    for k in keys:
        for site, (sc, n, n_status) in parsed.items():
            values.setdefault(k, {})[site] = (sc.get(k), n_status if k == "auc_status" else n)
    out: dict[str, Any] = {"mean": {}, "weighted_mean": {}, "n_sites": {}, "undefined_sites": {}}
    for k, by_site in values.items():
        ok = {s: (x, w) for s, (x, w) in by_site.items() if x is not None}
        out["undefined_sites"][k] = sorted(s for s, (x, _) in by_site.items() if x is None)
        out["n_sites"][k] = len(ok)
        if ok:
            xs = np.array([x for x, _ in ok.values()])
            ws = np.array([w for _, w in ok.values()])
            out["mean"][k] = float(xs.mean())
            out["weighted_mean"][k] = float((xs * ws).sum() / ws.sum()) if ws.sum() > 0 else None
        else:
            out["mean"][k] = None
            out["weighted_mean"][k] = None
    return out


def round_report(
    server_round: int,
    pooled: PooledMetrics,
    per_site: Mapping[str, PooledMetrics | Mapping[str, Any]],
    *,
    exact_pooled: Mapping[str, float | None] | None = None,
) -> dict[str, Any]:
    """JSON-ready results of one evaluation round.

    Keys: ``round``; ``pooled`` (:meth:`PooledMetrics.to_dict`); ``per_site`` (dicts);
    ``mean_of_sites`` (:func:`mean_of_sites`); ``side_by_side``: for each scalar metric,
    ``{"pooled", "mean_of_sites", "weighted_mean_of_sites", "per_site": {site: value}}`` plus
    ``"exact_pooled"`` when ``exact_pooled`` (e.g. from a simulation that holds every
    prediction) is given.
    """
    per_site_d = {s: (v.to_dict() if isinstance(v, PooledMetrics) else dict(v)) for s, v in per_site.items()}
    site_scalars = {s: (v.scalars() if isinstance(v, PooledMetrics) else _site_scalars(v)[0])
                    for s, v in per_site.items()}
    mos = mean_of_sites(per_site)
    side: dict[str, Any] = {}
    for k, x in pooled.scalars().items():
        row: dict[str, Any] = {
            "pooled": x,
            "mean_of_sites": mos["mean"].get(k),
            "weighted_mean_of_sites": mos["weighted_mean"].get(k),
            "per_site": {s: sc.get(k) for s, sc in site_scalars.items()},
        }
        if exact_pooled is not None and k in exact_pooled:
            row["exact_pooled"] = exact_pooled[k]
        side[k] = row
    report = {
        "round": int(server_round),
        "grid": pooled.grid,
        "pooled": pooled.to_dict(),
        "per_site": per_site_d,
        "mean_of_sites": mos,
        "side_by_side": side,
    }
    _assert_json_safe(report, "round_report")
    return report


def write_round_report(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``report`` as JSON atomically (temp file in the same folder + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(report, indent=1, allow_nan=False).encode())
    return path
