"""Parameter groups, seeded construction, config validation."""

from __future__ import annotations

import pytest
import torch

from shared_model.model import build_model
from test_model_fixtures import ALL_SPECS, CT, small_cfg
from test_model_fixtures import single_torch_thread  # noqa: F401  (autouse fixture)


def test_groups_cover_state_dict_exactly_once():
    for cfg in (small_cfg(unimodal_risk=True, unimodal_input="input"),
                small_cfg(status_head=False, detach_stages=True)):
        model = build_model(ALL_SPECS, cfg, seed=0)
        groups = model.parameter_groups()
        keys = [k for ks in groups.values() for k in ks]
        assert sorted(keys) == sorted(model.state_dict().keys())
        assert len(keys) == len(set(keys))
        expected = {f"encoder/{s.name}" for s in ALL_SPECS} | {f"missing/{s.name}" for s in ALL_SPECS}
        if cfg.unimodal_input == "input":
            expected |= {f"missing-input/{s.name}" for s in ALL_SPECS}
        expected |= {"fusion", "dce_missing", "hazard_head", "gcs_gate"}
        if cfg.status_head:
            expected.add("status_head")
        assert set(groups) == expected
        assert all(groups[g] for g in groups)  # no empty group
    assert "encoders.ct.adapter.bn1.running_mean" in groups["encoder/ct"]  # buffers included
    assert sorted(groups["missing/ct"]) == ["missing.ct.adapter", "missing.ct.fusion"]
    wide = build_model(ALL_SPECS, small_cfg(unimodal_risk=True, unimodal_input="input"), seed=0)
    assert wide.parameter_groups()["missing-input/ct"] == ["missing.ct.input"]
    assert groups["dce_missing"] == ["dce_missing.t_miss"]
    assert "fusion.modality_embedding" in groups["fusion"]
    assert any(k.startswith("encoders.ct.aux_head") for k in groups["encoder/ct"])


def test_build_model_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = build_model(ALL_SPECS, small_cfg(), seed=3).state_dict()
    assert torch.equal(state, torch.random.get_rng_state())
    b = build_model(ALL_SPECS, small_cfg(), seed=3).state_dict()
    c = build_model(ALL_SPECS, small_cfg(), seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_state_dict_keys_do_not_depend_on_switches():
    a = build_model(ALL_SPECS, small_cfg(), seed=0)
    b = build_model(ALL_SPECS, small_cfg(use_gcs=False, use_dce=False, random_drop=False), seed=0)
    assert list(a.state_dict()) == list(b.state_dict())
    assert a.num_parameters() > 0 and a.state_bytes() >= 4 * a.num_parameters()


@pytest.mark.parametrize(
    "specs,cfg,match",
    [
        ((CT, CT), {}, "twice"),
        ((), {}, "at least one"),
        ((CT,), {"cox_ties": "exact"}, "cox_ties"),
        ((CT,), {"x_stream_kinds": ("image",)}, "x_stream_kinds"),
        ((CT,), {"gcs_min_denominator": 0.0}, "gcs_min_denominator"),
    ],
)
def test_invalid_model_definitions_raise(specs, cfg, match):
    with pytest.raises(ValueError, match=match):
        build_model(specs, small_cfg(**cfg), seed=0)
