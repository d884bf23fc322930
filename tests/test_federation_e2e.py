"""End-to-end federated runs of the real ServerApp and ClientApp, in-process (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from client.client_app import app as client_app
from server.server_app import app as server_app
from server.strategy import FederationError
from simulations.local_grid import run_local
from sites.synthetic import write_synthetic_site
from federation_fixtures import SMALL_MODEL_OVERRIDES as SMALL


@pytest.fixture(scope="module")
def sites_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fed-sites")
    write_synthetic_site(root, "alpha", 40, modalities=(("ct", "sequence", 10), ("slide", "vector", 6)), seed=1)
    write_synthetic_site(root, "beta", 36, modalities=(("slide", "vector", 6), ("lab", "tabular", 4)), seed=2)
    write_synthetic_site(root, "gamma", 30, modalities=(("lab", "tabular", 4),), seed=3)
    return root


def _run(sites_dir: Path, results: Path, name: str, rounds: int, *, sites="alpha,beta,gamma", fail=None,
         nodes: dict[int, dict] | None = None, **extra):
    """``nodes``: extra node config of node i (partition-id i)."""
    n = len(sites.split(","))
    cfg = {"sites": sites, "sites-dir": str(sites_dir), "results-dir": str(results), "run-name": name,
           "num-server-rounds": rounds, "local-epochs": 1, "seed": 0, "min-sites": 2,
           "model-overrides": SMALL, "node-wait-timeout": 2.0, "eval-time-bins": 64, "eval-risk-bins": 64,
           **extra}
    return run_local(server_app, client_app, [{"partition-id": i, **(nodes or {}).get(i, {})} for i in range(n)],
                     run_config_overrides=cfg, fail_nodes=fail)


def test_three_sites_two_rounds_write_every_output(sites_dir, tmp_path):
    _, grid = _run(sites_dir, tmp_path, "r", 2)
    run = tmp_path / "r"
    for f in ("config.json", "rounds.json", "metrics_per_round.csv", "pooled/round_001.json",
              "pooled/round_002.json", "checkpoint.pt", "final_model.pt", "final_model_spec.json",
              "km_final.png", "cindex_per_round.png", "summary.md"):
        assert (run / f).exists() and (run / f).stat().st_size > 0, f
    rounds = json.loads((run / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2]
    last = rounds[-1]
    assert set(last["sites"]) == {"alpha", "beta", "gamma"}
    # the union model: every site's modalities; gamma lacks ct and slide entirely
    cfg = json.loads((run / "config.json").read_text())
    assert [m["name"] for m in json.loads(cfg["model_spec"])] == ["ct", "slide", "lab"]
    assert last["group_weights"]["encoder/ct"]["gamma"] == 0
    assert last["group_weights"]["missing/ct"]["gamma"] == last["sites"]["gamma"]["n_train"]
    assert last["group_weights"]["missing-input/ct"]["gamma"] == 0  # a constant where ct is never collected
    pooled = last["pooled"]
    assert pooled["n"] == sum(s["n_test"] for s in last["sites"].values())
    assert 0.0 <= pooled["cindex_harrell"] <= 1.0
    assert 0.0 <= pooled["cindex_harrell_within_sites"] <= 1.0
    csv = (run / "metrics_per_round.csv").read_text()
    assert "pooled" in csv and "mean-of-sites" in csv
    # patient-level data never leaves a client: the upload is parameters + counts only
    train_up = [b for (node, kind), bs in grid.bytes_up.items() if kind == "train" for b in bs]
    state = torch.load(run / "final_model.pt")
    n_param_bytes = sum(v.numel() * v.element_size() for v in state.values())
    # raw bytes + Flower's ~180 B framing per array + the counts; the 1.05x target on the real
    # model is measured by simulations/bench_federation.py
    assert max(train_up) < n_param_bytes + 200 * len(state) + 4096


def test_a_model_without_status_head_is_still_evaluated_at_every_site(sites_dir, tmp_path, caplog):
    _run(sites_dir, tmp_path, "nostatus", 1, **{"model-overrides": SMALL + "; model.status_head=false"})
    assert "failed in" not in caplog.text
    last = json.loads((tmp_path / "nostatus" / "rounds.json").read_text())[-1]
    assert last["pooled"]["n"] == sum(s["n_test"] for s in last["sites"].values())  # every site's counts
    assert last["pooled"]["auc_status"] is None and 0.0 <= last["pooled"]["cindex_harrell"] <= 1.0


def test_resume_ends_with_the_same_model_as_an_uninterrupted_run(sites_dir, tmp_path):
    _run(sites_dir, tmp_path, "whole", 3, **{"server-optimizer": "fedadam"})
    _run(sites_dir, tmp_path, "parts", 2, **{"server-optimizer": "fedadam"})
    _run(sites_dir, tmp_path, "parts", 3, resume=True, **{"server-optimizer": "fedadam"})
    a = torch.load(tmp_path / "whole" / "final_model.pt")
    b = torch.load(tmp_path / "parts" / "final_model.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    hist = json.loads((tmp_path / "parts" / "rounds.json").read_text())
    assert [r["round"] for r in hist] == [1, 2, 3]


def test_a_crashing_site_is_logged_and_the_run_goes_on(sites_dir, tmp_path, caplog):
    crash_in_train = lambda msg: msg.metadata.message_type == "train"  # noqa: E731
    _run(sites_dir, tmp_path, "crash", 1, fail={1: crash_in_train})
    assert "site beta failed in train round 1" in caplog.text
    rounds = json.loads((tmp_path / "crash" / "rounds.json").read_text())
    assert "n_train" not in rounds[0]["sites"]["beta"]  # left out of training, still evaluated


def test_below_min_sites_the_run_fails_with_a_message(sites_dir, tmp_path):
    crash = lambda msg: msg.metadata.message_type == "train"  # noqa: E731
    with pytest.raises(FederationError, match="below min-sites=3"):
        _run(sites_dir, tmp_path, "fail", 1, fail={0: crash}, **{"min-sites": 3})


def test_an_invalid_site_is_reported_by_name_and_left_out(sites_dir, tmp_path, caplog):
    broken = tmp_path / "broken-sites"
    broken.mkdir()
    for name in ("alpha", "beta", "gamma"):
        (broken / name).symlink_to(sites_dir / name, target_is_directory=True)
    bad = write_synthetic_site(broken, "delta", 20, modalities=(("lab", "tabular", 4),), seed=4)
    csv = bad / "patients.csv"
    csv.write_text(csv.read_text().replace("\n", "\n", 1).replace(",0,", ",7,", 1))  # event = 7
    _run(broken, tmp_path, "inv", 1, sites="alpha,beta,gamma,delta")
    assert "failed in handshake" in caplog.text and "delta" in caplog.text
    # what reaches the server names the site, the count and the file, never a patient, line or value
    server_side = [r.getMessage() for r in caplog.records if r.name.startswith("oncofed.server")
                   and "failed in handshake" in r.getMessage()]
    assert len(server_side) == 1 and "site folder 'delta' is not valid (1 problem in patients.csv)" in server_side[0]
    assert "P0000" not in server_side[0] and "line" not in server_side[0] and "'7'" not in server_side[0]
    node_side = [r.getMessage() for r in caplog.records if r.name == "client.site_context"]
    assert any("patients.csv, line" in t and "patient " in t for t in node_side)  # details: node's log only
    rounds = json.loads((tmp_path / "inv" / "rounds.json").read_text())
    assert set(rounds[0]["sites"]) == {"alpha", "beta", "gamma"}


def test_too_few_nodes_fails_instead_of_hanging(sites_dir, tmp_path):
    with pytest.raises(FederationError, match="num-supernodes=3"):
        run_local(server_app, client_app, [{"partition-id": 0}],
                  run_config_overrides={"sites": "alpha,beta,gamma", "sites-dir": str(sites_dir),
                                        "results-dir": str(tmp_path), "min-sites": 2,
                                        "node-wait-timeout": 0.5, "model-overrides": SMALL})


def test_a_node_may_choose_its_own_input_standardisation(sites_dir, tmp_path):
    from client.site_context import embedding_standardisation
    from shared_model.runconfig import settings_from_run_config

    settings = settings_from_run_config({"sites": "alpha", "min-sites": 1, "sites-dir": str(sites_dir)})
    assert embedding_standardisation({}, settings) == "per_dimension"
    assert embedding_standardisation({"standardize-embeddings": "none"}, settings) == "none"
    with pytest.raises(ValueError, match="standardize-embeddings='z'"):
        embedding_standardisation({"standardize-embeddings": "z"}, settings)

    def final(name, node0):
        cfg = {"sites": "alpha,beta", "sites-dir": str(sites_dir), "results-dir": str(tmp_path), "run-name": name,
               "num-server-rounds": 1, "local-epochs": 1, "seed": 0, "min-sites": 2, "model-overrides": SMALL,
               "node-wait-timeout": 2.0, "eval-time-bins": 64, "eval-risk-bins": 64}
        run_local(server_app, client_app, [{"partition-id": 0, **node0}, {"partition-id": 1}], run_config_overrides=cfg)
        return torch.load(tmp_path / name / "final_model.pt")

    default, raw = final("default", {}), final("raw", {"standardize-embeddings": "none"})
    assert any(not torch.equal(default[k], raw[k]) for k in default)  # alpha trained on raw embeddings


def test_a_site_below_its_eval_min_patients_sends_no_evaluation(sites_dir, tmp_path, caplog):
    _run(sites_dir, tmp_path, "few", 1, nodes={2: {"eval-min-patients": 1000}})
    assert "site gamma failed in evaluate round 1" in caplog.text and "eval-min-patients=1000" in caplog.text
    last = json.loads((tmp_path / "few" / "rounds.json").read_text())[-1]
    assert "n_train" in last["sites"]["gamma"] and "n_test" not in last["sites"]["gamma"]  # trained only
    assert last["pooled"]["n"] == last["sites"]["alpha"]["n_test"] + last["sites"]["beta"]["n_test"]


def test_a_site_refuses_a_grid_finer_than_its_node_config_allows(sites_dir, tmp_path, caplog):
    _run(sites_dir, tmp_path, "fine", 1, nodes={0: {"eval-max-score-bins": 32}})  # the run's grid has 64
    assert "site alpha failed in evaluate (counts) round 1" in caplog.text
    assert "64 risk bins, above this site's maximum of 32" in caplog.text
    last = json.loads((tmp_path / "fine" / "rounds.json").read_text())[-1]
    assert last["pooled"]["n"] == last["sites"]["beta"]["n_test"] + last["sites"]["gamma"]["n_test"]


def test_resume_refuses_another_split_and_a_new_run_refuses_a_used_folder(sites_dir, tmp_path):
    _run(sites_dir, tmp_path, "rs", 1)
    with pytest.raises(FederationError, match="already holds a run; choose another run-name"):
        _run(sites_dir, tmp_path, "rs", 2)
    with pytest.raises(FederationError, match="split: checkpoint 'default', now 'fold_cv=1'"):
        _run(sites_dir, tmp_path, "rs", 2, resume=True, split="fold_cv=1")
    assert [r["round"] for r in json.loads((tmp_path / "rs" / "rounds.json").read_text())] == [1]
    # a refused resume leaves the finished run as it was, DONE included
    assert json.loads((tmp_path / "rs" / "DONE").read_text()) == {"round": 1}
    refuse_all = {i: {"eval-min-patients": 1000} for i in range(3)}  # node config: not a run setting
    with pytest.raises(FederationError, match="only 0 site"):
        _run(sites_dir, tmp_path, "rs", 2, resume=True, nodes=refuse_all)  # accepted, then fails in round 2
    assert not (tmp_path / "rs" / "DONE").exists()  # an accepted resume is not done until it ends again
    _run(sites_dir, tmp_path, "rs", 2, resume=True)  # the same settings continue
    assert [r["round"] for r in json.loads((tmp_path / "rs" / "rounds.json").read_text())] == [1, 2]
    assert json.loads((tmp_path / "rs" / "DONE").read_text()) == {"round": 2}


def test_a_per_patient_file_reaches_the_server_only_as_its_folder(tmp_path):
    from client.site_context import SiteFolderInvalid, load_site_cached

    site = write_synthetic_site(tmp_path, "delta", 20, modalities=(("ct", "sequence", 10),), seed=4)
    bad = sorted((site / "ct").glob("*.npy"))[0]
    bad.write_bytes(b"not an npy file")
    with pytest.raises(SiteFolderInvalid) as err:
        load_site_cached(site)
    assert "(1 problem in ct/)" in str(err.value) and bad.stem not in str(err.value)


def test_the_audit_reproduces_each_clients_predictions(sites_dir, tmp_path):
    """audit_run recomputes the clients' predictions centrally: with folder names that differ from
    the site.yaml names and a node that feeds its embeddings raw (node config), its per-site C
    must equal the C each client computed and sent."""
    from simulations.audit_run import audit

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for name in ("alpha", "beta"):
        (renamed / f"hosp-{name}").symlink_to(sites_dir / name, target_is_directory=True)
    _run(renamed, tmp_path, "aud", 1, sites="hosp-alpha,hosp-beta", nodes={0: {"standardize-embeddings": "none"}})
    a = audit(tmp_path / "aud")
    assert set(a["sites"]) == {"alpha", "beta"}
    for name, c in a["sites"].items():
        assert c == pytest.approx(a["exact_sites"][name], abs=1e-12), name
    # and the server's pooled C from the counts matches the exact pooled C on those predictions
    assert abs(a["pooled"]["cindex_harrell"] - a["exact"]["cindex_harrell"]) <= a["pooled"]["cindex_harrell_max_error"]


def test_every_reply_holds_only_parameters_and_aggregate_statistics(sites_dir, tmp_path):
    """What leaves a client, reply by reply (README "What leaves a hospital"): the model's arrays,
    allow-listed counts and scalars, pass-1 moments of length 3, and the pass-2 count table —
    never a per-patient list."""
    import re

    _, grid = _run(sites_dir, tmp_path, "leak", 1)
    state_keys = set(torch.load(tmp_path / "leak" / "final_model.pt"))
    train_keys = re.compile(r"num-examples|n-(has|lacks|token|input-token):\w+|n-status|n-incomplete|"
                            r"train-loss|train-seconds|torch-threads")
    eval_keys = re.compile(r"num-examples|n-events|n-status|cindex|cindex-uno|td-auc-\d+d|auc")
    count_keys = {f"{t}_{k}" for t in ("surv", "status") for k in ("index", "count")} | {"meta", "num-examples"}
    describe_keys = {"site", "cohort", "simulated", "tasks", "modalities", "n-patients", "n-train", "n-test",
                     "split", "standardize-embeddings"}
    kinds = set()
    for _, kind, reply in grid.replies:
        assert not reply.has_error(), kind
        kinds.add(kind)
        content = reply.content
        if kind == "query":
            assert set(content["site"]) == describe_keys
            continue
        assert set(content["site"]) == {"site"}
        metrics = dict(content["metrics"])
        if kind == "train":
            assert set(content["arrays"]) == state_keys
            assert all(train_keys.fullmatch(k) and isinstance(v, (int, float)) for k, v in metrics.items()), metrics
        elif kind == "evaluate":
            moments = {k: v for k, v in metrics.items() if k.startswith("moments-")}
            assert set(moments) == {"moments-risk", "moments-status"} and all(len(v) == 3 for v in moments.values())
            rest = {k: v for k, v in metrics.items() if k not in moments}
            assert all(eval_keys.fullmatch(k) and isinstance(v, (int, float)) for k, v in rest.items()), rest
        else:
            assert kind == "evaluate.counts" and set(metrics) <= count_keys, metrics
    assert kinds == {"query", "train", "evaluate", "evaluate.counts"}
