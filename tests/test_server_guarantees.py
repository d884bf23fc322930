"""Server guarantees a mutation slipped past (fourth review round, mutation testing of server/ and
client/): node waiting, handshake checks, per-group FedAdam through the strategy, the two-pass
evaluation's moments / grid / min-sites, aggregation input checks, checkpointed site declarations,
resume refusals, and the numbers written to rounds.json, the CSV and summary.md.

Crafted grids answer the strategy's messages (no model, no ClientApp), as in test_aggregation.py."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from server.aggregation import ClientUpdate, aggregate_groups
from server.checkpoint import Checkpoint, load_checkpoint, resume_problems, save_checkpoint
from server.results import RunRecorder
from server.server_optimizers import make_server_optimizer
from server.strategy import FederationError, SiteInfo, SurvivalFedStrategy
from shared_model import pooled_eval as P
from shared_model.runconfig import settings_from_run_config
from shared_model.specs import ModalitySpec, specs_from_json, specs_to_json
from federation_fixtures import ReplyingGrid

GROUPS = {"encoder/ct": ["enc.w"], "fusion": ["fus.w", "fus.b"], "status_head": ["status.w"]}
SHAPES = {"enc.w": (2, 3), "fus.w": (2, 2), "fus.b": (2,), "status.w": (2,)}


def _arrays(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, dtype=np.float32) + np.arange(np.prod(s)).reshape(s).astype(np.float32)
            for k, s in SHAPES.items()}


def _counts(n: int, has_ct: int, n_status: int, loss: float = 1.0) -> dict:
    return {"num-examples": n, "n-has:ct": has_ct, "n-status": n_status, "train-loss": loss}


class Site:
    """One crafted site: what it declares, what it trains to, its held-out patients (kept here)."""

    def __init__(self, name: str, value: float, counts: dict, modalities=(ModalitySpec("ct", "sequence", 10),),
                 n_test: int = 40, seed: int = 0, shift: float = 0.0):
        rng = np.random.default_rng(seed)
        self.name, self.value, self.counts, self.modalities = name, value, counts, modalities
        x = rng.normal(size=n_test)
        t_ev = rng.exponential(900 * np.exp(-x))
        t_c = rng.uniform(0, 3000, n_test)
        self.time = np.floor(np.minimum(t_ev, t_c))
        self.event = (t_ev <= t_c).astype(int)
        self.risk = shift + 3.0 * shift * x + rng.normal(scale=0.5, size=n_test)


class FakeFederation(ReplyingGrid):
    """Answers query / train / evaluate / evaluate.counts for crafted sites; ``fail`` maps a message
    type to the sites that reply with an error to it."""

    def __init__(self, sites: dict[int, Site], fail: dict[str, set[str]] | None = None):
        super().__init__(sites)
        self.fail = fail or {}

    def refusal(self, message: Message, site: Site) -> str | None:
        if site.name in self.fail.get(message.metadata.message_type, set()):
            return f"ValueError: site {site.name} refuses"
        return None

    def reply(self, m: Message, site: Site) -> Message:
        kind = m.metadata.message_type
        if kind == "query":
            return Message(RecordDict({"site": ConfigRecord({
                "site": site.name, "cohort": "c", "simulated": False, "tasks": "survival",
                "modalities": specs_to_json(site.modalities), "n-patients": 100, "n-train": 60, "n-test": 40,
                "split": "default", "standardize-embeddings": "per_dimension"})}), reply_to=m)
        if kind == "train":
            return Message(RecordDict({
                "arrays": ArrayRecord({k: Array(v) for k, v in _arrays(site.value).items()}),
                "metrics": MetricRecord(site.counts), "site": ConfigRecord({"site": site.name})}), reply_to=m)
        if kind == "evaluate":
            return Message(RecordDict({"metrics": MetricRecord({
                "num-examples": len(site.time), "n-events": int(site.event.sum()), "n-status": 0,
                "moments-risk": [float(x) for x in P.site_moments(site.risk)],
                "moments-status": [0.0, 0.0, 0.0]}), "site": ConfigRecord({"site": site.name})}), reply_to=m)
        assert kind == "evaluate.counts", kind
        grid = P.EvalGrid.from_record(dict(m.content["grid"]))
        arrays = P.site_statistics(grid, site.time, site.event, site.risk).to_arrays()
        metrics = MetricRecord({k: [int(x) for x in np.asarray(v).ravel()] for k, v in arrays.items()})
        metrics["num-examples"] = len(site.time)
        return Message(RecordDict({"metrics": metrics, "site": ConfigRecord({"site": site.name})}), reply_to=m)


def _sites() -> dict[int, Site]:
    return {
        100: Site("site-a", 1.0, _counts(10, 10, 0, loss=2.0), n_test=30, seed=1, shift=0.0),
        101: Site("site-b", 2.0, _counts(30, 20, 0, loss=1.0), n_test=50, seed=2, shift=2.0),
        102: Site("site-c", 5.0, _counts(20, 0, 20, loss=4.0), n_test=40, seed=3, shift=-1.0),
    }


def _strategy(tmp_path: Path, crafted: dict[int, Site] | None = None, **rc) -> SurvivalFedStrategy:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, SUPERLINK_NODE_ID
    run_config = {"sites": "site-a,site-b,site-c", "min-sites": 2, "results-dir": str(tmp_path),
                  "eval-time-bins": 32, "eval-risk-bins": 16, **rc}
    st = SurvivalFedStrategy(settings_from_run_config(run_config), RunRecorder(tmp_path / "run"))
    st.groups = {g: list(k) for g, k in GROUPS.items()}
    st.model_spec = "[]"
    for node, s in (_sites() if crafted is None else crafted).items():
        st.sites[node] = SiteInfo(node, s.name, "c", False, ("survival",), "[]", 100, 60, 40, "default")
    return st


# ----------------------------------------------------------------------------- nodes, handshake
def test_the_server_waits_for_every_listed_site_not_just_min_sites(tmp_path, monkeypatch):
    """sites lists 3, min-sites is 2: a third node that connects a moment later takes part."""
    import server.strategy as strategy_module

    class Arriving:
        calls = 0

        def get_node_ids(self):
            self.calls += 1
            return [1, 2] if self.calls == 1 else [1, 2, 3]

    monkeypatch.setattr(strategy_module.time, "sleep", lambda s: None)
    st = _strategy(tmp_path, **{"node-wait-timeout": 60.0})
    assert st.wait_for_nodes(Arriving()) == [1, 2, 3]


def test_a_handshake_below_min_sites_fails_there(tmp_path):
    st = _strategy(tmp_path, crafted={})
    fed = FakeFederation(_sites(), fail={"query": {"site-b", "site-c"}})
    with pytest.raises(FederationError, match="handshake: only 1 site"):
        st.handshake(fed, sorted(fed.node_sites))


def test_two_nodes_serving_one_site_are_refused(tmp_path):
    st = _strategy(tmp_path, crafted={})
    sites = _sites()
    sites[101].name = "site-a"
    with pytest.raises(FederationError, match=r"several nodes serve the same site \['site-a'\]"):
        st.handshake(FakeFederation(sites), sorted(sites))


def test_the_union_model_follows_the_run_configs_site_order(tmp_path):
    """sites = "zeta,alpha": zeta's modality comes first, whatever the names' alphabetical order."""
    sites = {1: Site("alpha", 0, {}, modalities=(ModalitySpec("ct", "sequence", 10),)),
             2: Site("zeta", 0, {}, modalities=(ModalitySpec("lab", "tabular", 4),))}
    st = _strategy(tmp_path, crafted={}, sites="zeta,alpha")
    st.handshake(FakeFederation(sites), [1, 2])
    assert [m.name for m in specs_from_json(st.model_spec)] == ["lab", "ct"]


# ----------------------------------------------------------------------------- training
def test_the_server_optimiser_takes_the_run_configs_hyper_parameters(tmp_path):
    st = _strategy(tmp_path, **{"server-optimizer": "fedadam", "server-lr": 0.3, "server-beta1": 0.5,
                                "server-beta2": 0.7, "server-tau": 0.02})
    assert (st.optimizer.name, st.optimizer.eta, st.optimizer.beta1, st.optimizer.beta2, st.optimizer.tau) == (
        "fedadam", 0.3, 0.5, 0.7, 0.02)


def test_per_site_train_record_reads_each_count_it_names(tmp_path):
    st = _strategy(tmp_path)
    _, info = st.train_round(FakeFederation(_sites()), 1, _arrays(0.0))
    assert {s: v["n_train"] for s, v in info["sites"].items()} == {"site-a": 10, "site-b": 30, "site-c": 20}
    assert {s: v["train_loss"] for s, v in info["sites"].items()} == {"site-a": 2.0, "site-b": 1.0, "site-c": 4.0}


def test_fedadam_through_the_strategy_leaves_a_group_nobody_informed_where_it_was(tmp_path):
    """Round 1 informs the status head (site-c); in round 2 site-c fails: under FedAdam the head must
    not drift with its round-1 momentum, and its step count stays 1."""
    st = _strategy(tmp_path, **{"server-optimizer": "fedadam", "server-lr": 0.5})
    x1, _ = st.train_round(FakeFederation(_sites()), 1, _arrays(-3.0))
    assert not np.allclose(x1["status.w"], _arrays(-3.0)["status.w"])  # it moved in round 1
    x2, info = st.train_round(FakeFederation(_sites(), fail={"train": {"site-c"}}), 2, x1)
    np.testing.assert_array_equal(x2["status.w"], x1["status.w"])
    assert st.optimizer.t == {"encoder/ct": 2, "fusion": 2, "status_head": 1}
    assert not np.allclose(x2["fus.w"], x1["fus.w"])  # informed groups still step


def test_fedadam_through_the_strategy_averages_buffers(tmp_path):
    """A buffer (running statistic) takes the client-weighted aggregate, never an adaptive step."""
    st = _strategy(tmp_path, **{"server-optimizer": "fedadam", "server-lr": 0.5})
    st.buffers = {"fus.b"}
    new, _ = st.train_round(FakeFederation(_sites()), 1, _arrays(-3.0))
    expected = (10 * _arrays(1.0)["fus.b"] + 30 * _arrays(2.0)["fus.b"] + 20 * _arrays(5.0)["fus.b"]) / 60
    np.testing.assert_allclose(new["fus.b"], expected, rtol=1e-6)


# ----------------------------------------------------------------------------- evaluation
def test_the_grid_comes_from_the_summed_moments_of_every_site(tmp_path):
    st = _strategy(tmp_path)
    fed = FakeFederation(_sites())
    st.evaluate_round(fed, 1, _arrays(0.0))
    sent = [m for m in fed.sent if m.metadata.message_type == "evaluate.counts"]
    assert len(sent) == 3
    grid = P.EvalGrid.from_record(dict(sent[0].content["grid"]))
    want = P.make_grid(P.sum_moments([P.site_moments(s.risk) for s in _sites().values()]), None,
                       n_time_bins=32, n_risk_bins=16, horizons_days=st.settings.eval_horizons_days)
    np.testing.assert_array_equal(grid.risk_edges, want.risk_edges)
    np.testing.assert_array_equal(grid.time_edges, want.time_edges)


def test_pooled_numbers_are_the_sum_of_the_sites_counts(tmp_path):
    st = _strategy(tmp_path, **{"eval-risk-groups": 3})
    out = st.evaluate_round(FakeFederation(_sites()), 1, _arrays(0.0))
    sites = _sites().values()
    assert out["pooled"]["n"] == sum(len(s.time) for s in sites)
    assert out["pooled"]["n_events"] == sum(int(s.event.sum()) for s in sites)
    assert {k: v["n_events"] for k, v in out["sites_eval"].items()} == {s.name: int(s.event.sum()) for s in sites}
    assert len(out["pooled"]["groups"]) == 3  # the run config's eval-risk-groups
    grid = P.make_grid(P.sum_moments([P.site_moments(s.risk) for s in sites]), None, n_time_bins=32,
                       n_risk_bins=16, horizons_days=st.settings.eval_horizons_days)
    stats = [P.site_statistics(grid, s.time, s.event, s.risk) for s in sites]
    within = P.within_site_cindex(stats, grid)
    assert within is not None and out["pooled"]["cindex_harrell_within_sites"] == pytest.approx(within, abs=1e-12)
    assert out["pooled"]["cindex_harrell_within_sites"] != pytest.approx(out["pooled"]["cindex_harrell"], abs=1e-6)


def test_a_site_that_refused_pass_1_is_not_asked_for_counts(tmp_path):
    """A site that sent no evaluation statistics (e.g. below its eval-min-patients) gets no grid."""
    st = _strategy(tmp_path)
    fed = FakeFederation(_sites(), fail={"evaluate": {"site-c"}})
    out = st.evaluate_round(fed, 1, _arrays(0.0))
    counted = sorted(m.metadata.dst_node_id for m in fed.sent if m.metadata.message_type == "evaluate.counts")
    assert counted == [100, 101]
    assert set(out["sites_eval"]) == {"site-a", "site-b"} and out["pooled"]["n"] == 30 + 50


@pytest.mark.parametrize("phase, kind", [("evaluate round 1", "evaluate"),
                                         (r"evaluate \(counts\) round 1", "evaluate.counts")])
def test_each_evaluation_pass_needs_min_sites(tmp_path, phase, kind):
    st = _strategy(tmp_path)
    with pytest.raises(FederationError, match=f"{phase}: only 1 site"):
        st.evaluate_round(FakeFederation(_sites(), fail={kind: {"site-b", "site-c"}}), 1, _arrays(0.0))


# ----------------------------------------------------------------------------- aggregation inputs
def _upd(site="x", **change):
    arrays = {**_arrays(1.0), **change}
    return ClientUpdate(site, arrays, _counts(10, 10, 5))


def test_aggregation_refuses_a_broadcastable_wrong_shape():
    """(1,) would broadcast over a (2,) bias; the check must refuse it, not numpy's luck."""
    with pytest.raises(ValueError, match=r"site 'x': array 'fus.b' has shape \(1,\), model has \(2,\)"):
        aggregate_groups(_arrays(0.0), GROUPS, [_upd(**{"fus.b": np.zeros(1, np.float32)})])


def test_aggregation_refuses_missing_or_extra_arrays_and_missing_counts():
    extra = _upd()
    extra.arrays["other"] = np.zeros(2, np.float32)
    with pytest.raises(ValueError, match=r"site 'x' sent arrays that do not match the model: \['other'\]"):
        aggregate_groups(_arrays(0.0), GROUPS, [extra])
    missing = _upd()
    del missing.arrays["status.w"]
    with pytest.raises(ValueError, match=r"do not match the model: \['status.w'\]"):
        aggregate_groups(_arrays(0.0), GROUPS, [missing])
    no_count = ClientUpdate("x", _arrays(1.0), {"num-examples": 10, "n-has:ct": 3})
    with pytest.raises(ValueError, match="site 'x' did not report the count 'n-status' for group 'status_head'"):
        aggregate_groups(_arrays(0.0), GROUPS, [no_count])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -5.0])
def test_aggregation_refuses_a_count_that_is_not_a_patient_count(bad):
    """A NaN count made the whole group NaN in the global model; a negative one inflated the other
    sites' weights (10 / (10 - 5) = 2 for site a)."""
    ups = [ClientUpdate("a", _arrays(1.0), {"num-examples": 10, "n-has:ct": 10, "n-status": 10}),
           ClientUpdate("b", _arrays(1.0), {"num-examples": bad, "n-has:ct": 10, "n-status": 10})]
    with pytest.raises(ValueError, match=r"site 'b': count 'num-examples' for group '.*' is .*counts are patients"):
        aggregate_groups(_arrays(0.0), GROUPS, ups)


def test_aggregation_sums_in_site_order_whatever_order_the_replies_came_in():
    """The sum is taken in site order, so a resumed or re-ordered run aggregates bit for bit the same."""
    big = {k: np.full(s, 1e17, np.float32) for k, s in SHAPES.items()}
    ups = [ClientUpdate("a", big, _counts(1, 1, 1)), ClientUpdate("b", _arrays(1.0), _counts(1, 1, 1)),
           ClientUpdate("c", {k: -v for k, v in big.items()}, _counts(1, 1, 1))]
    first = aggregate_groups(_arrays(0.0), GROUPS, ups).arrays
    second = aggregate_groups(_arrays(0.0), GROUPS, [ups[0], ups[2], ups[1]]).arrays
    for k in first:
        np.testing.assert_array_equal(first[k], second[k], err_msg=k)


def test_aggregation_refuses_a_key_in_two_groups():
    groups = {**GROUPS, "status_head": ["status.w", "fus.b"]}
    with pytest.raises(ValueError, match="do not cover the model state exactly once"):
        aggregate_groups(_arrays(0.0), groups, [_upd()])


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "fedyogi"])
def test_aggregate_and_step_keep_each_arrays_dtype(name):
    cur = _arrays(0.0)
    agg = aggregate_groups(cur, GROUPS, [_upd("a"), ClientUpdate("b", _arrays(3.0), _counts(5, 5, 0))])
    assert {k: v.dtype for k, v in agg.arrays.items()} == {k: np.dtype(np.float32) for k in cur}
    new = make_server_optimizer(name).step(cur, agg.arrays, GROUPS, agg.informed)
    assert {k: v.dtype for k, v in new.items()} == {k: np.dtype(np.float32) for k in cur}


def test_fedprox_has_its_own_name_in_checkpoints():
    assert make_server_optimizer("fedprox").state_dict() == {"name": "fedprox"}
    with pytest.raises(ValueError, match="fedavg"):
        make_server_optimizer("fedprox").load_state_dict(make_server_optimizer("fedavg").state_dict())


# ----------------------------------------------------------------------------- checkpoint / resume
SITE_DECL = {"a": {"split": "default", "n_train": 30, "n_test": 10, "n_patients": 40}}


def test_a_checkpoint_keeps_the_sites_declarations(tmp_path):
    save_checkpoint(tmp_path, Checkpoint(round=2, arrays={"w": np.ones(2, np.float32)},
                                         optimizer_state={"name": "fedavg"}, model_spec="[]", settings={},
                                         sites=SITE_DECL))
    back = load_checkpoint(tmp_path)
    assert back.sites == SITE_DECL
    assert resume_problems(back, {}, {"a": {**SITE_DECL["a"], "n_train": 29}}) == [
        "site a n_train: checkpoint 30, now 29"]


@pytest.mark.parametrize("key", ["n_train", "n_test", "n_patients"])
def test_resume_refuses_a_site_whose_patient_counts_changed(key):
    ck = Checkpoint(round=1, arrays={}, optimizer_state={}, model_spec="[]", settings={}, sites=SITE_DECL)
    assert resume_problems(ck, {}, {"a": {**SITE_DECL["a"], key: 1}}) == [f"site a {key}: checkpoint "
                                                                          f"{SITE_DECL['a'][key]!r}, now 1"]


@pytest.mark.parametrize("rc", [
    {"server-optimizer": "fedadam"}, {"server-lr": 0.5}, {"server-beta1": 0.5}, {"server-beta2": 0.5},
    {"server-tau": 0.5}, {"eval-time-bins": 100}, {"eval-risk-bins": 100}, {"eval-horizon-days": 4000.0},
    {"eval-horizons-days": "365"}, {"eval-risk-groups": 3}, {"sites": "a,b,c"},
    {"server-optimizer": "fedprox", "proximal-mu": 0.1},
])
def test_resume_refuses_a_change_of_what_the_rounds_compute(rc):
    base = {"sites": "a,b", "min-sites": 2}
    old = settings_from_run_config(base)
    ck = Checkpoint(round=1, arrays={}, optimizer_state={}, model_spec="[]", settings=old.as_dict())
    problems = resume_problems(ck, settings_from_run_config({**base, **rc}).as_dict(), {})
    changed = {k.replace("-", "_") for k in rc}
    named = {p.split(":")[0] for p in problems}
    assert changed <= named | {"proximal_mu"} and problems, problems
    if "proximal-mu" in rc:
        assert "config.train.proximal_mu" in named


# ----------------------------------------------------------------------------- results files
def _record(rnd: int) -> dict:
    return {
        "round": rnd, "n_train": 60, "train_loss": 0.25 + rnd,
        "sites": {"b": {"n_train": 30, "train_loss": 0.5, "n_test": 12, "n_events": 5, "cindex": 0.61,
                        "auc": 0.71, "simulated": True},
                  "a": {"n_train": 30, "train_loss": 0.75, "n_test": 8, "n_events": 3, "cindex": 0.62,
                        "auc": 0.72, "simulated": False}},
        "pooled": {"n": 20, "n_events": 8, "cindex_harrell": 0.63, "auc_status": 0.73,
                   "cindex_harrell_within_sites": 0.64, "cindex_uno": 0.65,
                   "td_auc": {"365d": 0.66, "1095d": None}, "logrank_p": 0.0123, "hazard_ratio": 1.75,
                   "hazard_ratio_ci_low": 1.1, "hazard_ratio_ci_high": 2.9},
        "mean_of_sites": {"mean": {"cindex_harrell": 0.615, "auc_status": 0.715, "cindex_uno": 0.5}},
        "report": {"round": rnd, "x": 1},
    }


def test_rounds_json_and_csv_hold_each_number_in_its_column(tmp_path):
    rec = RunRecorder(tmp_path)
    rec.add_round(_record(2))
    rec.add_round(_record(1))
    assert [r["round"] for r in json.loads((tmp_path / "rounds.json").read_text())] == [1, 2]  # in round order
    rec.add_round({**_record(2), "train_loss": 9.0})  # a round recorded again (resume): replaced, not doubled
    rounds = json.loads((tmp_path / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2] and rounds[1]["train_loss"] == 9.0
    assert json.loads((tmp_path / "pooled" / "round_001.json").read_text()) == {"round": 1, "x": 1}
    rows = list(csv.DictReader(io.StringIO((tmp_path / "metrics_per_round.csv").read_text())))
    assert [(r["round"], r["site"]) for r in rows] == [("1", "a"), ("1", "b"), ("1", "mean-of-sites"), ("1", "pooled"),
                                                       ("2", "a"), ("2", "b"), ("2", "mean-of-sites"), ("2", "pooled")]
    a, b, mean, pooled = rows[:4]
    assert a == {"round": "1", "site": "a", "simulated": "False", "n_train": "30", "train_loss": "0.75", "n_test": "8",
                 "n_events": "3", "cindex": "0.62", "cindex_within_sites": "", "auc": "0.72", "cindex_uno": "",
                 "td_auc": "", "logrank_p": "", "hazard_ratio": ""}
    assert b["simulated"] == "True"
    assert (mean["cindex"], mean["auc"], mean["n_test"]) == ("0.615", "0.715", "")
    assert pooled == {"round": "1", "site": "pooled", "simulated": "", "n_train": "60", "train_loss": "1.25",
                      "n_test": "20", "n_events": "8", "cindex": "0.63", "cindex_within_sites": "0.64", "auc": "0.73",
                      "cindex_uno": "0.65", "td_auc": "365d:0.6600", "logrank_p": "0.0123", "hazard_ratio": "1.75"}
    assert rows[7]["train_loss"] == "9.0"


def test_summary_puts_each_number_in_its_row(tmp_path):
    from types import SimpleNamespace

    from server.summary import write_summary

    settings = settings_from_run_config({"min-sites": 1, "server-optimizer": "fedyogi", "seed": 5})
    strategy = SimpleNamespace(sites={1: SiteInfo(1, "b", "TCGA-HNSC", True, (), "[]", 0, 0, 0, "s"),
                                      2: SiteInfo(2, "a", "c", False, (), "[]", 0, 0, 0, "s")})
    text = write_summary(tmp_path, settings, strategy, [_record(1), _record(3)], seconds=2.0).read_text()
    assert "2 sites, 3 rounds, server optimiser `fedyogi`, 1 local epoch(s) per round, seed 5" in text
    assert "| a | real | 30 | 8 | 3 | 0.6200 | 0.7200 |" in text
    assert "| b | simulated | 30 | 12 | 5 | 0.6100 | 0.7100 |" in text
    assert "| **mean of sites** | | | | | 0.6150 | 0.7150 |" in text
    assert "| **pooled (all test patients)** | | 60 | 20 | 8 | 0.6300 | 0.7300 |" in text
    assert "within each site (stratified, from the same counts): 0.6400." in text
    assert "Pooled Uno's C: 0.6500; log-rank p between pooled risk groups: 0.012; hazard ratio high vs low " \
           "risk: 1.7500 (95 % CI 1.1000–2.9000)." in text
    head = text.split("## Round")[0]  # the simulated-data note names the simulated site b, not a
    assert "**Simulated data:** b — real labels and folds" in head and "a —" not in head
