"""What one node agrees to send (fourth review round, mutation testing of client/): the real ClientApp
on one synthetic site, driven message by message through simulations.local_grid (no federation),
and client.site_context's node-config readers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from client.client_app import app as client_app
from client.site_context import EvaluationLimits, evaluation_limits, load_site_cached, site_path
from shared_model import pooled_eval as P
from shared_model.model import build_model
from shared_model.runconfig import settings_from_run_config
from shared_model.specs import specs_to_json
from simulations.local_grid import LocalGrid
from sites import load_site
from sites.synthetic import write_synthetic_site
from federation_fixtures import SMALL_MODEL_OVERRIDES as SMALL


class Node:
    """One node serving a synthetic site; ``send(kind, round, **content)`` returns its reply."""

    def __init__(self, root: Path, node_config: dict | None = None, unlabel_test_but: int | None = None):
        self.path = write_synthetic_site(root, "s", 30, modalities=(("lab", "tabular", 4),), seed=1)
        if unlabel_test_but is not None:  # status -1 (unlabelled) for all held-out patients but the first k
            lines = (self.path / "patients.csv").read_text().splitlines()
            seen, out = 0, [lines[0]]
            for line in lines[1:]:
                cells = line.split(",")
                if cells[-1] == "test":
                    seen += 1
                    if seen > unlabel_test_but:
                        cells[3] = "-1"
                out.append(",".join(cells))
            (self.path / "patients.csv").write_text("\n".join(out) + "\n")
        self.rc = {"sites": "s", "sites-dir": str(root), "min-sites": 1, "model-overrides": SMALL, "seed": 0}
        settings = settings_from_run_config(self.rc)
        site = load_site(self.path)
        self.n_test = int((site.resolve_split(settings.split).test).size)
        self.spec = specs_to_json(site.spec.modalities)
        model = build_model(site.spec.modalities, settings.config.model, seed=0)
        self.arrays = ArrayRecord({k: Array(v.detach().cpu().numpy().copy()) for k, v in model.state_dict().items()})
        self.grid = LocalGrid(client_app, [{"site-dir": str(self.path), **(node_config or {})}], self.rc)

    def send(self, kind: str, server_round: int = 1, **content) -> Message:
        cfg = ConfigRecord({"server-round": server_round, "model-spec": self.spec, "local-epochs": 1})
        body = {"config": cfg, **content}
        if kind in ("train", "evaluate"):
            body["arrays"] = self.arrays
        (reply,) = self.grid.send_and_receive([Message(RecordDict(body), dst_node_id=1000, message_type=kind)])
        return reply

    def grid_record(self, risk_moments, status_moments=None) -> ConfigRecord:
        g = P.make_grid(np.asarray(risk_moments, float),
                        None if status_moments is None else np.asarray(status_moments, float),
                        n_time_bins=64, n_risk_bins=64)
        return ConfigRecord(g.to_record())


@pytest.mark.parametrize("delta, ok", [(0, True), (1, False)])
def test_eval_min_patients_is_the_least_number_that_is_evaluated(tmp_path, delta, ok):
    """A site with exactly eval-min-patients held-out patients evaluates; one more refuses."""
    probe = Node(tmp_path / "probe")
    node = Node(tmp_path / "n", {"eval-min-patients": probe.n_test + delta})
    reply = node.send("evaluate")
    assert reply.has_error() is (not ok)
    if not ok:
        assert f"eval-min-patients={probe.n_test + 1}" in reply.error.reason


def test_counts_come_only_from_this_rounds_predictions(tmp_path):
    node = Node(tmp_path)
    met = dict(node.send("evaluate", 1).content["metrics"])
    assert met["num-examples"] == node.n_test and met["moments-risk"][0] == node.n_test
    grid = node.grid_record(met["moments-risk"], met["moments-status"])
    stale = node.send("evaluate.counts", 2, grid=grid)
    assert stale.has_error() and "no predictions cached for round 2" in stale.error.reason
    fresh = node.send("evaluate.counts", 1, grid=grid)
    assert not fresh.has_error() and fresh.content["metrics"]["num-examples"] == node.n_test


def test_pass_1_counts_the_held_out_events(tmp_path):
    node = Node(tmp_path)
    site = load_site(node.path)
    test = site.resolve_split(settings_from_run_config(node.rc).split).test
    assert dict(node.send("evaluate").content["metrics"])["n-events"] == int(site.event[test].sum()) < node.n_test


def test_a_site_with_a_modality_the_model_lacks_refuses(tmp_path):
    node = Node(tmp_path)
    node.spec = specs_to_json([])
    reply = node.send("evaluate")
    assert reply.has_error() and "modalities ['lab'] are not in the federation's model" in reply.error.reason


def test_the_handshake_declares_the_held_out_count(tmp_path):
    node = Node(tmp_path)
    site = dict(node.send("query").content["site"])
    assert (site["n-test"], site["n-train"], site["n-patients"]) == (node.n_test, 30 - node.n_test, 30)


@pytest.mark.parametrize("labelled", [1, 2, 3])
def test_status_statistics_never_reveal_one_or_two_patients_scores(tmp_path, labelled):
    """eval-min-patients (3) also bounds the status-labelled held-out patients: with 1 or 2 of them
    the status moments [n, s, s^2] (and the AUC) would be their scores, so the site sends none
    (n-status 0, no status counts in pass 2) and still sends its survival statistics."""
    node = Node(tmp_path, unlabel_test_but=labelled)
    reply = node.send("evaluate")
    assert not reply.has_error()
    met = dict(reply.content["metrics"])
    assert met["moments-risk"][0] == node.n_test  # survival statistics as usual
    sent = labelled >= EvaluationLimits().min_patients
    assert met["moments-status"][0] == (labelled if sent else 0) and met["n-status"] == (labelled if sent else 0)
    if not sent:
        assert met["moments-status"] == [0.0, 0.0, 0.0] and "auc" not in met
    status_moments = met["moments-status"] if sent else [3.0, 0.0, 3.0]  # another site's, for the grid
    counts = node.send("evaluate.counts", 1, grid=node.grid_record(met["moments-risk"], status_moments))
    n_status_counted = sum(dict(counts.content["metrics"]).get("status_count", []))
    assert n_status_counted == (labelled if sent else 0)


# ----------------------------------------------------------------------------- site_context
def test_evaluation_limits_read_every_key_and_default_to_the_documented_values():
    assert evaluation_limits({}) == EvaluationLimits(3, 7.0, 2048, 1024)
    assert evaluation_limits({"eval-min-patients": 5, "eval-min-time-bin-days": 14.0, "eval-max-time-bins": 100,
                              "eval-max-score-bins": 50}) == EvaluationLimits(5, 14.0, 100, 50)
    assert evaluation_limits({"eval-min-patients": 1, "eval-max-time-bins": 1, "eval-max-score-bins": 2,
                              "eval-min-time-bin-days": 0.0}) == EvaluationLimits(1, 0.0, 1, 2)


@pytest.mark.parametrize("cfg", [{"eval-min-patients": 0}, {"eval-max-time-bins": 0}, {"eval-max-score-bins": 1},
                                 {"eval-min-time-bin-days": -1.0}, {"eval-min-time-bin-days": math.inf},
                                 {"eval-min-time-bin-days": math.nan}, {"eval-min-patients": "many"}])
def test_evaluation_limits_out_of_range_are_refused(cfg):
    with pytest.raises(ValueError, match="node config eval-"):
        evaluation_limits(cfg)


def test_site_path_precedence_and_partition_bounds(tmp_path):
    s = settings_from_run_config({"sites": "a,b", "min-sites": 1, "sites-dir": str(tmp_path)})
    assert site_path({"site-dir": "/x/y", "site": "a", "partition-id": 1}, s) == Path("/x/y")
    assert site_path({"site": "a", "partition-id": 1}, s) == tmp_path / "a"
    assert site_path({"partition-id": 1}, s) == tmp_path / "b"
    with pytest.raises(ValueError, match="partition-id 2 but the run config lists only 2 sites"):
        site_path({"partition-id": 2}, s)
    with pytest.raises(ValueError, match="this node has no site"):
        site_path({}, s)


def test_a_changed_site_yaml_is_read_again(tmp_path):
    import os

    path = write_synthetic_site(tmp_path, "s", 20, modalities=(("lab", "tabular", 4),), seed=1)
    assert load_site_cached(path).spec.cohort == "synthetic"
    yaml_file = path / "site.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("cohort: synthetic", "cohort: renamed"))
    st = yaml_file.stat()
    os.utime(yaml_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert load_site_cached(path).spec.cohort == "renamed"
