"""Server optimisers and group aggregation checked against hand-computed values.

FedAdam / FedYogi follow Reddi et al. (2021), Algorithm 2, with the step size documented in
``server.server_optimizers`` (FedAdam: eta_hat = eta * sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)), as flwr;
FedYogi: eta). Every expected number below is written from those equations, never from the module.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from server.aggregation import ClientUpdate, aggregate_groups
from server.server_optimizers import make_server_optimizer
from shared_model.groups import weight_key

ETA, B1, B2, TAU = 0.3, 0.8, 0.9, 0.01  # distinct values so a swapped hyper-parameter shows


def _opt(name):
    return make_server_optimizer(name, eta=ETA, beta1=B1, beta2=B2, tau=TAU)


def _adam_lr(t):  # t = this group's 1-based update count
    return ETA * math.sqrt(1 - B2 ** (t + 1)) / (1 - B1 ** (t + 1))


# ----------------------------------------------------------------------------- FedAdam / FedYogi
def test_fedadam_two_rounds_by_hand():
    opt = _opt("fedadam")
    x0 = {"w": np.array([1.0, -2.0])}
    x1 = opt.step(x0, {"w": np.array([1.5, -2.5])}, {"g": ["w"]}, {"g"})
    # round 1: delta = +-0.5, m = 0.2 * delta = +-0.1, v = 0.1 * 0.25 = 0.025
    np.testing.assert_allclose(opt.m["w"], [0.1, -0.1], rtol=1e-12)
    np.testing.assert_allclose(opt.v["w"], [0.025, 0.025], rtol=1e-12)
    step1 = _adam_lr(1) * 0.1 / (math.sqrt(0.025) + TAU)
    np.testing.assert_allclose(x1["w"], [1.0 + step1, -2.0 - step1], rtol=1e-12)
    np.testing.assert_allclose(x1["w"], [1.216068757754051, -2.216068757754051], rtol=1e-12)
    assert x1["w"].dtype == np.float64 and opt.t == {"g": 1}

    a2 = np.array([1.25, -1.0])
    x2 = opt.step(x1, {"w": a2}, {"g": ["w"]}, {"g"})
    d2 = a2 - x1["w"]
    m2 = B1 * np.array([0.1, -0.1]) + (1 - B1) * d2
    v2 = B2 * 0.025 + (1 - B2) * d2**2
    np.testing.assert_allclose(opt.m["w"], m2, rtol=1e-12)
    np.testing.assert_allclose(opt.v["w"], v2, rtol=1e-12)
    np.testing.assert_allclose(x2["w"], x1["w"] + _adam_lr(2) * m2 / (np.sqrt(v2) + TAU), rtol=1e-12)
    assert opt.t == {"g": 2}


def test_fedyogi_second_moment_moves_by_the_sign_of_v_minus_delta_squared():
    """Yogi: v <- v - (1 - b2) delta^2 sign(v - delta^2); step eta (no bias correction)."""
    opt = _opt("fedyogi")
    x0 = {"w": np.array([1.0, -2.0])}
    x1 = opt.step(x0, {"w": np.array([1.5, -2.5])}, {"g": ["w"]}, {"g"})
    # round 1 from v = 0: sign(0 - 0.25) = -1, so v = 0.1 * 0.25 = 0.025 (like Adam's first step)
    np.testing.assert_allclose(opt.v["w"], [0.025, 0.025], rtol=1e-12)
    step1 = ETA * 0.1 / (math.sqrt(0.025) + TAU)
    np.testing.assert_allclose(x1["w"], [1.0 + step1, -2.0 - step1], rtol=1e-12)
    # round 2: delta = (0.05, 1.0): delta^2 = 0.0025 < v (v shrinks), 1.0 > v (v grows)
    d2 = np.array([0.05, 1.0])
    x2 = opt.step(x1, {"w": x1["w"] + d2}, {"g": ["w"]}, {"g"})
    np.testing.assert_allclose(opt.v["w"], [0.025 - 0.1 * 0.0025, 0.025 + 0.1 * 1.0], rtol=1e-9)
    m2 = B1 * np.array([0.1, -0.1]) + (1 - B1) * d2
    np.testing.assert_allclose(opt.m["w"], m2, rtol=1e-9)
    np.testing.assert_allclose(x2["w"], x1["w"] + ETA * m2 / (np.sqrt([0.02475, 0.125]) + TAU), rtol=1e-9)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_each_key_of_a_group_gets_its_own_moments(name):
    opt = _opt(name)
    cur = {"a": np.array([0.0]), "b": np.array([0.0, 0.0])}
    opt.step(cur, {"a": np.array([1.0]), "b": np.array([2.0, -3.0])}, {"g": ["a", "b"]}, {"g"})
    np.testing.assert_allclose(opt.m["a"], [0.2], rtol=1e-12)
    np.testing.assert_allclose(opt.m["b"], [0.4, -0.6], rtol=1e-12)
    np.testing.assert_allclose(opt.v["b"], [0.4, 0.9], rtol=1e-12)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_step_counts_and_moments_are_per_group(name):
    """g2 is first informed in round 2: its first update is a round-1 update (t = 1, zero moments),
    whatever g1 has done; g1 meanwhile is on its second update."""
    groups = {"g1": ["a"], "g2": ["b"]}
    opt = _opt(name)
    cur = {"a": np.array([1.0]), "b": np.array([1.0])}
    x1 = opt.step(cur, {"a": np.array([2.0]), "b": np.array([9.0])}, groups, {"g1"})
    assert x1["b"][0] == 1.0 and "b" not in opt.m and "b" not in opt.v and opt.t == {"g1": 1}
    x2 = opt.step(x1, {"a": np.array([2.0]), "b": np.array([3.0])}, groups, {"g1", "g2"})
    assert opt.t == {"g1": 2, "g2": 1}
    lr1 = _adam_lr(1) if name == "fedadam" else ETA
    # b: delta = 2, m = 0.4, v = 0.1 * 4 = 0.4
    np.testing.assert_allclose(x2["b"], [1.0 + lr1 * 0.4 / (math.sqrt(0.4) + TAU)], rtol=1e-12)
    fresh = _opt(name).step({"b": np.array([1.0])}, {"b": np.array([3.0])}, {"g2": ["b"]}, {"g2"})
    np.testing.assert_allclose(x2["b"], fresh["b"], rtol=1e-12)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_resumed_optimiser_continues_exactly_like_an_uninterrupted_one(name):
    groups = {"g1": ["a"], "g2": ["b"]}
    aggs = [({"a": np.array([2.0, 0.5]), "b": np.array([1.0])}, {"g1"}),
            ({"a": np.array([1.0, 1.0]), "b": np.array([4.0])}, {"g1", "g2"}),
            ({"a": np.array([3.0, -1.0]), "b": np.array([0.0])}, {"g1", "g2"})]
    cur0 = {"a": np.array([1.0, 1.0]), "b": np.array([2.0])}

    straight = _opt(name)
    x = cur0
    for agg, informed in aggs:
        x = straight.step(x, agg, groups, informed)

    first = _opt(name)
    y = first.step(cur0, *aggs[0][:1], groups, aggs[0][1])
    snapshot = first.state_dict()
    first.step(y, aggs[1][0], groups, aggs[1][1])  # the original goes on; the snapshot must not change
    assert snapshot["t"] == {"g1": 1} and set(snapshot["m"]) == {"a"}
    resumed = _opt(name)
    resumed.load_state_dict(snapshot)
    for agg, informed in aggs[1:]:
        y = resumed.step(y, agg, groups, informed)
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    assert resumed.t == straight.t == {"g1": 3, "g2": 2}


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedyogi"])
def test_buffers_take_the_aggregate_only_where_their_group_was_informed(name):
    groups = {"enc": ["enc.w", "enc.bn.running_var"], "other": ["oth.w", "oth.bn.running_var"]}
    cur = {"enc.w": np.array([1.0]), "enc.bn.running_var": np.array([0.5]),
           "oth.w": np.array([1.0]), "oth.bn.running_var": np.array([0.5])}
    agg = {"enc.w": np.array([2.0]), "enc.bn.running_var": np.array([0.25]),
           "oth.w": np.array([7.0]), "oth.bn.running_var": np.array([0.125])}  # 'other' uninformed
    opt = _opt(name) if name in ("fedadam", "fedyogi") else make_server_optimizer(name)
    new = opt.step(cur, agg, groups, {"enc"}, averaged={"enc.bn.running_var", "oth.bn.running_var"})
    assert new["enc.bn.running_var"][0] == 0.25
    assert new["oth.bn.running_var"][0] == 0.5 and new["oth.w"][0] == 1.0
    if name in ("fedavg", "fedprox"):
        assert new["enc.w"][0] == 2.0
    else:
        assert set(opt.m) == set(opt.v) == {"enc.w"}
        lr1 = _adam_lr(1) if name == "fedadam" else ETA
        np.testing.assert_allclose(new["enc.w"], [1.0 + lr1 * 0.2 / (math.sqrt(0.1) + TAU)], rtol=1e-12)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedyogi"])
def test_step_returns_copies_and_leaves_its_inputs_alone(name):
    cur = {"a": np.array([1.0, 2.0]), "b": np.array([3.0])}
    agg = {"a": np.array([2.0, 2.0]), "b": np.array([5.0])}
    keep_cur, keep_agg = {k: v.copy() for k, v in cur.items()}, {k: v.copy() for k, v in agg.items()}
    new = make_server_optimizer(name).step(cur, agg, {"g": ["a"], "h": ["b"]}, {"g"})
    for k in cur:
        assert new[k] is not cur[k] and new[k] is not agg[k]
        np.testing.assert_array_equal(cur[k], keep_cur[k])
        np.testing.assert_array_equal(agg[k], keep_agg[k])
    assert new["b"][0] == 3.0


def test_checkpoint_of_an_adaptive_optimiser_names_it_and_refuses_another():
    st = _opt("fedyogi").state_dict()
    assert st == {"name": "fedyogi", "m": {}, "v": {}, "t": {}}
    for other in ("fedadam", "fedavg", "fedprox"):
        with pytest.raises(ValueError, match="fedyogi"):
            make_server_optimizer(other).load_state_dict(st)


# ----------------------------------------------------------------------------- aggregation
def test_missing_token_groups_are_weighted_by_the_patients_they_stood_in_for():
    """Fractional token counts (random drop: 1/4 per droppable patient) weight the token group; a site
    with weight 0 is left out even if its arrays are far off; a group with total weight 0 keeps its value."""
    groups = {"encoder/ct": ["e"], "missing/ct": ["tok"], "missing-input/ct": ["tin"], "fusion": ["f"],
              "dce_missing": ["t_miss"], "status_head": ["s"]}
    cur = {k: np.array([0.5, -0.5], np.float32) for k in ("e", "tok", "tin", "f", "t_miss", "s")}

    def counts(n, has, token, inp, inc, st):
        return {"num-examples": n, "n-has:ct": has, "n-token:ct": token, "n-input-token:ct": inp,
                "n-incomplete": inc, "n-status": st}

    a = ClientUpdate("a", {k: np.array([1.0, 2.0], np.float32) for k in cur}, counts(8, 8, 2.0, 0, 1.5, 0))
    b = ClientUpdate("b", {k: np.array([5.0, -6.0], np.float32) for k in cur}, counts(2, 0, 6.0, 0, 0.5, 0))
    c = ClientUpdate("c", {k: np.array([1e6, 1e6], np.float32) for k in cur}, counts(0, 0, 0, 0, 0, 0))
    res = aggregate_groups(cur, groups, [c, b, a])
    np.testing.assert_allclose(res.arrays["e"], [1.0, 2.0], rtol=1e-6)  # b has no CT: 8 : 0
    np.testing.assert_allclose(res.arrays["tok"], [(2 * 1 + 6 * 5) / 8, (2 * 2 - 6 * 6) / 8], rtol=1e-6)
    np.testing.assert_allclose(res.arrays["f"], [(8 * 1 + 2 * 5) / 10, (8 * 2 - 2 * 6) / 10], rtol=1e-6)
    np.testing.assert_allclose(res.arrays["t_miss"], [(1.5 + 0.5 * 5) / 2, (1.5 * 2 - 0.5 * 6) / 2], rtol=1e-6)
    np.testing.assert_array_equal(res.arrays["tin"], cur["tin"])  # nobody collects it
    np.testing.assert_array_equal(res.arrays["s"], cur["s"])
    assert res.informed == {"encoder/ct", "missing/ct", "fusion", "dce_missing"}
    assert res.group_weights["missing/ct"] == {"a": 2.0, "b": 6.0, "c": 0.0}
    assert res.group_weights["dce_missing"] == {"a": 1.5, "b": 0.5, "c": 0.0}
    assert all(v.dtype == np.float32 for v in res.arrays.values())


def test_weighted_mean_is_taken_in_float64_before_the_cast():
    """Weights 1/3 and 2/3 of float32 arrays: the mean is rounded once, from float64."""
    cur = {"w": np.zeros(4, np.float32)}
    xa = np.array([0.1, 1.1, 3.3, 1e-3], np.float32)
    xb = np.array([0.7, 2.9, 5.7, 7e-3], np.float32)
    res = aggregate_groups(cur, {"fusion": ["w"]}, [ClientUpdate("a", {"w": xa}, {"num-examples": 1}),
                                                    ClientUpdate("b", {"w": xb}, {"num-examples": 2})])
    exact = (xa.astype(np.float64) + 2 * xb.astype(np.float64)) / 3
    np.testing.assert_allclose(res.arrays["w"], exact.astype(np.float32), rtol=1e-7)


def test_an_integer_buffer_takes_the_rounded_mean_not_the_truncated_one():
    """Counts 9 and 10 with weights 1 and 2: mean 9.67 -> 10 (the cast alone truncated it to 9)."""
    cur = {"n": np.array([0, 0], np.int64)}
    res = aggregate_groups(cur, {"fusion": ["n"]}, [
        ClientUpdate("a", {"n": np.array([9, 4], np.int64)}, {"num-examples": 1}),
        ClientUpdate("b", {"n": np.array([10, 4], np.int64)}, {"num-examples": 2})])
    assert res.arrays["n"].dtype == np.int64 and res.arrays["n"].tolist() == [10, 4]


def test_weight_key_of_every_group_kind():
    assert weight_key("encoder/ct") == "n-has:ct"
    assert weight_key("missing/ct") == "n-token:ct"
    assert weight_key("missing-input/ct") == "n-input-token:ct"
    assert weight_key("dce_missing") == "n-incomplete"
    assert weight_key("status_head") == "n-status"
    for g in ("fusion", "hazard_head", "gcs_gate", "agreement", "missingness", "encoders"):
        assert weight_key(g) == "num-examples", g


# ----------------------------------------------------------------------------- training counts
@pytest.mark.parametrize("random_drop", [False, True])
def test_training_counts_by_hand_on_three_collected_modalities(random_drop):
    """Rows 1..7 of a site collecting ct, clin, lab (presence and labels set by hand; row 0 is not a
    training row). A patient with 2 of 3 is both incomplete and drop-eligible: it counts 1 for t_miss,
    not 1 + 1/2. Status label 0 is a label."""
    from shared_model.groups import training_counts
    from test_model_fixtures import ALL_SPECS, CLIN, CT, LAB, make_site

    site = make_site("three", (CT, CLIN, LAB), 8, seed=0, p_missing=0.3)
    presence = {"ct": [1, 1, 1, 1, 0, 1, 0, 1], "clin": [1, 1, 1, 0, 1, 1, 0, 1], "lab": [1, 1, 0, 0, 1, 1, 1, 1]}
    for name, col in presence.items():
        site.modalities[name].present[:] = np.array(col, dtype=bool)
    site.status[:] = np.array([1, 0, 1, -1, 0, -1, 1, 0], dtype=np.int8)
    c = training_counts(site, np.arange(1, 8), ALL_SPECS, random_drop=random_drop)
    assert c["num-examples"] == 7
    assert c["n-status"] == 5  # rows 1, 2, 4, 6, 7 (0 or 1); rows 3 and 5 are -1
    assert (c["n-has:ct"], c["n-has:clin"], c["n-has:lab"], c["n-has:slides"]) == (5, 5, 5, 0)
    assert (c["n-lacks:ct"], c["n-lacks:clin"], c["n-lacks:lab"], c["n-lacks:slides"]) == (2, 2, 2, 7)
    # incomplete (lacks a collected modality): rows 2, 3, 4, 6; drop-eligible (>= 2 present): 1, 2, 4, 5, 7
    if random_drop:
        assert c["n-incomplete"] == 4 + 0.5 * 3  # complete and drop-eligible: rows 1, 5, 7
        # lacking m: 1 each; having m and drop-eligible: 1/4 each
        assert (c["n-token:ct"], c["n-token:clin"], c["n-token:lab"]) == (2 + 0.25 * 4, 2 + 0.25 * 5, 2 + 0.25 * 4)
    else:
        assert c["n-incomplete"] == 4
        assert (c["n-token:ct"], c["n-token:clin"], c["n-token:lab"]) == (2, 2, 2)
    assert c["n-input-token:ct"] == c["n-token:ct"] and c["n-input-token:lab"] == c["n-token:lab"]
    assert (c["n-token:slides"], c["n-input-token:slides"]) == (7, 0)


# ----------------------------------------------------------------------------- parameter groups
def test_a_modality_whose_name_extends_another_gets_its_own_groups():
    """'ct' and 'ct_pet': prefix matching must stop at the dot, or ct's groups swallow ct_pet's keys."""
    from shared_model.model import build_model
    from sites.types import ModalitySpec
    from test_model_fixtures import CT, small_cfg

    specs = (CT, ModalitySpec("ct_pet", "sequence", 12))
    groups = build_model(specs, small_cfg(unimodal_risk=True, unimodal_input="input"), seed=0).parameter_groups()
    for g in ("encoder/ct", "missing/ct", "missing-input/ct"):
        assert groups[g] and not any("ct_pet" in k for k in groups[g]), g
    assert groups["encoder/ct_pet"] and all(k.startswith("encoders.ct_pet.") for k in groups["encoder/ct_pet"])
    assert sorted(groups["missing/ct_pet"]) == ["missing.ct_pet.adapter", "missing.ct_pet.fusion"]
    assert groups["missing-input/ct_pet"] == ["missing.ct_pet.input"]
