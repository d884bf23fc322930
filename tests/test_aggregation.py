"""Modality-aware aggregation: crafted replies through the real strategy code path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import FedAdam as FlwrFedAdam
from flwr.serverapp.strategy import FedYogi as FlwrFedYogi
from flwr.supercore.task_identity import TaskIdentity

from server.aggregation import ClientUpdate, aggregate_groups
from server.results import RunRecorder
from server.server_optimizers import make_server_optimizer
from server.strategy import FederationError, SiteInfo, SurvivalFedStrategy
from shared_model.runconfig import settings_from_run_config
from federation_fixtures import ReplyingGrid

GROUPS = {
    "encoder/ct": ["enc_ct.w"],
    "encoder/lab": ["enc_lab.w"],
    "missing/ct": ["miss_ct"],
    "missing/lab": ["miss_lab"],
    "missing-input/lab": ["miss_lab_input"],
    "fusion": ["fus.w", "fus.b"],
    "status_head": ["status.w"],
    "dce_missing": ["t_miss"],
}
SHAPES = {"enc_ct.w": (2, 3), "enc_lab.w": (4,), "miss_ct": (3,), "miss_lab": (3,), "miss_lab_input": (2,),
          "fus.w": (2, 2),
          "fus.b": (2,), "status.w": (2,), "t_miss": (2,)}


def _arrays(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, dtype=np.float32) + np.arange(np.prod(s)).reshape(s).astype(np.float32)
            for k, s in SHAPES.items()}


def _counts(n, has_ct, has_lab, n_status, incomplete, lab_collected=True):
    """Counts as shared_model.groups.training_counts sends them, without random drop."""
    return {"num-examples": n, "n-has:ct": has_ct, "n-lacks:ct": n - has_ct, "n-has:lab": has_lab,
            "n-lacks:lab": n - has_lab, "n-token:ct": n - has_ct, "n-token:lab": n - has_lab,
            "n-input-token:ct": n - has_ct, "n-input-token:lab": n - has_lab if lab_collected else 0,
            "n-status": n_status, "n-incomplete": incomplete, "train-loss": 1.0}


# site A: has ct only (site lacks lab entirely); B: has both; C: lab only, status labels
SITES = {
    "site-a": (1.0, _counts(10, 10, 0, 0, 0, lab_collected=False)),
    "site-b": (2.0, _counts(30, 20, 30, 0, 10)),
    "site-c": (5.0, _counts(20, 0, 20, 20, 5)),
}


def _expected(group: str, current: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from shared_model.groups import weight_key

    key = weight_key(group)
    w = {s: c[key] for s, (_, c) in SITES.items()}
    total = sum(w.values())
    out = {}
    for k in GROUPS[group]:
        if total == 0:
            out[k] = current[k]
        else:
            out[k] = sum(w[s] * _arrays(v)[k] for s, (v, _) in SITES.items()) / total
    return out


class CraftedGrid(ReplyingGrid):
    """Answers every train message with the crafted arrays and counts of its site (``fail``: sites
    that reply with an error)."""

    def __init__(self, node_sites: dict[int, str], fail: set[str] = frozenset()):
        super().__init__(node_sites)
        self.fail = fail

    def refusal(self, message: Message, site: str) -> str | None:
        return f"ValueError: site {site} is broken" if site in self.fail else None

    def reply(self, message: Message, site: str) -> Message:
        value, counts = SITES[site]
        return Message(RecordDict({
            "arrays": ArrayRecord({k: Array(v) for k, v in _arrays(value).items()}),
            "metrics": MetricRecord(counts),
            "site": ConfigRecord({"site": site}),
        }), reply_to=message)


@pytest.fixture()
def strategy(tmp_path: Path):
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, SUPERLINK_NODE_ID
    settings = settings_from_run_config({"sites": "site-a,site-b,site-c", "min-sites": 2,
                                         "results-dir": str(tmp_path)})
    st = SurvivalFedStrategy(settings, RunRecorder(tmp_path / "run"))
    st.groups = GROUPS
    st.model_spec = "[]"
    for i, name in enumerate(SITES):
        st.sites[100 + i] = SiteInfo(100 + i, name, "c", False, ("survival",), "[]", 0, 0, 0, "s")
    return st


def test_each_group_is_the_hand_computed_weighted_mean(strategy):
    grid = CraftedGrid({100 + i: s for i, s in enumerate(SITES)})
    current = _arrays(-7.0)
    new, info = strategy.train_round(grid, 1, current)
    for group in GROUPS:
        for k, v in _expected(group, current).items():
            np.testing.assert_allclose(new[k], v, rtol=1e-6, err_msg=f"group {group}, array {k}")
    # site-a lacks lab entirely: zero weight in the lab encoder, full weight in its missing token
    assert info["group_weights"]["encoder/lab"]["site-a"] == 0
    assert info["group_weights"]["missing/lab"]["site-a"] == 10
    # ... but none in lab's input-level token (a per-site constant there); site-b and
    # site-c lack no lab value either, so nobody informed it and it keeps its value
    assert info["group_weights"]["missing-input/lab"]["site-a"] == 0
    np.testing.assert_array_equal(new["miss_lab_input"], current["miss_lab_input"])
    # nobody lacked ct at site-a -> its ct missing token weight is zero; status head only from site-c
    np.testing.assert_allclose(new["status.w"], _arrays(5.0)["status.w"])
    np.testing.assert_allclose(new["enc_lab.w"], (30 * _arrays(2.0)["enc_lab.w"] + 20 * _arrays(5.0)["enc_lab.w"]) / 50)


def test_group_nobody_informed_keeps_its_value(strategy):
    grid = CraftedGrid({100: "site-a", 101: "site-b"})  # nobody has status labels
    del strategy.sites[102]
    current = _arrays(-7.0)
    new, _ = strategy.train_round(grid, 1, current)
    np.testing.assert_array_equal(new["status.w"], current["status.w"])


def test_failed_site_is_left_out_and_run_continues(strategy, caplog):
    grid = CraftedGrid({100 + i: s for i, s in enumerate(SITES)}, fail={"site-c"})
    new, info = strategy.train_round(grid, 1, _arrays(0.0))
    assert set(info["sites"]) == {"site-a", "site-b"}
    assert "site site-c failed in train round 1" in caplog.text
    assert "broken" in caplog.text


def test_below_min_sites_fails_with_a_message(strategy):
    grid = CraftedGrid({100 + i: s for i, s in enumerate(SITES)}, fail={"site-b", "site-c"})
    with pytest.raises(FederationError, match="below min-sites=2"):
        strategy.train_round(grid, 1, _arrays(0.0))


def test_aggregate_rejects_nan_and_shape_mismatch():
    cur = _arrays(0.0)
    bad = _arrays(1.0)
    bad["fus.w"][0, 0] = np.nan
    with pytest.raises(ValueError, match="site 'x'.*fus.w.*NaN"):
        aggregate_groups(cur, GROUPS, [ClientUpdate("x", bad, SITES["site-b"][1])])
    bad = _arrays(1.0)
    bad["fus.b"] = np.zeros(3, dtype=np.float32)
    with pytest.raises(ValueError, match="shape"):
        aggregate_groups(cur, GROUPS, [ClientUpdate("x", bad, SITES["site-b"][1])])


@pytest.mark.parametrize("name,flwr_cls", [("fedadam", FlwrFedAdam), ("fedyogi", FlwrFedYogi)])
def test_server_optimizer_matches_flower_when_every_group_is_informed(name, flwr_cls):
    """With one group weighted by num-examples, ours equals flwr's strategy on 3 rounds."""
    rng = np.random.default_rng(0)
    keys = {"a": (3, 2), "b": (4,)}
    current = {k: rng.normal(size=s).astype(np.float32) for k, s in keys.items()}
    groups = {"fusion": list(keys)}
    ours = make_server_optimizer(name, eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    theirs = flwr_cls(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    x_ours = {k: v.copy() for k, v in current.items()}
    x_theirs = {k: v.copy() for k, v in current.items()}
    for rnd in range(1, 4):
        agg = {k: (v + rng.normal(scale=0.1, size=v.shape)).astype(np.float32) for k, v in x_ours.items()}
        x_ours = ours.step(x_ours, agg, groups, {"fusion"})
        theirs.current_arrays = {k: v.copy() for k, v in x_theirs.items()}
        rec = ArrayRecord({k: Array(v) for k, v in agg.items()})
        from unittest.mock import patch

        with patch("flwr.serverapp.strategy.fedavg.FedAvg.aggregate_train", return_value=(rec, None)):
            out, _ = theirs.aggregate_train(rnd, [])
        x_theirs = {k: out[k].numpy() for k in keys}
        for k in keys:
            np.testing.assert_allclose(x_ours[k], x_theirs[k], rtol=1e-5, atol=1e-6)


def test_adaptive_optimizer_skips_uninformed_groups_and_round_trips_state():
    opt = make_server_optimizer("fedadam", eta=0.1)
    cur = {"a": np.ones(3, np.float32), "b": np.ones(2, np.float32)}
    groups = {"g1": ["a"], "g2": ["b"]}
    agg = {"a": np.full(3, 2.0, np.float32), "b": np.full(2, 5.0, np.float32)}
    new = opt.step(cur, agg, groups, {"g1"})
    np.testing.assert_array_equal(new["b"], cur["b"])  # untouched
    assert "b" not in opt.m and opt.t == {"g1": 1}
    clone = make_server_optimizer("fedadam", eta=0.1)
    clone.load_state_dict(opt.state_dict())
    a = opt.step(new, agg, groups, {"g1", "g2"})
    b = clone.step(new, agg, groups, {"g1", "g2"})
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(ValueError, match="fedadam"):
        make_server_optimizer("fedyogi").load_state_dict(opt.state_dict())


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_optimizers_average_buffers_instead_of_stepping_them(name):
    opt = make_server_optimizer(name, eta=0.5)
    cur = {"w": np.ones(2, np.float32), "bn.running_var": np.full(2, 0.01, np.float32)}
    agg = {"w": np.full(2, 0.9, np.float32), "bn.running_var": np.full(2, 0.002, np.float32)}
    new = opt.step(cur, agg, {"encoder/ct": ["w", "bn.running_var"]}, {"encoder/ct"}, averaged={"bn.running_var"})
    np.testing.assert_array_equal(new["bn.running_var"], agg["bn.running_var"])  # the aggregate, still > 0
    assert "bn.running_var" not in opt.m and not np.allclose(new["w"], agg["w"])  # parameters: adaptive step
    stepped = make_server_optimizer(name, eta=0.5).step(cur, agg, {"encoder/ct": list(cur)}, {"encoder/ct"})
    assert np.all(stepped["bn.running_var"] < 0)  # what a step would do to a variance


def test_a_node_that_connects_after_the_start_is_named_once(strategy, caplog):
    class Nodes:
        ids = [100, 101, 102]

        def get_node_ids(self):
            return self.ids

    grid = Nodes()
    strategy._known_nodes = set(grid.ids)  # as wait_for_nodes leaves it
    strategy.warn_late_nodes(grid)
    assert "connected after the run started" not in caplog.text
    grid.ids = [100, 101, 102, 205]
    strategy.warn_late_nodes(grid)
    strategy.warn_late_nodes(grid)
    assert caplog.text.count("node(s) 205 connected after the run started and take no part") == 1


# Each group's site weights written out by hand from the counts above (DESIGN §7 and the deviation
# in shared_model/groups.py), not derived from groups.weight_key as _expected does.
EXPECTED_WEIGHTS = {
    "encoder/ct": {"site-a": 10, "site-b": 20, "site-c": 0},  # patients with CT
    "encoder/lab": {"site-a": 0, "site-b": 30, "site-c": 20},  # patients with lab
    "missing/ct": {"site-a": 0, "site-b": 10, "site-c": 20},  # patients the CT token stood in for
    "missing/lab": {"site-a": 10, "site-b": 0, "site-c": 0},
    "missing-input/lab": {"site-a": 0, "site-b": 0, "site-c": 0},  # A never collects lab: 0
    "fusion": {"site-a": 10, "site-b": 30, "site-c": 20},  # every training patient
    "status_head": {"site-a": 0, "site-b": 0, "site-c": 20},  # status-labelled patients
    "dce_missing": {"site-a": 0, "site-b": 10, "site-c": 5},  # incomplete patients
}


def test_group_weights_are_the_hand_written_table(strategy):
    grid = CraftedGrid({100 + i: s for i, s in enumerate(SITES)})
    current = _arrays(-7.0)
    new, info = strategy.train_round(grid, 1, current)
    assert info["group_weights"] == EXPECTED_WEIGHTS
    # fusion: (10 * A + 30 * B + 20 * C) / 60 with the sites' arrays _arrays(1), _arrays(2), _arrays(5)
    np.testing.assert_allclose(new["fus.w"], (10 * _arrays(1.0)["fus.w"] + 30 * _arrays(2.0)["fus.w"]
                                              + 20 * _arrays(5.0)["fus.w"]) / 60, rtol=1e-6)
    np.testing.assert_array_equal(new["miss_lab_input"], current["miss_lab_input"])  # no site informed it
