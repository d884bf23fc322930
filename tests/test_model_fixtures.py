"""In-memory sites and small model configs for the model tests (no files, no sites/synthetic).

Imported by the other ``test_model_*`` / ``test_gcs`` modules; its own tests check
that the fixtures are what the model tests assume.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from shared_model.batch import SiteTensors, fit_input_stats
from shared_model.config import ModelConfig
from shared_model.model import build_model
from shared_model.objective import predict, training_step
from sites.types import ModalityData, ModalitySpec, SiteData, SiteSpec

CT = ModalitySpec("ct", "sequence", 12)
SLIDES = ModalitySpec("slides", "vector", 10)
TMA = ModalitySpec("tma", "bag", 9)
CLIN = ModalitySpec("clin", "tabular", 4, columns=("a", "b", "c", "d"))
LAB = ModalitySpec("lab", "tabular", 3, columns=("x", "y", "z"))
ALL_SPECS = (CT, SLIDES, TMA, CLIN, LAB)


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Run each model test on one torch thread (tiny tensors gain nothing from two, and
    two threads on a busy 2-core machine spin-wait badly); restores the setting after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_cfg(**overrides) -> ModelConfig:
    """A small, fast ModelConfig (same architecture, narrow widths)."""
    base = dict(
        d_inter=32, d_token=16, n_heads=4, topk=4, dce_dim=8, hazard_hidden=32, tabular_hidden=16,
        bag_hidden=(8, 4), ffn_mult=2,
    )
    base.update(overrides)
    return dataclasses.replace(ModelConfig(), **base)


def make_site(
    name: str,
    specs: tuple[ModalitySpec, ...],
    n: int,
    seed: int,
    p_missing: float = 0.2,
    max_tokens: int = 7,
    signal: float = 1.5,
    with_status: bool = True,
) -> SiteData:
    """A site with ``n`` patients; survival depends on the first feature of each modality.

    Token kinds get 1..max_tokens tokens per patient; each modality is missing
    for a patient with probability ``p_missing`` (at least one modality kept).
    Times in days (exponential, risk = signal * mean of the per-modality signals).
    """
    rng = np.random.default_rng(seed)
    present = rng.random((n, len(specs))) > p_missing
    present[~present.any(axis=1), 0] = True
    latent = np.zeros(n)
    mods: dict[str, ModalityData] = {}
    for j, spec in enumerate(specs):
        z = rng.normal(size=n)
        contrib = np.where(present[:, j], z, 0.0)
        latent += contrib
        if spec.kind == "tabular":
            vals = rng.normal(size=(n, spec.dim)).astype(np.float32)
            vals[:, 0] = z
            holes = rng.random((n, spec.dim)) < 0.1
            holes[:, 0] = False
            vals[holes] = np.nan
            vals[~present[:, j]] = np.nan
            mods[spec.name] = ModalityData(spec, present[:, j].copy(), vals, None)
        else:
            counts = np.where(present[:, j], rng.integers(1, max_tokens + 1, size=n), 0)
            offsets = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(counts, out=offsets[1:])
            vals = rng.normal(size=(int(offsets[-1]), spec.dim)).astype(np.float32)
            for i in range(n):
                vals[offsets[i] : offsets[i + 1], 0] += 2.0 * z[i]
            mods[spec.name] = ModalityData(spec, present[:, j].copy(), vals, offsets)
    risk = signal * latent / np.sqrt(present.sum(axis=1))
    t_event = rng.exponential(300.0 * np.exp(-risk))
    t_cens = rng.uniform(50.0, 900.0, size=n)
    time = np.minimum(t_event, t_cens).round()  # whole days: ties happen
    event = (t_event <= t_cens).astype(np.int8)
    status = (risk > 0).astype(np.int8) if with_status else -np.ones(n, dtype=np.int8)
    spec = SiteSpec(name=name, cohort=name, time_unit="days",
                    tasks=("survival", "status") if with_status else ("survival",), modalities=specs)
    return SiteData(root=Path(f"/in-memory/{name}"), spec=spec, patient_ids=np.array([f"p{i}" for i in range(n)]),
                    time=time.astype(np.float64), event=event, status=status, modalities=mods,
                    oracle_risk=risk)


def tensors_for(site: SiteData, specs=ALL_SPECS) -> SiteTensors:
    return SiteTensors(site, specs, fit_input_stats(site, np.arange(len(site)), "none"))


def mixed_batch(n: int = 16, seed: int = 3, p_missing: float = 0.3):
    """A batch of ``n`` patients of an all-modality site where some patients lack some modalities."""
    return tensors_for(make_site("s", ALL_SPECS, n, seed=seed, p_missing=p_missing)).batch(np.arange(n))


def adamw_step(cfg: ModelConfig, batch, prepare=None):
    """Build the model (seed 0), ``prepare(model)`` if given, and take one AdamW step with
    fixed dropout and probe seeds (grad clip 5); returns (model, step stats)."""
    model = build_model(ALL_SPECS, cfg, seed=0)
    if prepare is not None:
        prepare(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    torch.manual_seed(123)  # dropout
    stats = training_step(model, batch, opt, rng=torch.Generator().manual_seed(7), grad_clip=5.0)
    return model, stats


def assert_risk_is_fused_head_plus(model, batch, add_risk, add_status):
    """The model's risk and status logit on ``batch`` (eval mode) equal the fused heads'
    outputs plus the given per-patient terms [B]; the batch must have missing modalities.
    Returns (model output, fused heads' log-risk [B]) for further checks."""
    model.eval()
    out = model(batch)
    assert not bool(out.present.all())  # some patients lack some modalities
    heads_r, heads_s = model.heads_forward(out.fused)
    torch.testing.assert_close(out.risk, heads_r + add_risk, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.status_logit, heads_s + add_status, atol=1e-5, rtol=0)
    return out, heads_r


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Every state_dict tensor of ``a`` equals ``b``'s bit for bit (same architecture)."""
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)


def assert_prediction_independent_of_batch(model) -> None:
    """The first 5 patients' risks are the same predicted alone as in a batch of 20."""
    st = tensors_for(make_site("s", ALL_SPECS, 20, seed=1, max_tokens=9))
    alone = torch.cat([predict(model, st.batch([i]))[0] for i in range(5)])
    together, _ = predict(model, st.batch(np.arange(20)))
    torch.testing.assert_close(alone, together[:5], atol=1e-5, rtol=0)


def test_fixture_site_is_consistent():
    site = make_site("a", (CT, CLIN), 20, seed=0)
    st = tensors_for(site)
    b = st.batch(np.arange(20))
    assert b.modalities["ct"].values.shape[2] == 12
    assert not b.modalities["slides"].present.any()  # the site lacks it
    assert b.expected[0].tolist() == [True, False, False, True, False]
    assert set(np.unique(site.event)) <= {0, 1} and site.event.sum() > 0
    torch.testing.assert_close(b.time, torch.as_tensor(site.time, dtype=torch.float32))
