"""Tiny synthetic sites for other modules' tests: valid, deterministic, learnable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sites import load_site, validate_site
from sites.simulate import harrell_c
from sites.synthetic import STATUS_HORIZON_DAYS, write_synthetic_site


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


# ---- fourth review round (mutation testing of sites/) ----

def test_synthetic_labels_follow_the_documented_rules(tmp_path: Path) -> None:
    s = load_site(write_synthetic_site(tmp_path, "rules", 80, seed=1))
    # split_default: fold 0 of fold_cv is the test set
    split = s.splits("split_default")[0]
    np.testing.assert_array_equal(np.sort(split.test), np.flatnonzero(s.folds["fold_cv"] == 0))
    # status: death within 730 days -> 1; followed beyond 730 days -> 0; otherwise unlabelled
    expected = np.where((s.event == 1) & (s.time <= STATUS_HORIZON_DAYS), 1,
                        np.where(s.time > STATUS_HORIZON_DAYS, 0, -1))
    np.testing.assert_array_equal(s.status, expected)


def test_synthetic_site_is_valid_even_with_heavy_missingness(tmp_path: Path) -> None:
    """'Each patient ... keeps at least one' and every declared modality is held by someone."""
    for seed in range(5):
        path = write_synthetic_site(tmp_path / str(seed), "sparse", 10, n_folds=2, missing_rate=0.97, seed=seed)
        assert validate_site(path) == []
        assert load_site(path).presence_matrix().any(axis=0).all()


def test_synthetic_site_refuses_too_few_patients(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too small for 5 folds"):
        write_synthetic_site(tmp_path, "small", 9)
    assert not (tmp_path / "small").exists()
