"""The network, its losses and GCS on CUDA (skipped without a GPU)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from shared_model.model import build_model
from shared_model.objective import evaluation_losses, predict, training_step
from test_model_fixtures import ALL_SPECS, make_site, small_cfg, tensors_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_training_and_prediction_on_cuda_match_cpu():
    dev = torch.device("cuda")
    st = tensors_for(make_site("s", ALL_SPECS, 24, seed=0))
    batch = st.batch(np.arange(24))
    for cfg in (small_cfg(), small_cfg(use_gcs=False, detach_stages=True)):
        cpu = build_model(ALL_SPECS, cfg, seed=0)
        gpu = build_model(ALL_SPECS, cfg, seed=0).to(dev)
        risk_cpu, prob_cpu = predict(cpu, batch)
        risk_gpu, prob_gpu = predict(gpu, batch.to(dev))
        assert risk_gpu.device.type == "cuda"
        torch.testing.assert_close(risk_gpu.cpu(), risk_cpu, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(prob_gpu.cpu(), prob_cpu, atol=1e-4, rtol=1e-4)
        opt = torch.optim.AdamW(gpu.parameters(), lr=1e-3)
        rng = torch.Generator(device=dev).manual_seed(0)
        for _ in range(3):
            stats = training_step(gpu, batch.to(dev), opt, rng=rng, grad_clip=5.0)
        assert np.isfinite(stats["total"])
        assert np.isfinite(evaluation_losses(gpu, batch.to(dev))["total"])
    # per-patient independence on the GPU too
    alone = torch.cat([predict(gpu, st.batch([i]).to(dev))[0] for i in range(4)])
    torch.testing.assert_close(alone, predict(gpu, batch.to(dev))[0][:4], atol=1e-4, rtol=0)


def test_gcs_gate_zero_equivalence_on_cuda():
    dev = torch.device("cuda")
    batch = tensors_for(make_site("s", ALL_SPECS, 16, seed=0)).batch(np.arange(16)).to(dev)
    states = []
    for cfg in (small_cfg(use_gcs=False), small_cfg(use_gcs=True, gcs_force_gate=0.0)):
        model = build_model(ALL_SPECS, dataclasses.replace(cfg, dropout=0.0, attn_dropout=0.0,
                                                           bag_dropout=0.0), seed=0).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        training_step(model, batch, opt, rng=torch.Generator(device=dev).manual_seed(0))
        states.append(model.state_dict())
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], atol=1e-5, rtol=1e-4)
