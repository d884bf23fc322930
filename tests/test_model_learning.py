"""The full model (GCS, random drop, alignment on) learns a small synthetic survival task."""

from __future__ import annotations

import numpy as np
import torch
from lifelines.utils import concordance_index

from shared_model.model import build_model
from shared_model.objective import evaluation_losses, predict, training_step
from test_model_fixtures import ALL_SPECS, make_site, small_cfg, tensors_for
from test_model_fixtures import single_torch_thread  # noqa: F401  (autouse fixture)


def _cindex(st, risk: torch.Tensor) -> float:
    return concordance_index(st.site.time, -risk.numpy(), st.site.event)


def test_model_learns_held_out_risk_ordering():
    train = tensors_for(make_site("train", ALL_SPECS, 96, seed=0))
    test = tensors_for(make_site("test", ALL_SPECS, 96, seed=1))
    cfg = small_cfg()
    assert cfg.use_gcs and cfg.random_drop and cfg.use_alignment
    model = build_model(ALL_SPECS, cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    rng = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    test_batch = test.batch(np.arange(96))
    c_before = _cindex(test, predict(model, test_batch)[0])
    loss_before = evaluation_losses(model, test_batch)["cox"]
    steps = 0
    for _ in range(5):
        for batch in train.iter_batches(np.arange(96), 16, shuffle=True, generator=rng):
            stats = training_step(model, batch, opt, rng=rng, grad_clip=5.0)
            steps += 1
    assert steps == 30 and np.isfinite(stats["total"])
    c_after = _cindex(test, predict(model, test_batch)[0])
    oracle = concordance_index(test.site.time, -test.site.oracle_risk, test.site.event)
    assert c_after > 0.6, (c_before, c_after, oracle)
    assert c_after > c_before + 0.05
    assert evaluation_losses(model, test_batch)["cox"] < loss_before
