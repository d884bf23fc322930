"""The five built-in sites: ``oncofed sites build --all OUT_DIR``.

=============  ============================================================
hancock        763 real patients, real features (sites/hancock.py)
cptac-pda      96 real patients/labels/folds, SIMULATED embeddings
cptac-ucec     34 real patients/labels/folds, SIMULATED embeddings
cptac-ccrcc    42 real patients/labels/folds, SIMULATED embeddings
tcga-kirc      50 real patients/labels/folds, SIMULATED embeddings
=============  ============================================================

Builders read only ``sites/data/`` (shipped with the package), write each site
atomically (temporary folder next to the target, validated, then renamed) and
are deterministic: the same seed gives bit-identical folders. Site settings:
``sites/builtin.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sites import cptac_tcga, hancock
from sites.writer import SiteContent, write_site

BUILTIN_SITES: tuple[str, ...] = ("hancock", "cptac-pda", "cptac-ucec", "cptac-ccrcc", "tcga-kirc")
SIMULATED_SITES: tuple[str, ...] = BUILTIN_SITES[1:]
MISSING_CHOICES: tuple[str, ...] = ("default", "none")
CONFIG_PATH = Path(__file__).with_name("builtin.yaml")


def site_config(name: str) -> dict[str, Any]:
    """Settings of one built-in site from ``sites/builtin.yaml``."""
    doc = yaml.safe_load(CONFIG_PATH.read_text(encoding="utf-8"))
    if name not in BUILTIN_SITES or name not in doc:
        raise KeyError(f"unknown built-in site {name!r}; choose from {', '.join(BUILTIN_SITES)}")
    return doc[name]


def site_content(name: str, seed: int = 0, missing: str = "default") -> SiteContent:
    """In-memory content of a built-in site (what :func:`build_site` writes)."""
    if missing not in MISSING_CHOICES:
        raise ValueError(f"missing must be one of {MISSING_CHOICES}, not {missing!r}")
    cfg = site_config(name)
    if cfg["kind"] == "hancock":
        return hancock.build_content(name, cfg, seed, missing)
    content, _ = cptac_tcga.build_content(name, cfg, seed, missing)
    return content


def build_site(name: str, out_dir: str | Path, seed: int = 0, missing: str = "default") -> Path:
    """Write built-in site ``name`` to ``out_dir/<name>`` (atomically) and return that path.

    ``missing="default"`` writes each simulated site's documented patient-level
    missingness; ``"none"`` gives every simulated patient both modalities
    (HANCOCK's real gaps are always kept).
    """
    content = site_content(name, seed, missing)
    return write_site(content, Path(out_dir) / name)


def build_all(out_dir: str | Path, seed: int = 0, missing: str = "default") -> list[Path]:
    """Write all five built-in sites under ``out_dir``; returns their folders in BUILTIN_SITES order."""
    return [build_site(name, out_dir, seed, missing) for name in BUILTIN_SITES]
