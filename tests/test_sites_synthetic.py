"""Tiny synthetic sites for other modules' tests: valid, deterministic, learnable."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sites import load_site, validate_site
from sites.simulate import harrell_c
from sites.synthetic import write_synthetic_site


def test_default_synthetic_site(tmp_path: Path) -> None:
    path = write_synthetic_site(tmp_path, "tiny", 60)
    assert path == tmp_path / "tiny" and validate_site(path) == []
    s = load_site(path)
    assert len(s) == 60 and s.spec.simulated
    assert [(m.name, m.kind, m.dim) for m in s.spec.modalities] == [
        ("seq", "sequence", 16), ("vec", "vector", 12), ("tab", "tabular", 5)]
    assert set(s.folds) == {"fold_cv", "split_default"}
    assert (s.status >= 0).any() and (s.status == -1).any() and set(np.unique(s.status)) <= {-1, 0, 1}
    pres = s.presence_matrix()
    assert (~pres).any() and pres.any(axis=1).all()  # patient-level gaps, nobody empty
    assert 5 < s.event.sum() < 60
    assert harrell_c(s.time, s.oracle_risk, s.event) > 0.65  # a learnable signal
    split = s.splits("split_default")[0]
    assert not set(split.train) & set(split.test)


def test_synthetic_site_is_deterministic(tmp_path: Path) -> None:
    a = write_synthetic_site(tmp_path / "a", "x", 30, seed=4)
    b = write_synthetic_site(tmp_path / "b", "x", 30, seed=4)
    for f in sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    c = load_site(write_synthetic_site(tmp_path / "c", "x", 30, seed=5))
    assert not np.array_equal(c.oracle_risk, load_site(a).oracle_risk)


def test_synthetic_site_custom_modalities(tmp_path: Path) -> None:
    s = load_site(write_synthetic_site(
        tmp_path, "custom", 20, modalities=(("ct", "sequence", 4), ("tma", "bag", 3), ("lab", "tabular", 2)),
        with_status=False, missing_rate=0.0, n_folds=4))
    assert s.spec.tasks == ("survival",) and (s.status == -1).all()
    assert s.modalities["lab"].spec.columns == ("lab_0", "lab_1")
    assert s.presence_matrix().all()
    assert sorted(np.unique(s.folds["fold_cv"])) == [0, 1, 2, 3]
