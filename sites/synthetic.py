"""Tiny, valid site folders for fast tests of other modules.

:func:`write_synthetic_site` writes a site in the real format (validated before
it is moved into place) with small dimensions, a learnable risk signal and
some patient-level missingness, in well under 0.2 s for 60 patients.

Generative model (the ideas of :mod:`sites.simulate`, scaled down):
latent log-risk eta_i ~ N(0, 1), split into one component per modality
(Gaussian conditional given the sum, equal shares); true time
T* = -log(U) / (h0 exp(eta)) days (a Cox model, baseline hazard h0 = 1/1000
per day), censoring uniform on [0, censor_max_days]; time = min(T*, C) rounded
to whole days. Token modalities carry their component along a fixed direction
(``signal`` x component) on some of their tokens plus N(0, noise^2) noise;
tabular columns are noisy linear functions of the component with ~10 % empty
cells. ``status`` = death within 730 days (1), alive and followed beyond 730
days (0), otherwise unlabelled. ``oracle_risk.csv`` holds eta and its per-modality
components (``part:<modality>`` columns).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from sites.layout import SiteLayout
from sites.simulate import rng_for
from sites.types import ModalitySpec, SiteSpec
from sites.writer import SiteContent, write_site

DEFAULT_MODALITIES: tuple[ModalitySpec, ...] = (
    ModalitySpec("seq", "sequence", 16, (), "synthetic token sequence"),
    ModalitySpec("vec", "vector", 12, (), "synthetic slide vectors"),
    ModalitySpec("tab", "tabular", 5, tuple(f"x{j}" for j in range(5)), "synthetic table"),
)
STATUS_HORIZON_DAYS = 730.0


def _as_spec(m: ModalitySpec | tuple) -> ModalitySpec:
    if isinstance(m, ModalitySpec):
        return m
    name, kind, dim = m[:3]
    cols = tuple(f"{name}_{j}" for j in range(dim)) if kind == "tabular" else ()
    return ModalitySpec(name, kind, int(dim), cols, f"synthetic {kind}")


def write_synthetic_site(
    out_dir: str | Path,
    name: str,
    n_patients: int,
    *,
    modalities: Sequence[ModalitySpec | tuple] = DEFAULT_MODALITIES,
    seed: int = 0,
    missing_rate: float = 0.15,
    n_folds: int = 5,
    with_status: bool = True,
    signal: float = 2.0,
    noise: float = 0.5,
    n_tokens: tuple[int, int] = (4, 12),
    censor_max_days: float = 3000.0,
) -> Path:
    """Write a small valid site ``out_dir/name`` and return its path.

    ``modalities``: ModalitySpec objects or (name, kind, dim) tuples (tabular
    columns are then named ``<name>_<j>``). Each patient lacks each modality
    with probability ``missing_rate`` but keeps at least one. Fold columns:
    ``fold_cv`` (``n_folds`` folds stratified on event) and ``split_default``
    (fold 0 = test). Same arguments -> bit-identical folder.
    """
    if n_patients < max(2 * n_folds, 4):
        raise ValueError(f"n_patients={n_patients} is too small for {n_folds} folds")
    specs = tuple(_as_spec(m) for m in modalities)
    if not specs:
        raise ValueError("a site needs at least one modality")
    rng = rng_for(seed, "synthetic", name)
    ids = [f"P{i:04d}" for i in range(n_patients)]
    m = len(specs)

    eta = rng.standard_normal(n_patients)
    shares = np.full(m, 1.0 / m)
    g = rng.standard_normal((m, n_patients)) * np.sqrt(shares)[:, None]
    comps = g + shares[:, None] * (eta - g.sum(axis=0))[None, :]

    t_true = -np.log(rng.uniform(1e-9, 1.0, n_patients)) / (np.exp(eta) / 1000.0)
    censor = rng.uniform(0.0, censor_max_days, n_patients)
    time = np.round(np.minimum(t_true, censor))
    event = (t_true <= censor).astype(int)
    if event.sum() < 2:  # a site needs events to be useful; force two
        event[np.argsort(time)[:2]] = 1

    present = rng.random((n_patients, m)) >= missing_rate
    for i in np.flatnonzero(~present.any(axis=1)):
        present[i, rng.integers(m)] = True
    for j in range(m):  # every declared modality is held by someone
        if not present[:, j].any():
            present[rng.integers(n_patients), j] = True

    tokens: dict[str, dict[str, np.ndarray]] = {}
    tables: dict[str, pd.DataFrame] = {}
    for j, spec in enumerate(specs):
        direction = rng.standard_normal(spec.dim)
        direction /= np.linalg.norm(direction)
        if spec.kind == "tabular":
            mix = rng.uniform(0.5, 1.5, spec.dim) * rng.choice([-1.0, 1.0], spec.dim)
            vals = comps[j][:, None] * mix[None, :] + noise * rng.standard_normal((n_patients, spec.dim))
            holes = rng.random(vals.shape) < 0.1
            holes[np.arange(n_patients), rng.integers(spec.dim, size=n_patients)] = False
            vals[holes] = np.nan
            rows = np.flatnonzero(present[:, j])
            tables[spec.name] = pd.DataFrame(vals[rows], index=[ids[i] for i in rows],
                                             columns=list(spec.columns))
            continue
        arrays = {}
        for i in np.flatnonzero(present[:, j]):
            if spec.kind == "vector":
                n = int(rng.integers(1, 3))
                x = noise * rng.standard_normal((n, spec.dim)) + signal * comps[j, i] * direction
            else:
                n = int(rng.integers(n_tokens[0], n_tokens[1] + 1))
                x = noise * rng.standard_normal((n, spec.dim))
                k = max(1, n // 3)
                start = int(rng.integers(0, n - k + 1))
                x[start : start + k] += signal * comps[j, i] * direction
            arrays[ids[i]] = x.astype(np.float32)
        tokens[spec.name] = arrays

    fold = np.empty(n_patients, dtype=np.int64)
    for e in (0, 1):
        members = np.flatnonzero(event == e)
        members = members[rng.permutation(len(members))]
        fold[members] = (np.arange(len(members)) + (e * len(members))) % n_folds
    patients = pd.DataFrame({
        "patient_id": ids, "time": time, "event": event,
        "fold_cv": fold, "split_default": np.where(fold == 0, "test", "train"),
    })
    tasks: tuple[str, ...] = ("survival",)
    if with_status:
        status = np.where((event == 1) & (time <= STATUS_HORIZON_DAYS), 1,
                          np.where(time > STATUS_HORIZON_DAYS, 0, -1))
        if not ((status == 0).any() and (status == 1).any()):
            status = event.copy()
        patients.insert(3, "status", status)
        tasks = ("survival", "status")

    spec = SiteSpec(name=name, cohort="synthetic", time_unit="days", tasks=tasks,
                    modalities=specs, simulated=True,
                    description="SYNTHETIC test site (sites/synthetic.py); nothing here is real.",
                    source="sites.synthetic.write_synthetic_site")
    paths = {s.name: (f"{s.name}.csv" if s.kind == "tabular" else
                      f"{s.name}.npz" if s.kind == "vector" else f"{s.name}/") for s in specs}
    layout = SiteLayout(spec, "patients.csv", "oracle_risk.csv", paths,
                        {"embeddings": "synthetic", "seed": int(seed)})
    parts = {(spec.name,): pd.Series(comps[j], index=ids) for j, spec in enumerate(specs)}
    content = SiteContent(layout, patients, tokens, tables, pd.Series(eta, index=ids), parts)
    return write_site(content, Path(out_dir) / name)
