"""Seeded generative model of radiology and pathology embeddings around real survival labels.

The CPTAC/TCGA sites have real patients, times (days), events and folds, but
their CT and WSI embeddings are not public. This module **simulates** them so
that (i) they have the real shapes — radiology: per-slice 1024-d tokens
[n_slices, 1024], n_slices ~ U{40..150}; pathology: 768-d slide vectors
[n_slides, 768] —, (ii) they carry a latent log-risk that is consistent with each
patient's real (time, event), (iii) each modality carries only part of that
risk, and (iv) a further part is visible only in the *local agreement* between
the tumour slices of the CT and the slide vector (what PARACHUTE's LocXEmb
top-k similarity is built to read). Parameters: ``sites/generator.yaml``.

Generative model (per site; all draws seeded, see :func:`rng_for`):

1. **Latent risk.** Kaplan–Meier S(t) of the site's real labels. An event
   patient's latent time is T* = its time; a censored patient at c gets
   T* = S^{-1}(u · S(c)), u ~ U(0, 1) (conditional survival beyond c; beyond the
   last follow-up an exponential tail with the site's crude hazard
   events / person-days). Then

       eta_i = -(log max(T*_i, min_time) - log center) / scale + sigma * z_i,  z_i ~ N(0, 1)

   with one global center/scale (eta is on the same scale at every site) and
   sigma solved per site (bisection) so that the **oracle** Harrell C-index
   C(eta; real time, event) equals ``target_oracle_c`` (0.85). eta is the
   oracle risk: the best any model reading these embeddings can know.
2. **Split.** eta = r + p + x, drawn from the Gaussian conditional of independent
   components with variance shares (0.4, 0.4, 0.2) given their sum:
   g_k ~ N(0, share_k var(eta)), comp_k = g_k + share_k (eta - sum g).
   corr(r, eta) = corr(p, eta) ~ sqrt(0.4): each modality alone sees part of it.
3. **Geometry** (shared by all sites = one foundation model): orthonormal
   directions d_r (risk), d_t (lesion marker), A_r (1024 x 8 semantic
   embedding), B_r (anatomy), drift directions in R^1024; d_p, A_p (768 x 8),
   B_p in R^768.
4. **Radiology** [n, 1024]: site offset (batch effect) + B_r z_i (patient
   anatomy) + smooth along-slice drift + i.i.d. noise; on a contiguous block of
   20-35 % "tumour" slices add  marker d_t + a_r r_i d_r + b_r A_r v_i, and on the
   other slices a weak unrelated semantic vector A_r q_s.
5. **Pathology** [n_slides, 768]: site offset + B_p z'_i + a_p p_i d_p +
   b_p A_p u_i + slide noise (a patient's slides share its signal).
6. **Interaction.** u_i uniform on the unit sphere of R^8, w_i uniform unit and
   orthogonal to u_i, rho_i = tanh(x_i / interaction_scale),
   v_i = rho_i u_i + sqrt(1 - rho_i^2) w_i. Marginally u_i and v_i are uniform
   on the sphere whatever x_i, so each modality *alone* is independent of x_i;
   only the cosine <A_r^T tumour token, A_p^T slide> ~ rho_i reveals it.

Everything is float32 in memory and stored float16; the same seed gives
bit-identical arrays.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

GENERATOR_VERSION = 1
DEFAULT_PARAMS_PATH = Path(__file__).with_name("generator.yaml")


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class GeneratorParams:
    """All parameters of the generator (values: ``sites/generator.yaml``; see its comments)."""

    target_oracle_c: float
    log_time_center_days: float
    log_time_scale: float
    min_time_days: float
    share_radiology: float
    share_pathology: float
    share_interaction: float
    interaction_scale: float
    semantic_dim: int
    anatomy_rank: int
    drift_rank: int
    radiology_dim: int
    n_slices_min: int
    n_slices_max: int
    tumour_fraction_min: float
    tumour_fraction_max: float
    radiology_token_noise: float
    radiology_site_offset: float
    radiology_anatomy: float
    radiology_drift: float
    radiology_tumour_marker: float
    radiology_signal: float
    radiology_semantic: float
    radiology_background_semantic: float
    pathology_dim: int
    pathology_slide_noise: float
    pathology_site_offset: float
    pathology_patient: float
    pathology_signal: float
    pathology_semantic: float

    def __post_init__(self) -> None:
        shares = (self.share_radiology, self.share_pathology, self.share_interaction)
        if min(shares) < 0 or abs(sum(shares) - 1.0) > 1e-6:
            raise ValueError(f"generator shares {shares} must be >= 0 and sum to 1")
        if not 0.5 < self.target_oracle_c < 1.0:
            raise ValueError(f"target_oracle_c {self.target_oracle_c} must lie in (0.5, 1)")
        if not 1 <= self.n_slices_min <= self.n_slices_max:
            raise ValueError("need 1 <= n_slices_min <= n_slices_max")
        if not 0 < self.tumour_fraction_min <= self.tumour_fraction_max <= 1:
            raise ValueError("need 0 < tumour_fraction_min <= tumour_fraction_max <= 1")

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def load_params(path: str | Path | None = None, **overrides: Any) -> GeneratorParams:
    """Read generator parameters from YAML (default ``sites/generator.yaml``) plus overrides."""
    path = Path(path) if path is not None else DEFAULT_PARAMS_PATH
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    doc.update(overrides)
    names = {f.name for f in fields(GeneratorParams)}
    unknown = sorted(set(doc) - names)
    missing = sorted(names - set(doc))
    if unknown or missing:
        raise ValueError(f"{path}: unknown generator parameters {unknown}, missing {missing}")
    return GeneratorParams(**doc)


# ----------------------------------------------------------------------------- randomness


def _key(k: Any) -> int:
    return k if isinstance(k, int) else zlib.crc32(str(k).encode("utf-8"))


def rng_for(seed: int, *keys: Any) -> np.random.Generator:
    """Independent, reproducible stream for (seed, keys...), e.g. (0, "cptac-pda", "C3L-00017")."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *(_key(k) for k in keys)]))


# ----------------------------------------------------------------------------- latent risk


def harrell_c(time: np.ndarray, risk: np.ndarray, event: np.ndarray) -> float:
    """Harrell's C-index of ``risk`` (higher = shorter survival) vs (time days, event),
    via ``lifelines.utils.concordance_index(time, -risk, event)``.

    Raises on NaN/Inf (never let one reach a metric silently) and when there is no
    comparable pair.
    """
    from lifelines.utils import concordance_index

    time = np.asarray(time, dtype=np.float64)
    risk = np.asarray(risk, dtype=np.float64)
    if not (np.isfinite(time).all() and np.isfinite(risk).all()):
        raise ValueError("harrell_c: time and risk must be finite (NaN or Inf found)")
    try:
        return float(concordance_index(time, -risk, np.asarray(event).astype(bool)))
    except ZeroDivisionError as exc:
        raise ValueError("harrell_c: no comparable pair (no event before another time)") from exc


def kaplan_meier(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Event times (days, ascending) and the Kaplan–Meier survival just after each (lifelines)."""
    from lifelines import KaplanMeierFitter

    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event).astype(bool)
    ts = np.unique(time[event])
    if len(ts) == 0:
        return ts, np.zeros(0)
    km = KaplanMeierFitter().fit(time, event)
    return ts, km.survival_function_at_times(ts).to_numpy()


def impute_event_times(time: np.ndarray, event: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """T* (days): the real time for events; for a censored patient a draw from the
    KM conditional survival beyond its censoring time (exponential tail with the
    crude hazard events / person-days beyond the last follow-up). T* >= time."""
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event).astype(bool)
    ts, surv = kaplan_meier(time, event)
    hazard = max(event.sum(), 0.5) / max(time.sum(), 1.0)
    t_end = time.max()
    s_end = surv[-1] if len(surv) else 1.0
    u = rng.uniform(1e-6, 1.0, size=len(time))
    out = time.copy()
    for i in np.flatnonzero(~event):
        c = time[i]
        s_c = surv[ts <= c][-1] if np.any(ts <= c) else 1.0
        target = s_c * u[i]
        later = np.flatnonzero((ts > c) & (surv <= target))
        if len(later):
            out[i] = ts[later[0]]
        else:
            out[i] = t_end + np.log(max(s_end, 1e-12) / target) / hazard if s_end > target else t_end
            out[i] = max(out[i], c)
    return out


@dataclass(frozen=True)
class LatentRisk:
    """Per-patient latent quantities of one site (arrays [N], patient order of the labels)."""

    eta: np.ndarray  # oracle log-risk (higher = shorter survival)
    tstar: np.ndarray  # imputed true event time, days
    sigma: float  # outcome-noise sd solved for the target oracle C
    oracle_c: float  # Harrell C of eta vs the real (time, event)
    r: np.ndarray  # radiology component
    p: np.ndarray  # pathology component
    x: np.ndarray  # interaction component
    rho: np.ndarray  # radiology-pathology agreement, tanh(x / interaction_scale)


def oracle_risk(time: np.ndarray, event: np.ndarray, site: str, seed: int = 0,
                params: GeneratorParams | None = None) -> np.ndarray:
    """The oracle log-risk eta [N] the generator embeds for a site's real (time days, event)."""
    return latent_risk(time, event, site, seed, params).eta


def latent_risk(time: np.ndarray, event: np.ndarray, site: str, seed: int = 0,
                params: GeneratorParams | None = None) -> LatentRisk:
    """Steps 1-2 of the generative model (module docstring) for one site."""
    params = params or load_params()
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event).astype(np.int8)
    rng = rng_for(seed, site, "latent")
    tstar = impute_event_times(time, event, rng)
    base = -(np.log(np.maximum(tstar, params.min_time_days)) - np.log(params.log_time_center_days))
    base = base / params.log_time_scale
    z = rng.standard_normal(len(time))
    sigma = _solve_sigma(base, z, time, event, params.target_oracle_c)
    eta = base + sigma * z
    oracle_c = harrell_c(time, eta, event)

    rc = rng_for(seed, site, "components")
    shares = np.array([params.share_radiology, params.share_pathology, params.share_interaction])
    var = float(np.var(eta))
    g = rc.standard_normal((3, len(eta))) * np.sqrt(shares * var)[:, None]
    comps = g + shares[:, None] * (eta - g.sum(axis=0))[None, :]
    r, p, x = comps
    rho = np.tanh(x / params.interaction_scale)
    return LatentRisk(eta, tstar, sigma, oracle_c, r, p, x, rho)


def _solve_sigma(base: np.ndarray, z: np.ndarray, time: np.ndarray, event: np.ndarray,
                 target: float) -> float:
    """sigma such that harrell_c(base + sigma z) is closest to ``target`` (bisection)."""
    def c(s: float) -> float:
        return harrell_c(time, base + s * z, event)

    if c(0.0) <= target:
        return 0.0
    lo, hi = 0.0, 1.0
    while c(hi) > target and hi < 1e3:
        lo, hi = hi, hi * 2
    best, best_err = hi, abs(c(hi) - target)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        cm = c(mid)
        if abs(cm - target) < best_err:
            best, best_err = mid, abs(cm - target)
        if cm > target:
            lo = mid
        else:
            hi = mid
    return float(best)


# ----------------------------------------------------------------------------- embeddings


@dataclass(frozen=True)
class Geometry:
    """Fixed directions of the simulated foundation models (orthonormal columns)."""

    d_r: np.ndarray  # [1024] risk direction (radiology)
    d_t: np.ndarray  # [1024] lesion marker
    a_r: np.ndarray  # [1024, S] semantic embedding (radiology)
    b_r: np.ndarray  # [1024, K] anatomy subspace
    drift: np.ndarray  # [1024, R] along-slice drift directions
    d_p: np.ndarray  # [768] risk direction (pathology)
    a_p: np.ndarray  # [768, S] semantic embedding (pathology)
    b_p: np.ndarray  # [768, K] patient nuisance subspace


@functools.lru_cache(maxsize=8)
def make_geometry(seed: int, params: GeneratorParams) -> Geometry:
    """The shared geometry of all sites built with ``seed`` (cached; arrays are read-only)."""
    rng = rng_for(seed, "geometry")
    s, k, d = params.semantic_dim, params.anatomy_rank, params.drift_rank
    qr_ = np.linalg.qr(rng.standard_normal((params.radiology_dim, 2 + s + k + d)))[0]
    qp = np.linalg.qr(rng.standard_normal((params.pathology_dim, 1 + s + k)))[0]
    f32 = np.float32
    geom = Geometry(
        d_r=qr_[:, 0].astype(f32), d_t=qr_[:, 1].astype(f32),
        a_r=qr_[:, 2 : 2 + s].astype(f32), b_r=qr_[:, 2 + s : 2 + s + k].astype(f32),
        drift=qr_[:, 2 + s + k :].astype(f32),
        d_p=qp[:, 0].astype(f32), a_p=qp[:, 1 : 1 + s].astype(f32), b_p=qp[:, 1 + s :].astype(f32),
    )
    for f in fields(geom):
        getattr(geom, f.name).setflags(write=False)
    return geom


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def semantic_vectors(rho: float, rng: np.random.Generator, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(u, v): u uniform unit in R^dim, v = rho u + sqrt(1 - rho^2) w with w unit, w ⟂ u."""
    u = _unit(rng.standard_normal(dim))
    w = rng.standard_normal(dim)
    w = _unit(w - (w @ u) * u)
    return u, rho * u + np.sqrt(max(0.0, 1.0 - rho * rho)) * w


def radiology_tokens(geom: Geometry, params: GeneratorParams, site_offset: np.ndarray,
                     r: float, v: np.ndarray, rng: np.random.Generator
                     ) -> tuple[np.ndarray, tuple[int, int]]:
    """One patient's CT tokens float32 [n_slices, 1024] and its tumour block (start, stop)."""
    n = int(rng.integers(params.n_slices_min, params.n_slices_max + 1))
    frac = rng.uniform(params.tumour_fraction_min, params.tumour_fraction_max)
    length = max(1, int(round(frac * n)))
    start = int(rng.integers(0, n - length + 1))
    stop = start + length
    f32 = np.float32
    tok = rng.standard_normal((n, params.radiology_dim), dtype=f32)
    tok *= f32(params.radiology_token_noise)
    anatomy = rng.standard_normal(params.anatomy_rank).astype(f32) * f32(params.radiology_anatomy)
    tok += (site_offset.astype(f32) + geom.b_r @ anatomy)[None, :]
    pos = np.arange(n)[:, None] / n
    amp = rng.standard_normal(params.drift_rank) * params.radiology_drift
    freq = 0.5 * (1 + np.arange(params.drift_rank))
    phase = rng.uniform(0, 2 * np.pi, params.drift_rank)
    # low-rank terms as one matmul: [drift coefficients | background semantic] @ [drift | A_r]^T
    q = _unit(rng.standard_normal((n, params.semantic_dim))) * params.radiology_background_semantic
    q[start:stop] = 0.0
    coef = np.hstack([amp * np.sin(2 * np.pi * freq * pos + phase), q]).astype(f32)
    tok += coef @ np.hstack([geom.drift, geom.a_r]).T
    lesion = (params.radiology_tumour_marker * geom.d_t + params.radiology_signal * r * geom.d_r
              + params.radiology_semantic * (geom.a_r @ v))
    tok[start:stop] += lesion.astype(f32)
    return tok, (start, stop)


def pathology_slides(geom: Geometry, params: GeneratorParams, site_offset: np.ndarray,
                     p: float, u: np.ndarray, n_slides: int, rng: np.random.Generator) -> np.ndarray:
    """One patient's slide vectors float32 [n_slides, 768] (its slides share its signal)."""
    base = (site_offset
            + params.pathology_patient * (geom.b_p @ rng.standard_normal(params.anatomy_rank))
            + params.pathology_signal * p * geom.d_p
            + params.pathology_semantic * (geom.a_p @ u))
    noise = rng.standard_normal((n_slides, params.pathology_dim)) * params.pathology_slide_noise
    return (base[None, :] + noise).astype(np.float32)


@dataclass
class SimulatedCohort:
    """Simulated embeddings of one site around its real labels (patient order of ``patient_ids``)."""

    site: str
    seed: int
    params: GeneratorParams
    patient_ids: list[str]
    time: np.ndarray  # float64 days (real)
    event: np.ndarray  # int8 (real)
    latent: LatentRisk
    radiology: dict[str, np.ndarray]  # pid -> float16 [n_slices, 1024]
    pathology: dict[str, np.ndarray]  # pid -> float16 [n_slides, 768]
    tumour_block: dict[str, tuple[int, int]]

    @property
    def oracle_risk(self) -> np.ndarray:
        return self.latent.eta

    @property
    def oracle_parts(self) -> dict[tuple[str, ...], np.ndarray]:
        """eta split by the modalities that reveal each part (step 2 of the module docstring):
        r needs the CT, p the slide, x both. x is written as eta - r - p so that the parts
        sum to eta exactly (the shares sum to 1 only to 1e-6)."""
        lat = self.latent
        return {("radiology",): lat.r, ("pathology",): lat.p,
                ("pathology", "radiology"): lat.eta - lat.r - lat.p}


def simulate_cohort(site: str, patient_ids: Sequence[str], time: np.ndarray, event: np.ndarray,
                    n_slides: Sequence[int] | None = None, seed: int = 0,
                    params: GeneratorParams | None = None) -> SimulatedCohort:
    """Simulate every patient's radiology and pathology embeddings (full modalities).

    ``time`` is in days, ``event`` 0/1; ``n_slides[i]`` slides for patient i (default 1).
    The latent step (T*, z, the components; :func:`latent_risk`) is drawn from site-level
    streams in row order, and sigma is solved on the whole cohort, so a patient's latent
    values depend on the other patients and their order; given them, each patient's arrays
    come from its own stream (seed, site, patient id).
    """
    params = params or load_params()
    ids = [str(p) for p in patient_ids]
    n_slides = list(n_slides) if n_slides is not None else [1] * len(ids)
    latent = latent_risk(time, event, site, seed, params)
    geom = make_geometry(seed, params)
    rs = rng_for(seed, site, "site-effect")
    rad_offset = rs.standard_normal(params.radiology_dim) * params.radiology_site_offset
    path_offset = rs.standard_normal(params.pathology_dim) * params.pathology_site_offset
    radiology, pathology, blocks = {}, {}, {}
    for i, pid in enumerate(ids):
        u, v = semantic_vectors(float(latent.rho[i]), rng_for(seed, site, pid, "semantic"),
                                params.semantic_dim)
        tok, block = radiology_tokens(geom, params, rad_offset, float(latent.r[i]), v,
                                      rng_for(seed, site, pid, "radiology"))
        radiology[pid] = tok.astype(np.float16)
        blocks[pid] = block
        pathology[pid] = pathology_slides(
            geom, params, path_offset, float(latent.p[i]), u, int(n_slides[i]),
            rng_for(seed, site, pid, "pathology"),
        ).astype(np.float16)
    return SimulatedCohort(site, seed, params, ids, np.asarray(time, np.float64),
                           np.asarray(event, np.int8), latent, radiology, pathology, blocks)
