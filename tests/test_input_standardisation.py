"""Per-site input standardisation (shared_model.batch.fit_input_stats / SiteTensors.for_training)."""

from __future__ import annotations

import dataclasses

import numpy as np
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

    raw = SiteTensors.for_training(site, (CT, CLIN), train, standardize_embeddings=False).batch(train)
    assert float(raw.modalities["ct"].values[raw.modalities["ct"].mask].mean()) > 2.5
    # tabular columns are standardised either way
    torch.testing.assert_close(b.modalities["clin"].values, raw.modalities["clin"].values)


def test_default_config_standardises_embeddings():
    assert load_config().train.standardize_embeddings is True
    assert load_config(overrides={"train.standardize_embeddings": False}).train.standardize_embeddings is False
