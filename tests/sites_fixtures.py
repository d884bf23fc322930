"""Shared fixtures of the ``test_sites_*`` modules (imported explicitly, not a conftest).

The five built-in sites are built once per test session (process-wide cache,
so every module importing the fixture reuses the same folder).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from sites.builtin import BUILTIN_SITES, build_all
from sites.loader import load_site
from sites.problems import Problem
from sites.synthetic import write_synthetic_site
from sites.types import SiteData

_CACHE: dict[str, object] = {}


@pytest.fixture(scope="session")
def builtin_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder holding the five built-in sites (seed 0, default missingness), built once."""
    if "root" not in _CACHE:
        root = tmp_path_factory.mktemp("builtin_sites")
        build_all(root, seed=0, missing="default")
        _CACHE["root"] = root
    return _CACHE["root"]  # type: ignore[return-value]


@pytest.fixture(scope="session")
def builtin_sites(builtin_root: Path) -> dict[str, SiteData]:
    """The five built-in sites, loaded once."""
    if "sites" not in _CACHE:
        _CACHE["sites"] = {name: load_site(builtin_root / name) for name in BUILTIN_SITES}
    return _CACHE["sites"]  # type: ignore[return-value]


def synthetic_site(tmp_path: Path, name: str = "demo", n: int = 24, **kwargs) -> Path:
    """A small valid synthetic site folder (defaults: seq 16-d folder, vec 12-d npz, tab 5 columns)."""
    return write_synthetic_site(tmp_path, name, n, **kwargs)


def edit_csv(path: Path, fn) -> None:
    """Rewrite a CSV with ``fn(df)`` applied to its all-string DataFrame."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df = fn(df)
    df.to_csv(path, index=False)


def edit_yaml(site: Path, fn) -> None:
    """Apply ``fn`` to the parsed ``site.yaml`` of ``site`` and write it back."""
    doc = yaml.safe_load((site / "site.yaml").read_text())
    fn(doc)
    (site / "site.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def yaml_modalities(doc) -> dict:
    """A parsed site.yaml's modalities by name."""
    return {m["name"]: m for m in doc["modalities"]}


def find_problem(problems: list[Problem], contains: str, file: str | None = None,
                 patient: str | None = None) -> Problem:
    """The first problem whose message contains ``contains`` (and of ``file`` / ``patient``)."""
    for p in problems:
        if contains in p.message and (file is None or p.file == file) and (
            patient is None or p.patient == patient
        ):
            return p
    raise AssertionError(f"no problem with {contains!r} file={file} patient={patient} in:\n"
                         + "\n".join(map(str, problems)))


def set_cell(site: Path, pid: str, column: str, value: str, file: str = "patients.csv") -> None:
    """Set ``column`` of patient ``pid`` in the site's CSV ``file`` to the text ``value``."""
    def fn(df):
        df.loc[df.patient_id == pid, column] = value
        return df
    edit_csv(site / file, fn)


def npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` archive, by key."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
