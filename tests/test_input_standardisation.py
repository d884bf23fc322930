"""Per-site input standardisation (shared_model.batch.fit_input_stats / SiteTensors.for_training)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from shared_model.batch import SiteTensors, fit_input_stats
from shared_model.config import load_config
from test_model_fixtures import CLIN, CT, SLIDES, make_site


def _with_offset(site, name: str, offset: float):
    md = site.modalities[name]
    shifted = dataclasses.replace(md, values=md.values + np.float32(offset))
    return dataclasses.replace(site, modalities={**site.modalities, name: shifted})


def test_token_stats_use_only_training_patients_that_have_the_modality():
    site = _with_offset(make_site("a", (CT, SLIDES, CLIN), 40, seed=3, p_missing=0.3), "ct", 5.0)
    train = np.arange(25)
    stats = fit_input_stats(site, train)
    ct = site.modalities["ct"]
    rows = [r for r in train if ct.present[r]]
    tokens = np.concatenate([ct.values[ct.offsets[r]:ct.offsets[r + 1]] for r in rows]).astype(np.float64)
    np.testing.assert_allclose(stats["ct"].mean, tokens.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["ct"].std, tokens.std(0), rtol=1e-5, atol=1e-5)
    assert abs(float(stats["ct"].mean[1]) - 5.0) < 0.5  # the site's offset is in the mean

    # the test patients' values do not move the statistics
    poisoned = ct.values.copy()
    for r in range(25, 40):
        poisoned[ct.offsets[r]:ct.offsets[r + 1]] = 1e6
    site2 = dataclasses.replace(site, modalities={**site.modalities, "ct": dataclasses.replace(ct, values=poisoned)})
    np.testing.assert_array_equal(fit_input_stats(site2, train)["ct"].mean, stats["ct"].mean)
    assert set(stats) == {"ct", "slides", "clin"}


def test_for_training_standardises_tokens_and_removes_a_site_offset():
    site = _with_offset(make_site("a", (CT, CLIN), 60, seed=1, p_missing=0.1), "ct", 3.0)
    train = np.arange(60)
    t = SiteTensors.for_training(site, (CT, CLIN), train)
    b = t.batch(train)
    ct = b.modalities["ct"]
    tokens = ct.values[ct.mask]  # [tokens, D]
    torch.testing.assert_close(tokens.mean(0), torch.zeros(CT.dim), atol=1e-4, rtol=0)
    torch.testing.assert_close(tokens.std(0, unbiased=False), torch.ones(CT.dim), atol=1e-3, rtol=0)
    assert not ct.values[~ct.mask].any()  # padding stays zero

    raw = SiteTensors.for_training(site, (CT, CLIN), train, standardize_embeddings="none").batch(train)
    assert float(raw.modalities["ct"].values[raw.modalities["ct"].mask].mean()) > 2.5
    # tabular columns are standardised either way
    torch.testing.assert_close(b.modalities["clin"].values, raw.modalities["clin"].values)


def test_default_config_standardises_embeddings():
    assert load_config().train.standardize_embeddings == "per_dimension"
    cfg = load_config(overrides={"train.standardize_embeddings": "none"})
    assert cfg.train.standardize_embeddings == "none"


def test_per_modality_centres_each_dimension_with_one_scale():
    site = _with_offset(make_site("a", (CT, CLIN), 50, seed=2, p_missing=0.1), "ct", 4.0)
    train = np.arange(50)
    per_dim = fit_input_stats(site, train, "per_dimension")["ct"]
    per_mod = fit_input_stats(site, train, "per_modality")["ct"]
    np.testing.assert_array_equal(per_mod.mean, per_dim.mean)
    assert np.all(per_mod.std == per_mod.std[0])
    assert per_mod.std[0] == pytest.approx(np.sqrt(np.mean(per_dim.std.astype(np.float64) ** 2)), rel=1e-6)
    assert "ct" not in fit_input_stats(site, train, "none") and "clin" in fit_input_stats(site, train, "none")
    with pytest.raises(ValueError, match="standardize_embeddings"):
        fit_input_stats(site, train, "yes")


def test_token_moments_in_chunks_equal_numpy():
    from shared_model.batch import _token_mean_std

    rng = np.random.default_rng(0)
    values = (rng.normal(size=(1000, 6)) * [1, 2, 3, 0, 5, 6] + 7).astype(np.float16)
    rows = np.sort(rng.choice(1000, size=777, replace=False))
    mean, std = _token_mean_std(values, rows, 6, chunk=100)
    ref = values[rows].astype(np.float64)
    np.testing.assert_allclose(mean, ref.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, ref.std(0), rtol=1e-5, atol=1e-12)
    assert std[3] == 0.0  # a constant dimension: raw std 0 (the stats leave it unscaled, below)


def test_constant_dimensions_do_not_inflate_the_per_modality_scale():
    site = make_site("a", (CT, CLIN), 40, seed=3, p_missing=0.0)
    ct = site.modalities["ct"]
    ct.values[:, : ct.spec.dim // 2] = 0.5  # half the dimensions dead
    train = np.arange(40)
    per_dim = fit_input_stats(site, train, "per_dimension")["ct"]
    assert np.all(per_dim.std[: ct.spec.dim // 2] == 1.0)  # per dimension: a dead dimension is left unscaled
    live = ct.values[:, ct.spec.dim // 2 :].astype(np.float64).std(axis=0)
    expected = np.sqrt(np.sum(live ** 2) / ct.spec.dim)  # RMS over all dimensions, dead ones at 0
    per_mod = fit_input_stats(site, train, "per_modality")["ct"]
    assert per_mod.std[0] == pytest.approx(expected, rel=1e-5)


def test_a_tabular_column_no_training_patient_observed_is_read_as_missing():
    """Its statistics are undefined, so a test patient's raw value (e.g. 180 mg/dL) must not
    reach weights that never saw the column: it is read as an unobserved value."""
    site = make_site("a", (CT, CLIN), 30, seed=4, p_missing=0.0)
    clin = site.modalities["clin"]
    values = clin.values.copy()
    values[:20, 3] = np.nan  # column d: never observed in the training rows
    values[20:, 3] = 180.0
    site = dataclasses.replace(site, modalities={**site.modalities, "clin": dataclasses.replace(clin, values=values)})
    tensors = SiteTensors.for_training(site, (CT, CLIN), np.arange(20))
    batch = tensors.batch(np.arange(20, 30)).modalities["clin"]
    assert not batch.mask[:, 3].any() and (batch.values[:, 3] == 0).all()
    # the columns the training rows observed are read as before (the fixture leaves some holes)
    np.testing.assert_array_equal(batch.mask[:, :3].numpy(), np.isfinite(values[20:, :3]))


def test_a_token_modality_no_training_patient_had_is_read_as_absent():
    """Without training tokens there are no statistics to standardise with: the site's test
    patients are read as lacking the modality (its missing tokens), not fed raw embeddings."""
    site = make_site("a", (CT, SLIDES), 30, seed=5, p_missing=0.0)
    ct = site.modalities["ct"]
    present = ct.present.copy()
    present[:20] = False  # CT only among the test patients
    keep = np.concatenate([np.arange(ct.offsets[r], ct.offsets[r + 1]) for r in range(20, 30)])
    counts = np.where(present, np.diff(ct.offsets), 0)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    ct = dataclasses.replace(ct, present=present, values=ct.values[keep] + np.float32(50.0), offsets=offsets)
    site = dataclasses.replace(site, modalities={**site.modalities, "ct": ct})
    tensors = SiteTensors.for_training(site, (CT, SLIDES), np.arange(20))
    batch = tensors.batch(np.arange(20, 30))
    assert not batch.modalities["ct"].present.any()
    assert batch.modalities["slides"].present.all()
    # with a training patient that has CT, the same test patients are read (standardised)
    tensors = SiteTensors.for_training(site, (CT, SLIDES), np.arange(21))
    assert tensors.batch(np.arange(21, 30)).modalities["ct"].present.all()


def test_iter_batches_cover_every_patient_once_and_merge_a_trailing_single():
    """A trailing batch of one patient is merged into the previous one, never dropped."""
    site = make_site("b", (CT, CLIN), 30, seed=1)
    tensors = SiteTensors(site, (CT, CLIN))
    idx = np.arange(5, 22)  # 17 patients: 8 + 8 + 1 -> 8 + 9
    batches = list(tensors.iter_batches(idx, 8))
    assert [len(b) for b in batches] == [8, 9]
    assert torch.cat([b.index for b in batches]).tolist() == idx.tolist()
    shuffled = list(tensors.iter_batches(idx, 8, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert sorted(torch.cat([b.index for b in shuffled]).tolist()) == idx.tolist()


def test_status_zero_is_a_label_and_minus_one_is_not():
    site = make_site("c", (CT, CLIN), 6, seed=2)
    site = dataclasses.replace(site, status=np.array([0, 1, -1, 0, 1, -1], dtype=np.int8))
    batch = SiteTensors(site, (CT, CLIN)).batch(np.arange(6))
    assert batch.status_mask.tolist() == [True, True, False, True, True, False]
    assert batch.status.tolist() == [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]


def test_a_patient_flagged_present_without_tokens_is_read_as_lacking_the_modality():
    site = make_site("d", (CT, CLIN), 12, seed=4, p_missing=0.4)
    md = site.modalities["ct"]
    empty = int(np.flatnonzero(np.diff(md.offsets) == 0)[0])
    flagged = md.present.copy()
    flagged[empty] = True
    site = dataclasses.replace(site, modalities={**site.modalities, "ct": dataclasses.replace(md, present=flagged)})
    batch = SiteTensors(site, (CT, CLIN)).batch(np.arange(12))
    assert not bool(batch.modalities["ct"].present[empty])
    assert batch.modalities["ct"].present.tolist() == (np.diff(md.offsets) > 0).tolist()
