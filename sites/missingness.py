"""Missing-modality protocols, deterministic by seed.

Four protocols (``sites/FORMAT.md``, "Missing modalities"):

(a) **site-level** — :func:`drop_site_modality`: the site never has a modality
    (it disappears from the site's spec; the federation's model still has it).
(b) **patient-level** — :func:`file_presence`: as written in the site's files
    (a patient without a row / file lacks the modality).
(c) **PARACHUTE simulated ratios** — :func:`parachute_drop`: each *available*
    modality among the targeted ones (radiology-only, pathology-only or mixed)
    is dropped independently with probability ``ratio`` (0, 5, 15, 30 %); if a
    patient would be left with no modality at all, one of the dropped ones
    (uniformly at random) is restored. PARACHUTE averages test results over 15
    draws: :func:`parachute_draws`.
(d) **HAF random drop** — :func:`haf_drop_mask` / :func:`haf_drop`: per
    patient, k ~ U{1..M_i-1} of its M_i available modalities are dropped
    (nothing when M_i < 2). Deviation from HAF's code, which draws k over all M
    modalities whether present or not: drawing over the available ones makes
    every draw drop something and keep something when a patient has real gaps.

Site-level functions return **new** :class:`~sites.types.SiteData` objects
(built with :meth:`ModalityData.with_present`) and never modify their input.
Their random numbers are drawn per patient from (seed, protocol, patient id),
so a patient's draw does not depend on which other patients are in the site or
fold, and for one seed a larger ratio drops a superset of what a smaller one
drops (common random numbers across ratios). Folds stay patient-level: a row is
a patient, whatever its number of slides.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np

from sites.simulate import rng_for
from sites.types import SiteData

PARACHUTE_RATIOS: tuple[float, ...] = (0.0, 0.05, 0.15, 0.30)
PARACHUTE_MODES: tuple[str, ...] = ("radiology", "pathology", "mixed")
PARACHUTE_DRAWS = 15


# ----------------------------------------------------------------------------- helpers


def patient_uniforms(patient_ids: Sequence[str], seed: int, protocol: str, k: int) -> np.ndarray:
    """float64 [N, k] uniforms in [0, 1), one reproducible stream per (seed, protocol, patient)."""
    out = np.empty((len(patient_ids), k))
    for i, pid in enumerate(patient_ids):
        out[i] = rng_for(seed, "missingness", protocol, str(pid)).random(k)
    return out


def apply_presence(site: SiteData, names: Sequence[str], keep: np.ndarray) -> SiteData:
    """Copy of ``site`` where modality ``names[j]`` is kept only where ``keep[:, j]`` (and it was)."""
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (len(site), len(names)):
        raise ValueError(f"keep mask has shape {keep.shape}, expected {(len(site), len(names))}")
    mods = dict(site.modalities)
    for j, name in enumerate(names):
        if name not in mods:
            raise KeyError(f"site {site.name!r} has no modality {name!r}; it has {sorted(mods)}")
        mods[name] = mods[name].with_present(keep[:, j])
    return replace(site, modalities=mods)


def _check_no_empty(site: SiteData, what: str) -> None:
    any_present = site.presence_matrix().any(axis=1)
    if not any_present.all():
        empty = site.patient_ids[~any_present]
        raise ValueError(
            f"{what} would leave {len(empty)} patient(s) of site {site.name!r} with no modality "
            f"at all: {[str(p) for p in empty[:10]]}{' ...' if len(empty) > 10 else ''}"
        )


# ----------------------------------------------------------------------------- (a) site-level


def drop_site_modality(site: SiteData, names: str | Sequence[str], empty: str = "raise") -> SiteData:
    """Protocol (a): the site never collects ``names`` (removed from its spec and data).

    A patient who had only these modalities would be left with none:
    ``empty="raise"`` (default) raises ``ValueError`` naming them,
    ``empty="drop"`` removes those patients from the returned site.
    """
    if empty not in ("raise", "drop"):
        raise ValueError(f"empty must be 'raise' or 'drop', not {empty!r}")
    names = (names,) if isinstance(names, str) else tuple(names)
    unknown = [n for n in names if n not in site.modalities]
    if unknown:
        raise KeyError(f"site {site.name!r} has no modality {unknown}; it has {sorted(site.modalities)}")
    spec = replace(site.spec, modalities=tuple(m for m in site.spec.modalities if m.name not in names))
    if not spec.modalities:
        raise ValueError(f"dropping {list(names)} would leave site {site.name!r} with no modality")
    out = replace(site, spec=spec,
                  modalities={k: v for k, v in site.modalities.items() if k not in names})
    if empty == "drop":
        return out.subset(np.flatnonzero(out.presence_matrix().any(axis=1)))
    _check_no_empty(out, f"dropping modality {list(names)} site-wide")
    return out


# ----------------------------------------------------------------------------- (b) patient-level


def file_presence(site: SiteData, names: Sequence[str] | None = None) -> np.ndarray:
    """Protocol (b): bool [N, M], modality ``names[j]`` present for patient i as in the files."""
    return site.presence_matrix(tuple(names) if names is not None else None)


# ----------------------------------------------------------------------------- (c) PARACHUTE


def random_drop_mask(present: np.ndarray, droppable: np.ndarray, ratio: float,
                     uniforms: np.ndarray) -> np.ndarray:
    """Keep-mask bool [N, M] of PARACHUTE's drop (see module docstring).

    ``present`` bool [N, M]; ``droppable`` bool [M] (targeted modalities);
    ``uniforms`` [N, M] in [0, 1): modality j of patient i drops when
    ``uniforms[i, j] < ratio``. A patient never loses all its modalities: if
    every present one would drop, the dropped one with the largest draw is
    restored — uniformly random among them (the draws below ``ratio`` are
    i.i.d.), and it keeps the drops nested across ratios.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"missing ratio {ratio} must lie in [0, 1)")
    present = np.asarray(present, dtype=bool)
    drop = present & np.asarray(droppable, dtype=bool)[None, :] & (uniforms < ratio)
    keep = present & ~drop
    for i in np.flatnonzero(present.any(axis=1) & ~keep.any(axis=1)):
        dropped = np.flatnonzero(drop[i])
        keep[i, dropped[np.argmax(uniforms[i, dropped])]] = True
    return keep


def parachute_drop(site: SiteData, ratio: float, mode: str = "mixed", seed: int = 0,
                   radiology: str = "radiology", pathology: str = "pathology") -> SiteData:
    """Protocol (c): PARACHUTE's simulated missingness at ``ratio`` (0.05 = 5 %).

    ``mode``: "radiology" drops only radiology, "pathology" only pathology,
    "mixed" both (independently). Patient-level file gaps are kept.
    """
    if mode not in PARACHUTE_MODES:
        raise ValueError(f"mode {mode!r} must be one of {PARACHUTE_MODES}")
    names = tuple(site.spec.modality_names)
    for n in (radiology, pathology):
        if n not in names:
            raise KeyError(f"site {site.name!r} has no modality {n!r} (it has {list(names)})")
    targets = {"radiology": (radiology,), "pathology": (pathology,),
               "mixed": (radiology, pathology)}[mode]
    droppable = np.array([n in targets for n in names])
    u = patient_uniforms(site.patient_ids, seed, "parachute", len(names))
    keep = random_drop_mask(site.presence_matrix(names), droppable, ratio, u)
    return apply_presence(site, names, keep)


def parachute_draws(site: SiteData, ratio: float, mode: str = "mixed", seed: int = 0,
                    n_draws: int = PARACHUTE_DRAWS, **kwargs) -> list[SiteData]:
    """``n_draws`` independent PARACHUTE draws (seeds seed, seed+1, ...), to average results over."""
    return [parachute_drop(site, ratio, mode, seed + d, **kwargs) for d in range(n_draws)]


# ----------------------------------------------------------------------------- (d) HAF


def haf_drop_mask(present: np.ndarray, rng: np.random.Generator | None = None,
                  uniforms: np.ndarray | None = None) -> np.ndarray:
    """Protocol (d): keep-mask bool [N, M]; each patient loses k ~ U{1..M_i-1} of its M_i modalities.

    Give either a numpy ``rng`` (e.g. per training batch) or ``uniforms``
    [N, M+1] (column 0 picks k, the others rank the modalities).
    """
    present = np.asarray(present, dtype=bool)
    n, m = present.shape
    if uniforms is None:
        if rng is None:
            raise ValueError("haf_drop_mask needs rng or uniforms")
        uniforms = rng.random((n, m + 1))
    keep = present.copy()
    for i in range(n):
        avail = np.flatnonzero(present[i])
        if len(avail) < 2:
            continue
        k = 1 + min(int(uniforms[i, 0] * (len(avail) - 1)), len(avail) - 2)
        order = avail[np.argsort(uniforms[i, 1:][avail], kind="stable")]
        keep[i, order[:k]] = False
    return keep


def haf_drop(site: SiteData, seed: int = 0, names: Sequence[str] | None = None) -> SiteData:
    """Protocol (d) applied to a whole site, deterministic per (seed, patient)."""
    names = tuple(names) if names is not None else tuple(site.spec.modality_names)
    u = patient_uniforms(site.patient_ids, seed, "haf", len(names) + 1)
    keep = haf_drop_mask(site.presence_matrix(names), uniforms=u)
    return apply_presence(site, names, keep)
