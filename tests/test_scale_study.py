"""The large simulated site of simulations.scale_study: real label pool, folds, full modalities."""

from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pytest

from simulations.scale_study import FOLD_COLUMN, build_scale_site, pooled_labels, resampled_labels
from sites import load_site


def test_scale_site_is_valid_and_resamples_real_labels(tmp_path: Path) -> None:
    path = build_scale_site(tmp_path / "a", n=31, n_folds=3, seed=4)
    site = load_site(path)
    assert site.name == "scale-31" and len(site) == 31
    assert site.spec.simulated and "SIMULATED" in site.spec.description
    # every (time, event, slide count) row is one of the four cohorts' real rows
    pool = pooled_labels()
    real = set(zip(pool.time.tolist(), pool.event.tolist(), pool.n_slides.tolist()))
    n_slides = site.modalities["pathology"].n_tokens()
    assert set(zip(site.time.tolist(), site.event.tolist(), n_slides.tolist())) <= real
    # both modalities for everyone: the observable oracle is the oracle
    assert site.modalities["radiology"].present.all() and site.modalities["pathology"].present.all()
    np.testing.assert_allclose(site.observable_oracle_risk(), site.oracle_risk, atol=1e-9)
    # three folds of sizes 11, 10, 10, each patient tested once
    sizes = np.bincount(site.folds[FOLD_COLUMN])
    assert sorted(sizes.tolist()) == [10, 10, 11]
    # same seed, same bytes
    again = build_scale_site(tmp_path / "b", n=31, n_folds=3, seed=4)
    cmp = filecmp.dircmp(path, again)
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only


def test_resampling_depends_on_the_seed_and_refuses_tiny_sizes() -> None:
    pool = pooled_labels()
    a, b = resampled_labels(pool, 50, 5, 0), resampled_labels(pool, 50, 5, 1)
    assert not np.array_equal(a.time, b.time)
    np.testing.assert_array_equal(a.time, resampled_labels(pool, 50, 5, 0).time)
    with pytest.raises(ValueError, match="too small"):
        resampled_labels(pool, 9, 5, 0)
    with pytest.raises(ValueError, match="at least 2"):
        resampled_labels(pool, 50, 1, 0)


def test_reports_say_the_scale_sites_patients_are_simulated(tmp_path: Path) -> None:
    from sites.types import simulated_data_note

    site = load_site(build_scale_site(tmp_path, n=20, n_folds=2, seed=0))
    note = simulated_data_note({"cptac-pda": "CPTAC-PDA", site.name: site.spec.cohort})
    real_part, fake_part = note.split("; scale-20")
    assert "cptac-pda — real labels and folds" in real_part
    assert fake_part.startswith(" — simulated patients (labels resampled from CPTAC-PDA")
    assert "real labels" not in fake_part
    assert simulated_data_note({}) == ""
