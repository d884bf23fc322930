"""Guarantees of the drivers (main job, compare, audit, sites CLI, in-process grid) that no other
test pinned (review by mutation testing). Fast: the main job's ``flwr`` is a stand-in process, the
sites are tiny synthetic ones."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

import simulations.main_job as mj
from sites.synthetic import write_synthetic_site


# ---------------------------------------------------------------- main job (simulations/main_job.py)

def _small_site(root: Path, name: str) -> Path:
    return write_synthetic_site(root, name, 20, modalities=(("lab", "tabular", 3),), seed=1, n_folds=2)


class FakeFlower:
    """Stands in for the ``flwr`` CLI: ``flwr run`` is a real child process running ``script``;
    ``flwr ls`` is answered by ``status``; ``flwr stop`` is recorded."""

    def __init__(self, monkeypatch, script: str, status: str = "finished:completed",
                 pids: tuple[set, set] = ({11}, {11, 12})):
        self.script, self.status = script, status
        self.commands: list[list[str]] = []
        self.envs: list[dict] = []
        self.procs: list[subprocess.Popen] = []
        self.stopped: list[set] = []
        self._pids = list(pids)
        ns = types.SimpleNamespace(Popen=self.popen, run=self.run, TimeoutExpired=subprocess.TimeoutExpired,
                                   PIPE=subprocess.PIPE, STDOUT=subprocess.STDOUT)
        monkeypatch.setattr(mj, "subprocess", ns)
        monkeypatch.setattr(mj, "_superlink_pids", self.superlink_pids)
        monkeypatch.setattr(mj, "stop_processes", lambda pids: self.stopped.append(set(pids)))
        monkeypatch.setattr(mj, "run_status", self.run_status)

    def superlink_pids(self, home):
        return set(self._pids.pop(0) if len(self._pids) > 1 else self._pids[0])

    def popen(self, cmd, **kw):
        self.commands.append(list(cmd))
        self.envs.append(dict(kw["env"]))
        proc = subprocess.Popen([sys.executable, "-c", self.script], **kw)
        self.procs.append(proc)
        return proc

    def run(self, cmd, **kw):
        self.commands.append(list(cmd))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    def run_status(self, run_id, env, cwd):
        self.commands.append(["flwr", "ls", "--run-id", run_id])
        return {"status": self.status, "status-details": "details"}

    def cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def two_small_sites(tmp_path: Path) -> Path:
    root = tmp_path / "sites"
    _small_site(root, "a")
    _small_site(root, "b")
    return root


def _main_args(tmp_path: Path, sites_dir: Path, *extra: str) -> list[str]:
    return ["--sites-dir", str(sites_dir), "--sites", "a,b", "--flwr-home", str(tmp_path / "flwr"),
            "--results-dir", str(tmp_path / "results"), "--run-name", "r1", *extra]


def _started_script(results: Path, *, done: bool = True, sleep: float = 0.0) -> str:
    done_line = f"p = pathlib.Path({str(results / 'r1')!r}); p.mkdir(parents=True, exist_ok=True); " \
                f"(p / 'DONE').write_text('')\n" if done else ""
    return ("import pathlib, sys, time\nprint('Successfully started run 4242', flush=True)\n" + done_line +
            f"time.sleep({sleep})\n")


def test_main_job_exits_0_only_for_a_completed_run_with_its_results_folder(tmp_path, two_small_sites,
                                                                         monkeypatch, capsys):
    """The success path: flwr is started with one SuperNode per site, this command's sites and Flower
    home; the SuperLink this command started (only that one) is stopped; exit 0."""
    fake = FakeFlower(monkeypatch, _started_script(tmp_path / "results"))
    try:
        rc = mj.main(_main_args(tmp_path, two_small_sites))
    finally:
        fake.cleanup()
    assert rc == 0, capsys.readouterr().out
    run = fake.commands[0]
    assert run[:2] == ["flwr", "run"]
    assert run[run.index("--federation-config") + 1].startswith("num-supernodes=2 ")
    assert 'sites="a,b"' in run[run.index("--run-config") + 1]
    assert fake.envs[0]["FLWR_HOME"] == str((tmp_path / "flwr").resolve())
    assert ["flwr", "ls", "--run-id", "4242"] in fake.commands
    assert fake.stopped == [{12}]  # started by this run; 11 was there before and is left alone
    assert f"results folder: {tmp_path / 'results' / 'r1'}" in capsys.readouterr().out


def test_main_job_keep_superlink_stops_nothing(tmp_path, two_small_sites, monkeypatch):
    fake = FakeFlower(monkeypatch, _started_script(tmp_path / "results"))
    try:
        assert mj.main(_main_args(tmp_path, two_small_sites, "--keep-superlink")) == 0
    finally:
        fake.cleanup()
    assert fake.stopped == []


@pytest.mark.parametrize("status, done", [("finished:failed", True), ("finished:stopped", True),
                                          ("unknown", True), ("finished:completed", False)])
def test_main_job_exits_1_unless_completed_and_done(tmp_path, two_small_sites, monkeypatch, capsys, status, done):
    """flwr run exits 0 even when the run failed: the exit status comes from flwr ls and DONE."""
    fake = FakeFlower(monkeypatch, _started_script(tmp_path / "results", done=done), status=status)
    try:
        rc = mj.main(_main_args(tmp_path, two_small_sites))
    finally:
        fake.cleanup()
    assert rc == 1
    assert "did not complete" in capsys.readouterr().out
    assert fake.stopped == [{12}]


def test_main_job_exits_1_when_flwr_started_no_run(tmp_path, two_small_sites, monkeypatch, capsys):
    fake = FakeFlower(monkeypatch, "print('error: could not connect', flush=True)\n")
    try:
        rc = mj.main(_main_args(tmp_path, two_small_sites))
    finally:
        fake.cleanup()
    assert rc == 1 and "did not start a run" in capsys.readouterr().out
    assert fake.stopped == [{12}]


def test_main_job_timeout_kills_flwr_stops_the_run_and_exits_1(tmp_path, two_small_sites, monkeypatch, capsys):
    """Past --timeout (even while flwr is silent) the flwr process is killed, the run is stopped
    with ``flwr stop``, the SuperLink it started is stopped and the exit status is 1."""
    fake = FakeFlower(monkeypatch, _started_script(tmp_path / "results", done=True, sleep=20))
    t0 = time.perf_counter()
    try:
        rc = mj.main(_main_args(tmp_path, two_small_sites, "--timeout", "1.5"))
        proc = fake.procs[0]
        time.sleep(0.3)
        alive = proc.poll() is None
    finally:
        fake.cleanup()
    assert time.perf_counter() - t0 < 10
    assert rc == 1 and "run stopped after" in capsys.readouterr().out
    assert not alive, "flwr run left running after the timeout"
    assert ["flwr", "stop", "4242"] in fake.commands
    assert fake.stopped == [{12}]


@pytest.mark.parametrize("sites, message", [(",", "--sites names no site"), ("", "--sites names no site"),
                                            ("a,b,a", "--sites names a more than once")])
def test_main_job_refuses_no_site_or_a_site_twice_before_flwr_starts(tmp_path, two_small_sites, monkeypatch, capsys,
                                                                   sites, message):
    """A federation of 0 SuperNodes, or one site as two SuperNodes, is a usage error (exit 2), found
    before any site is built or flwr is launched, even with a sites folder that does not exist."""
    fake = FakeFlower(monkeypatch, _started_script(tmp_path / "results"))
    args = _main_args(tmp_path, tmp_path / "no-such-folder")
    args[args.index("--sites") + 1] = sites
    try:
        with pytest.raises(SystemExit) as exit_:
            mj.main(args)
    finally:
        fake.cleanup()
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert fake.commands == [] and not (tmp_path / "no-such-folder").exists()


def test_run_status_of_unreadable_flwr_ls_output_is_unknown(monkeypatch):
    answers = iter(["not json at all", '{"runs": []}', '{"runs": [{"status": "finished:completed"}]}'])
    ns = types.SimpleNamespace(run=lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, next(answers), "err"))
    monkeypatch.setattr(mj, "subprocess", ns)
    assert mj.run_status("1", {}, Path("."))["status"] == "unknown"
    assert mj.run_status("1", {}, Path("."))["status"] == "unknown"
    assert mj.run_status("1", {}, Path("."))["status"] == "finished:completed"


def test_ensure_sites_validates_and_builds_only_missing_builtin_sites(tmp_path, monkeypatch):
    import sites
    import sites.builtin

    built = []
    monkeypatch.setattr(sites.builtin, "build_all", lambda d: built.append(d))
    # a folder name that is not built-in is never built: it is reported invalid
    with pytest.raises(SystemExit, match="site validation failed"):
        mj.ensure_sites(tmp_path, ("mine",))
    assert built == []
    # one built-in site present, another missing: the built-in sites are built
    (tmp_path / "hancock").mkdir()
    (tmp_path / "hancock" / "site.yaml").write_text("name: hancock\n")
    monkeypatch.setattr(sites, "validate_site", lambda p: [])
    mj.ensure_sites(tmp_path, ("hancock", "cptac-pda"))
    assert built == [tmp_path]


def test_ensure_sites_refuses_an_invalid_site(tmp_path):
    site = _small_site(tmp_path, "a")
    csv = site / "patients.csv"
    lines = csv.read_text().splitlines()
    cells = lines[1].split(",")
    cells[1] = "-5"  # a negative survival time
    csv.write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    with pytest.raises(SystemExit, match="site validation failed"):
        mj.ensure_sites(tmp_path, ("a",))


# ---------------------------------------------------------------- oncofed sites (sites/cli.py)

def test_sites_validate_exits_1_when_any_folder_is_invalid_even_if_a_later_one_is_valid(tmp_path, capsys):
    from simulations.cli import main

    good = _small_site(tmp_path, "good")
    bad = _small_site(tmp_path, "bad")
    (bad / "patients.csv").write_text((bad / "patients.csv").read_text().replace("patient_id", "pid", 1))
    assert main(["sites", "validate", str(bad), str(good)]) == 1
    out = capsys.readouterr().out
    assert f"INVALID {bad}" in out and f"OK {good}" in out


def test_sites_build_passes_seed_and_missingness_and_builds_every_site_with_all(tmp_path, monkeypatch, capsys):
    import sites.cli as scli
    from sites.builtin import BUILTIN_SITES

    calls = []
    monkeypatch.setattr(scli, "build_site", lambda name, out, **kw: calls.append((name, str(out), kw)) or out)
    assert scli.main(["build", "cptac-ucec", "hancock", str(tmp_path), "--seed", "3", "--missing", "none"]) == 0
    assert calls == [("cptac-ucec", str(tmp_path), {"seed": 3, "missing": "none"}),
                     ("hancock", str(tmp_path), {"seed": 3, "missing": "none"})]
    calls.clear()
    assert scli.main(["build", "--all", str(tmp_path)]) == 0
    assert [c[0] for c in calls] == list(BUILTIN_SITES) and all(c[2] == {"seed": 0, "missing": "default"}
                                                                 for c in calls)


def test_sites_summary_counts_positive_status_labels(tmp_path):
    from sites import load_site
    from sites.cli import summary_line

    site = load_site(_small_site(tmp_path, "a"))
    labelled, positive = int((site.status >= 0).sum()), int((site.status == 1).sum())
    assert positive != labelled  # the fixture has negative labels
    assert f"status labels {labelled} ({positive} positive)" in summary_line(site)


# ---------------------------------------------------------------- oncofed compare (simulations/compare.py)

CMP_SMALL = ("model.d_inter=8; model.d_token=8; model.hazard_hidden=8; model.dce_dim=8; model.tabular_hidden=8; "
             "model.n_heads=2; train.batch_size=8")


@pytest.fixture(scope="module")
def cmp_sites(tmp_path_factory) -> Path:
    """``one`` has folds 0-2, ``two`` folds 0-1: two folds are common to both."""
    root = tmp_path_factory.mktemp("cmp-sites")
    write_synthetic_site(root, "one", 24, modalities=(("lab", "tabular", 3),), seed=1, n_folds=3)
    write_synthetic_site(root, "two", 20, modalities=(("lab", "tabular", 3),), seed=2, n_folds=2)
    return root


def _fake_fold(k: int, c: float, loc: float, fed: float) -> dict:
    arm = lambda v: {"cindex": v, "cindex_pooled": v - 0.01, "cindex_mean_of_sites": v + 0.01,  # noqa: E731
                     "cindex_per_site": {}, "seconds": 0.0}
    return {"fold": k, "centralised": arm(c), "local": arm(loc),
            "federated": {**arm(fed), "cindex_pooled_from_counts": fed}}


@pytest.fixture
def stub_folds(monkeypatch):
    """compare_fold replaced by fixed numbers: run_compare's own bookkeeping only."""
    import simulations.compare as cmp

    called = []
    numbers = {0: (0.6, 0.5, 0.7), 1: (0.8, 0.55, 0.75), 2: (0.7, 0.7, 0.7)}

    def fake(sites, paths, column, k, **kw):
        called.append((column, k, kw))
        return _fake_fold(k, *numbers[k])

    monkeypatch.setattr(cmp, "compare_fold", fake)
    return called


def test_compare_runs_the_folds_every_site_has_and_caps_them_at_max_folds(cmp_sites, tmp_path, stub_folds):
    from simulations.compare import run_compare

    paths = [cmp_sites / "one", cmp_sites / "two"]
    assert len(run_compare(paths, "fold_cv", log=lambda m: None)["folds"]) == 2
    assert [k for _, k, _ in stub_folds] == [0, 1]
    assert len(run_compare(paths, "fold_cv", max_folds=5, log=lambda m: None)["folds"]) == 2
    assert len(run_compare(paths, "fold_cv", max_folds=1, log=lambda m: None)["folds"]) == 1


def test_compare_table_is_mean_and_population_std_and_the_difference_is_federated_minus_centralised(
        cmp_sites, tmp_path, stub_folds):
    import json

    from simulations.compare import run_compare

    out = tmp_path / "out"
    res = run_compare([cmp_sites / "one", cmp_sites / "two"], "fold_cv", out_dir=out, log=lambda m: None)
    assert res["table"]["centralised"]["cindex"] == pytest.approx((0.7, 0.1))  # ddof 0
    assert res["table"]["local"]["cindex"] == pytest.approx((0.525, 0.025))
    assert res["table"]["federated"]["cindex_pooled"] == pytest.approx((0.715, 0.025))
    md = (out / "compare.md").read_text()
    assert "Federated − centralised (within-site C): +0.025 (per fold: +0.100, -0.050)" in md
    assert "| centralised | 0.700 ± 0.100 | 0.690 ± 0.100 | 0.710 ± 0.100 |" in md
    assert "**Simulated data:**" in md  # the synthetic sites are marked simulated
    assert json.loads((out / "compare.json").read_text()) == json.loads(json.dumps(res, default=float))


def test_compare_refuses_a_fold_missing_at_one_site_before_any_arm_trains(tmp_path, stub_folds):
    from sites_fixtures import edit_csv

    from simulations.compare import CompareArgumentError, run_compare

    write_synthetic_site(tmp_path, "one", 24, modalities=(("lab", "tabular", 3),), seed=1, n_folds=3)
    two = write_synthetic_site(tmp_path, "two", 24, modalities=(("lab", "tabular", 3),), seed=2, n_folds=3)

    def relabel(df):  # two's fold 2 is called 4: fold_cv=2 is not a fold of two
        df["fold_cv"] = df["fold_cv"].replace("2", "4")
        return df

    edit_csv(two / "patients.csv", relabel)
    with pytest.raises(CompareArgumentError, match="fold 2 not in column"):
        run_compare([tmp_path / "one", two], "fold_cv", out_dir=tmp_path / "out", log=lambda m: None)
    assert stub_folds == [] and not (tmp_path / "out").exists()


def test_compare_refuses_two_folders_holding_one_site(cmp_sites, tmp_path, stub_folds):
    import shutil

    from simulations.compare import run_compare

    shutil.copytree(cmp_sites / "one", tmp_path / "one-copy")
    with pytest.raises(ValueError, match="both named 'one'"):
        run_compare([cmp_sites / "one", tmp_path / "one-copy"], "fold_cv", log=lambda m: None)
    assert stub_folds == []


def test_compare_leaves_no_work_folder_and_no_half_written_results(cmp_sites, tmp_path, monkeypatch):
    import tempfile

    import simulations.compare as cmp

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))

    def fail_at_fold_1(sites, paths, column, k, **kw):
        if k == 1:
            raise RuntimeError("boom")
        return _fake_fold(k, 0.6, 0.5, 0.7)

    monkeypatch.setattr(cmp, "compare_fold", fail_at_fold_1)
    with pytest.raises(RuntimeError, match="boom"):
        cmp.run_compare([cmp_sites / "one", cmp_sites / "two"], "fold_cv", out_dir=tmp_path / "out",
                        log=lambda m: None)
    assert not (tmp_path / "out").exists() and list(tmp.iterdir()) == []
    monkeypatch.setattr(cmp, "compare_fold", lambda s, p, c, k, **kw: _fake_fold(k, 0.6, 0.5, 0.7))
    cmp.run_compare([cmp_sites / "one", cmp_sites / "two"], "fold_cv", out_dir=tmp_path / "out", log=lambda m: None)
    assert list(tmp.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["compare.json", "compare.md"]


def test_compare_arms_train_on_the_same_training_rows_with_equal_budgets_and_score_the_test_rows(
        cmp_sites, monkeypatch):
    """Two real folds, 2 rounds x 2 local epochs: every arm's inputs are fold k's training rows
    (standardisation included), every score is on fold k's test rows, centralised and local train
    rounds x local-epochs epochs with no early stopping, the federated arm runs fold k's split with
    the same rounds, local epochs and seed; the numbers reported are the C-indices of those predictions."""
    import json
    import types

    import simulations.compare as cmp
    from shared_model.metrics import site_cindices
    from sites import load_site

    sites = {n: load_site(cmp_sites / n) for n in ("one", "two")}
    log: dict = {"fold": None, "tensors": [], "predict": [], "train_on": [], "train_local": [], "fed": []}
    tensor_site: dict[int, str] = {}
    real = types.SimpleNamespace(fold=cmp.compare_fold, ft=cmp.SiteTensors.for_training, pr=cmp.predict_rows,
                                 to=cmp._train_on, tl=cmp.train_local, rl=cmp.run_local)

    def compare_fold(s, p, column, k, **kw):
        log["fold"] = k
        return real.fold(s, p, column, k, **kw)

    def for_training(site, specs, rows, standardise):
        t = real.ft(site, specs, rows, standardise)
        tensor_site[id(t)] = site.name
        log["tensors"].append((log["fold"], site.name, np.asarray(rows).copy()))
        return t

    def predict_rows(model, tensors, rows):
        out = real.pr(model, tensors, rows)
        log["predict"].append((log["fold"], tensor_site[id(tensors)], np.asarray(rows).copy(), out[0].copy()))
        return out

    def train_on(s, names, specs, train, cfg, epochs, seed):
        log["train_on"].append((log["fold"], list(names), epochs, seed))
        return real.to(s, names, specs, train, cfg, epochs, seed)

    def train_local(model, parts, cfg, **kw):
        log["train_local"].append(kw)
        return real.tl(model, parts, cfg, **kw)

    def run_local(server_app, client_app, node_configs, *, run_config_overrides, **kw):
        out = real.rl(server_app, client_app, node_configs, run_config_overrides=run_config_overrides, **kw)
        rc = run_config_overrides
        rounds = json.loads((Path(rc["results-dir"]) / rc["run-name"] / "rounds.json").read_text())
        log["fed"].append((log["fold"], dict(rc), rounds[-1]["pooled"]["cindex_harrell"], len(rounds)))
        return out

    monkeypatch.setattr(cmp, "compare_fold", compare_fold)
    monkeypatch.setattr(cmp, "SiteTensors", types.SimpleNamespace(for_training=for_training))
    monkeypatch.setattr(cmp, "predict_rows", predict_rows)
    monkeypatch.setattr(cmp, "_train_on", train_on)
    monkeypatch.setattr(cmp, "train_local", train_local)
    monkeypatch.setattr(cmp, "run_local", run_local)

    res = cmp.run_compare([cmp_sites / "one", cmp_sites / "two"], "fold_cv", rounds=2, local_epochs=2, seed=3,
                          overrides=CMP_SMALL, log=lambda m: None)
    assert [f["fold"] for f in res["folds"]] == [0, 1]
    split = {(k, n): sites[n].resolve_split(f"fold_cv={k}") for k in (0, 1) for n in sites}
    assert not np.array_equal(split[0, "one"].test, split[1, "one"].test)
    for k, name, rows in log["tensors"]:
        assert np.array_equal(rows, split[k, name].train), (k, name)
    assert {(k, n) for k, n, _ in log["tensors"]} == set(split)
    # centralised on both sites, then local-only one site at a time; same epochs and seed
    assert [(k, names, e, s) for k, names, e, s in log["train_on"]] == [
        (k, names, 4, 3) for k in (0, 1) for names in (["one", "two"], ["one"], ["two"])]
    assert log["train_local"] and all(kw["epochs"] == 4 and kw["early_stopping"] is False
                                      for kw in log["train_local"])
    assert [k for k, *_ in log["fed"]] == [0, 1]
    for k, rc, pooled_c, n_rounds in log["fed"]:
        assert (rc["split"], rc["num-server-rounds"], rc["local-epochs"], rc["seed"], rc["min-sites"]) == \
            (f"fold_cv={k}", 2, 2, 3, 2)
        assert n_rounds == 2 and res["folds"][k]["federated"]["cindex_pooled_from_counts"] == pooled_c
    # per fold: centralised, local and federated predictions, site by site, on the test rows
    assert [(k, n) for k, n, *_ in log["predict"]] == [(k, n) for k in (0, 1) for _ in range(3) for n in ("one", "two")]
    for i, (k, name, rows, _) in enumerate(log["predict"]):
        assert np.array_equal(rows, split[k, name].test), (k, name)
    for k in (0, 1):
        calls = [p for p in log["predict"] if p[0] == k]
        for j, arm in enumerate(("centralised", "local", "federated")):
            risk = {n: r for _, n, _, r in calls[2 * j:2 * j + 2]}
            want = site_cindices({n: (sites[n].time[split[k, n].test], sites[n].event[split[k, n].test], risk[n])
                                  for n in risk})
            got = res["folds"][k][arm]
            defined = [v for v in want["per_site"].values() if v is not None]
            assert got["cindex"] == pytest.approx(want["cindex"]), (k, arm)
            assert got["cindex_pooled"] == pytest.approx(want["cindex_pooled"]), (k, arm)
            assert got["cindex_per_site"] == pytest.approx(want["per_site"]), (k, arm)
            assert got["cindex_mean_of_sites"] == pytest.approx(float(np.mean(defined))), (k, arm)


# ---------------------------------------------------------------- audit of a run (simulations/audit_run.py)

@pytest.fixture(scope="module")
def audited_run(tmp_path_factory) -> Path:
    """A finished two-round in-process run of two small sites."""
    from client.client_app import app as client_app
    from federation_fixtures import SMALL_MODEL_OVERRIDES
    from server.server_app import app as server_app
    from simulations.local_grid import run_local

    root = tmp_path_factory.mktemp("audit")
    write_synthetic_site(root / "sites", "p", 30, modalities=(("lab", "tabular", 3),), seed=1)
    write_synthetic_site(root / "sites", "q", 30, modalities=(("lab", "tabular", 3),), seed=2)
    run_local(server_app, client_app, [{"partition-id": i} for i in range(2)],
              run_config_overrides={"sites": "p,q", "sites-dir": str(root / "sites"), "results-dir": str(root),
                                    "run-name": "run", "num-server-rounds": 2, "local-epochs": 1, "seed": 0,
                                    "min-sites": 2, "model-overrides": SMALL_MODEL_OVERRIDES,
                                    "node-wait-timeout": 2.0})
    return root / "run"


def test_audit_reads_the_last_round_and_its_metric_settings(audited_run, monkeypatch):
    import json

    import simulations.audit_run as ar

    rounds = json.loads((audited_run / "rounds.json").read_text())
    horizons = json.loads((audited_run / "config.json").read_text())["settings"]["eval_horizons_days"]
    seen = {}
    real_uno, real_auc = ar.metrics.uno_cindex, ar.metrics.binary_auc
    monkeypatch.setattr(ar.metrics, "uno_cindex", lambda t, e, r, tau=None: seen.setdefault("tau", tau)
                        and real_uno(t, e, r, tau=tau))
    monkeypatch.setattr(ar.metrics, "binary_auc", lambda lab, p: seen.setdefault("labels", np.asarray(lab))
                        is not None and real_auc(lab, p))
    real_sc = ar.metrics.site_cindices
    monkeypatch.setattr(ar.metrics, "site_cindices", lambda parts: seen.setdefault("c", real_sc(parts)))
    a = ar.audit(audited_run)
    assert seen["c"]["cindex_pooled"] != seen["c"]["cindex"]  # the fixture tells the two apart
    assert a["exact"]["cindex_harrell"] == seen["c"]["cindex_pooled"]
    assert a["exact"]["cindex_harrell_within_sites"] == seen["c"]["cindex"]
    assert len(rounds) == 2 and a["round"] == 2 and a["pooled"] == rounds[-1]["pooled"]
    assert a["sites"] == {k: v.get("cindex") for k, v in rounds[-1]["sites"].items()}
    assert seen["tau"] == max(horizons)
    assert set(np.unique(seen["labels"])) == {0, 1}  # every labelled held-out patient, both classes


def test_audit_command_exits_1_when_a_clients_c_index_is_not_reproduced(audited_run, tmp_path, capsys):
    import json
    import shutil

    from simulations.audit_run import main

    assert main([str(audited_run)]) == 0
    assert "WARNING" not in capsys.readouterr().out
    run = tmp_path / "run"
    shutil.copytree(audited_run, run)
    rounds = json.loads((run / "rounds.json").read_text())
    c = rounds[-1]["sites"]["p"]["cindex"]
    rounds[-1]["sites"]["p"]["cindex"] = c + 0.05 if c < 0.9 else c - 0.05
    (run / "rounds.json").write_text(json.dumps(rounds))
    assert main([str(run)]) == 1
    assert "WARNING: the audit's per-site C differs from the clients' at p" in capsys.readouterr().out


def test_audit_refuses_a_run_whose_sites_are_not_in_its_folders(audited_run, tmp_path):
    import json
    import shutil

    from simulations.audit_run import audit

    run = tmp_path / "run"
    shutil.copytree(audited_run, run)
    rounds = json.loads((run / "rounds.json").read_text())
    rounds[-1]["sites"]["elsewhere"] = dict(rounds[-1]["sites"]["p"])
    (run / "rounds.json").write_text(json.dumps(rounds))
    with pytest.raises(ValueError, match=r"sites \['elsewhere'\] .* are not among the run config's folders"):
        audit(run)


# ---------------------------------------------------------------- in-process grid (simulations/local_grid.py)

def test_local_grid_serialises_both_ways_turns_exceptions_into_error_replies_and_replies_once():
    """With a stand-in ClientApp: each node gets its own (copied) node config, the client works on a
    deserialised copy (it cannot change the server's message), wire sizes are recorded both ways, a
    client exception becomes an error reply that names its type and text, client time adds up over
    messages, every reply is recorded, and a reply is pulled once."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from simulations.local_grid import LocalGrid

    seen = []

    def client(msg, ctx):
        seen.append((ctx.node_id, ctx.node_config["site-dir"], ctx.run_config["k"]))
        if ctx.node_config.get("boom"):
            raise ValueError("site folder unreadable")
        msg.content["config"]["r"] = 99  # a client's change to what it received
        time.sleep(0.02)
        return Message(RecordDict({"metrics": MetricRecord({"n": 3}),
                                   "arrays": ArrayRecord([np.ones(64, np.float32)])}), reply_to=msg)

    node_configs = [{"site-dir": "a"}, {"site-dir": "b", "boom": True}]
    grid = LocalGrid(client, node_configs, {"k": 1})
    node_configs[0]["site-dir"] = "changed"
    nodes = list(grid.get_node_ids())
    assert len(nodes) == 2 and len(set(nodes)) == 2

    def message(node):
        return Message(RecordDict({"config": ConfigRecord({"r": 1})}), dst_node_id=node, message_type="train")

    sent = [message(n) for n in nodes]
    replies = list(grid.send_and_receive(sent))
    assert seen == [(nodes[0], "a", 1), (nodes[1], "b", 1)]
    assert all(m.content["config"]["r"] == 1 for m in sent)  # the server's messages are untouched
    ok, err = replies
    assert not ok.has_error() and ok.content["metrics"]["n"] == 3
    assert err.has_error() and "ValueError" in err.error.reason and "site folder unreadable" in err.error.reason
    for n in nodes:
        assert grid.bytes_down[(n, "train")][0] > 0 and grid.bytes_up[(n, "train")][0] > 0
    assert grid.bytes_up[(nodes[0], "train")][0] > 64 * 4  # the reply's arrays went over the wire
    assert [(n, kind) for n, kind, _ in grid.replies] == [(nodes[0], "train"), (nodes[1], "train")]
    grid.send_and_receive([message(nodes[0])])
    assert grid.client_seconds[nodes[0]] >= 0.04  # two messages' time
    assert len(grid.replies) == 3
    ids = list(grid.push_messages([message(nodes[0])]))
    assert len(list(grid.pull_messages(ids))) == 1 and list(grid.pull_messages(ids)) == []
