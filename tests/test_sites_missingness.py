"""Missing-modality protocols: site-level, patient-level, PARACHUTE ratios, HAF random drop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sites import load_site
from sites.missingness import (PARACHUTE_RATIOS, apply_presence, drop_site_modality, file_presence,
                               haf_drop, haf_drop_mask, parachute_drop, parachute_draws,
                               random_drop_mask)
from sites.types import SiteData
from sites_fixtures import synthetic_site

MODS = (("radiology", "sequence", 8), ("pathology", "vector", 6), ("labs", "tabular", 3))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> SiteData:
    root = tmp_path_factory.mktemp("missing")
    return load_site(synthetic_site(root, "rp", 200, modalities=MODS, missing_rate=0.1, seed=2))


def test_patient_level_is_the_files(site: SiteData) -> None:
    pres = file_presence(site)
    assert pres.shape == (200, 3)
    np.testing.assert_array_equal(pres[:, 0], site.modalities["radiology"].present)
    assert (~pres).any()  # the synthetic site has real patient-level gaps
    assert pres.any(axis=1).all()


def test_site_level_drop(site: SiteData, tmp_path: Path) -> None:
    full = load_site(synthetic_site(tmp_path, "full", 30, modalities=MODS, missing_rate=0.0))
    out = drop_site_modality(full, "labs")
    assert out.spec.modality_names == ("radiology", "pathology")
    assert "labs" not in out.modalities and "labs" in full.modalities  # input untouched
    assert file_presence(out, ("radiology", "pathology", "labs"))[:, 2].sum() == 0
    # patients whose only modality was labs: an error naming them, or removed on request
    only_labs = file_presence(site)[:, 2] & ~file_presence(site)[:, :2].any(axis=1)
    assert only_labs.any()
    with pytest.raises(ValueError, match="no modality at all: \\['P"):
        drop_site_modality(site, "labs")
    kept = drop_site_modality(site, "labs", empty="drop")
    assert len(kept) == len(site) - only_labs.sum()
    assert set(kept.patient_ids) == set(site.patient_ids[~only_labs])
    with pytest.raises(ValueError, match="no modality"):
        drop_site_modality(site, ["radiology", "pathology", "labs"])
    with pytest.raises(KeyError):
        drop_site_modality(site, "genomics")


@pytest.mark.parametrize("mode", ["radiology", "pathology", "mixed"])
def test_parachute_drop_is_deterministic_and_never_empties(site: SiteData, mode: str) -> None:
    a = parachute_drop(site, 0.30, mode, seed=5)
    b = parachute_drop(site, 0.30, mode, seed=5)
    c = parachute_drop(site, 0.30, mode, seed=6)
    np.testing.assert_array_equal(file_presence(a), file_presence(b))
    assert not np.array_equal(file_presence(a), file_presence(c))
    before, after = file_presence(site), file_presence(a)
    assert not (after & ~before).any()  # only drops
    assert after.any(axis=1).all()  # never all of a patient's modalities
    dropped = before & ~after
    assert dropped.any()
    assert not dropped[:, 2].any()  # labs is never a PARACHUTE target
    if mode == "radiology":
        assert not dropped[:, 1].any()
    if mode == "pathology":
        assert not dropped[:, 0].any()
    # dropped tokens are gone from the data, not just flagged
    rad = a.modalities["radiology"]
    assert rad.values.shape[0] == rad.n_tokens().sum()
    assert (rad.n_tokens()[~rad.present] == 0).all()


def test_parachute_ratio_zero_and_nesting(site: SiteData) -> None:
    np.testing.assert_array_equal(file_presence(parachute_drop(site, 0.0)), file_presence(site))
    masks = [file_presence(parachute_drop(site, r, "mixed", seed=1)) for r in PARACHUTE_RATIOS]
    for small, large in zip(masks, masks[1:]):
        assert not (large & ~small).any()  # a larger ratio drops a superset
    assert PARACHUTE_RATIOS == (0.0, 0.05, 0.15, 0.30)


def test_parachute_rate_matches_ratio() -> None:
    rng = np.random.default_rng(0)
    n = 20000
    present = np.ones((n, 2), dtype=bool)
    present[: n // 10, 1] = False  # 10 % without pathology in the files
    keep = random_drop_mask(present, np.array([True, True]), 0.15, rng.random((n, 2)))
    assert keep.any(axis=1).all()
    both = present.all(axis=1)
    rate = (~keep[both]).mean()
    assert rate == pytest.approx(0.15 - 0.15**2 / 2, abs=0.01)  # both-dropped pairs restore one
    only_rad = ~present[:, 1]
    assert keep[only_rad, 0].all()  # a patient's only modality is never dropped


def test_parachute_draws_are_distinct(site: SiteData) -> None:
    draws = parachute_draws(site, 0.15, "mixed", seed=0, n_draws=15)
    assert len(draws) == 15
    assert len({file_presence(d).tobytes() for d in draws}) > 10


def test_parachute_draw_does_not_depend_on_other_patients(site: SiteData) -> None:
    idx = np.arange(0, 200, 3)
    full = file_presence(parachute_drop(site, 0.3, "mixed", seed=4))[idx]
    sub = file_presence(parachute_drop(site.subset(idx), 0.3, "mixed", seed=4))
    np.testing.assert_array_equal(full, sub)


def test_parachute_requires_the_modalities(site: SiteData) -> None:
    with pytest.raises(KeyError, match="no modality 'ct'"):
        parachute_drop(site, 0.1, radiology="ct")
    with pytest.raises(ValueError, match="mode"):
        parachute_drop(site, 0.1, "both")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        parachute_drop(site, 1.0)


def test_haf_drop_mask_counts() -> None:
    rng = np.random.default_rng(1)
    present = rng.random((5000, 7)) < 0.9
    keep = haf_drop_mask(present, rng)
    m = present.sum(axis=1)
    k = (present & ~keep).sum(axis=1)
    assert not (keep & ~present).any()
    assert (k[m >= 2] >= 1).all() and (k[m >= 2] <= m[m >= 2] - 1).all()
    assert (k[m < 2] == 0).all()
    full = m == 7
    counts = np.bincount(k[full], minlength=7)[1:]
    assert counts.min() > 0.6 * counts.mean()  # k ~ U{1..6}


def test_haf_drop_site(site: SiteData) -> None:
    a, b = haf_drop(site, seed=3), haf_drop(site, seed=3)
    np.testing.assert_array_equal(file_presence(a), file_presence(b))
    before, after = file_presence(site), file_presence(a)
    assert after.any(axis=1).all()
    multi = before.sum(axis=1) >= 2
    assert ((before & ~after).sum(axis=1)[multi] >= 1).all()
    tab = a.modalities["labs"]
    assert np.isnan(tab.values[~tab.present]).all()  # a dropped tabular row is all-missing


def test_apply_presence_checks_shape(site: SiteData) -> None:
    with pytest.raises(ValueError, match="shape"):
        apply_presence(site, ("radiology",), np.ones((3, 1), bool))
