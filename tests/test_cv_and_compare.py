"""`oncofed cv` and `oncofed compare` on tiny synthetic sites (fast, small model)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from shared_model.metrics import site_cindices
from simulations.cli import main as cli
from simulations.cv import make_folds, restrict
from sites import load_site
from sites.synthetic import write_synthetic_site

SMALL = ["--set", "model.d_inter=16; model.d_token=8; model.hazard_hidden=16; model.dce_dim=8; "
         "model.n_heads=2; train.epochs=3; train.min_epochs=1; train.batch_size=8"]


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cv-sites")
    write_synthetic_site(root, "one", 40, modalities=(("ct", "sequence", 8), ("lab", "tabular", 4)), seed=1,
                         n_folds=3)
    write_synthetic_site(root, "two", 36, modalities=(("lab", "tabular", 4),), seed=2, n_folds=3)
    return root


def test_folds_are_patient_level_and_identical_across_methods(two_sites):
    sites = [load_site(two_sites / "one"), load_site(two_sites / "two")]
    folds = make_folds(sites, "fold_cv")
    assert len(folds) == 3
    for s in sites:
        tests = np.concatenate([f.test[s.name] for f in folds])
        assert sorted(tests.tolist()) == list(range(len(s)))  # every patient tested exactly once
        for f in folds:
            assert not set(f.train[s.name]) & set(f.test[s.name])


def test_restrict_keeps_only_patients_with_the_modality(two_sites):
    one = load_site(two_sites / "one")
    sub = restrict(one, "ct")
    assert sub.spec.modality_names == ("ct",)
    assert len(sub) == int(one.modalities["ct"].present.sum())
    assert restrict(load_site(two_sites / "two"), "ct") is None


def test_cv_writes_a_table_with_every_method(two_sites, tmp_path):
    out = tmp_path / "cv"
    rc = cli(["cv", "--sites-dir", str(two_sites), "--sites", "one,two", "--folds", "fold_cv",
              "--methods", "fused,single:lab,mlp,-gcs,coxph,rf", "--max-folds", "2", "--out", str(out), *SMALL])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    table = {e["method"]: e for e in res["table"]}
    assert set(table) == {"fused", "single:lab", "mlp", "-gcs", "coxph", "rf"}
    for m, e in table.items():
        assert e["error"] is None, (m, e["error"])
        assert e["folds"] == 2
        assert e["cindex"] is not None and 0 <= e["cindex"][0] <= 1
    assert table["rf"]["auc"] is not None and table["fused"]["oracle_cindex"] is not None
    for r in res["rows"]:
        if r["method"] in ("fused", "mlp", "-gcs", "single:lab"):
            assert r["best_epoch"] >= 1  # selected on validation carved from the training folds
    # observable-oracle C: the part of eta each test patient's observed modalities reveal
    sites = {n: load_site(two_sites / n) for n in ("one", "two")}
    folds = make_folds(list(sites.values()), "fold_cv")
    for r in res["rows"]:
        if r["method"] not in ("fused", "single:lab"):
            continue
        scored = {}
        for n, s in sites.items():
            rows = folds[r["fold"]].test[n]
            if r["method"] == "single:lab":  # the lab model sees the lab part only, on patients with lab
                rows = rows[s.modalities["lab"].present[rows]]
                risk = s.oracle_parts[("lab",)][rows]
            else:
                risk = s.observable_oracle_risk()[rows]
            scored[n] = (s.time[rows], s.event[rows], risk)
        assert r["observable_oracle_cindex"] == pytest.approx(site_cindices(scored)["cindex"], abs=1e-12)
    md = (out / "results.md").read_text()
    assert "**Simulated data:**" in md and "real labels and folds" in md and "| fused |" in md and "observable-oracle C" in md
    # which part of eta each model follows (synthetic sites carry their parts)
    for r in res["rows"]:
        if r["method"] == "fused":
            assert set(r["reads"]) == {"ct", "lab"} and all(-1 <= v <= 1 for v in r["reads"].values())
    assert set(table["fused"]["reads"]) == {"ct", "lab"} and "What each model reads" in md
    assert table["single:lab"]["reads"].keys() == {"lab"}
    # the fused model is also scored on exactly the patients a single-modality model sees
    assert table["single:lab"]["fused_same_patients"]["cindex"] is not None
    assert "on the same test patients" in md
    # paired comparisons: fused - each method; a single-modality model on the patients it scores
    row = {(r["method"], r["fold"]): r for r in res["rows"]}
    assert {e["b"] for e in res["paired"]} == {"single:lab", "mlp", "-gcs", "coxph", "rf"}
    for e in res["paired"]:
        if e["b"] == "single:lab":
            fused = row[("fused", e["fold"])]["same_patients"]["lab"][e["metric"]]
            if e["metric"] == "cindex":
                assert e["n_patients"] == sum(int(s.modalities["lab"].present[folds[e["fold"]].test[n]].sum())
                                              for n, s in sites.items())
        else:
            fused = row[("fused", e["fold"])][e["metric"]]
        assert e["diff"] == pytest.approx(fused - row[(e["b"], e["fold"])][e["metric"]], abs=1e-12), e


def test_cv_merge_of_split_runs_equals_one_run(two_sites, tmp_path):
    base = ["cv", "--sites-dir", str(two_sites), "--sites", "one,two", "--folds", "fold_cv", *SMALL]
    assert cli([*base, "--methods", "single:lab,coxph", "--out", str(tmp_path / "all")]) == 0
    assert cli([*base, "--methods", "single:lab,coxph", "--fold-ids", "0", "--out", str(tmp_path / "a")]) == 0
    assert cli([*base, "--methods", "single:lab", "--fold-ids", "1,2", "--out", str(tmp_path / "b")]) == 0
    assert cli([*base, "--methods", "coxph", "--fold-ids", "1,2", "--out", str(tmp_path / "c")]) == 0
    assert cli(["cv-merge", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"),
                "--out", str(tmp_path / "m")]) == 0
    one = json.loads((tmp_path / "all" / "results.json").read_text())
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert merged["folds"] == [0, 1, 2] and merged["methods"] == ["single:lab", "coxph"]
    for e1, e2 in zip(one["table"], merged["table"]):
        assert e1["method"] == e2["method"] and e2["folds"] == 3
        for key in ("cindex", "auc"):
            assert e2[key] == pytest.approx(e1[key]), (e1["method"], key)
    assert {r["source"] for r in merged["rows"]} == {str(tmp_path / d / "results.json") for d in "abc"}
    assert "Merged by `oncofed cv-merge` from 3 runs" in (tmp_path / "m" / "results.md").read_text()

    # a later run replaces an earlier row for the same method and fold; a different experiment is refused
    assert cli(["cv-merge", str(tmp_path / "all"), str(tmp_path / "a"), "--out", str(tmp_path / "r")]) == 0
    rows = json.loads((tmp_path / "r" / "results.json").read_text())["rows"]
    assert {r["source"] for r in rows if r["fold"] == 0} == {str(tmp_path / "a" / "results.json")}
    assert cli([*base, "--methods", "coxph", "--label", "event", "--fold-ids", "0", "--out", str(tmp_path / "e")]) == 0
    with pytest.raises(ValueError, match="label"):
        cli(["cv-merge", str(tmp_path / "a"), str(tmp_path / "e"), "--out", str(tmp_path / "x")])
    with pytest.raises(FileNotFoundError, match="results.json"):
        cli(["cv-merge", str(tmp_path / "nope"), "--out", str(tmp_path / "y")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cv_over_several_seeds_averages_each_fold_then_folds(two_sites, tmp_path):
    base = ["cv", "--sites-dir", str(two_sites), "--sites", "one,two", "--folds", "fold_cv",
            "--methods", "fused,rf", "--max-folds", "2", *SMALL]
    assert cli([*base, "--seeds", "0,1", "--out", str(tmp_path / "both")]) == 0
    assert cli([*base, "--seed", "0", "--out", str(tmp_path / "s0")]) == 0
    assert cli([*base, "--seed", "1", "--out", str(tmp_path / "s1")]) == 0
    both = json.loads((tmp_path / "both" / "results.json").read_text())
    runs = [json.loads((tmp_path / f"s{k}" / "results.json").read_text()) for k in (0, 1)]
    assert both["seeds"] == [0, 1] and len(both["rows"]) == 2 * 2 * 2
    for e in both["table"]:
        per_fold = [np.mean([next(r["cindex"] for r in run["rows"] if r["method"] == e["method"] and r["fold"] == f)
                             for run in runs]) for f in (0, 1)]
        assert e["cindex"][0] == pytest.approx(np.mean(per_fold))
        assert e["cindex"][1] == pytest.approx(np.std(per_fold))
        assert e["cindex"][2] == 2  # folds, not fold x seed runs
        assert e["seed_std_cindex"] is not None
    # the fused model's runs differ between seeds (initialisation, validation carve-out, batch order)
    fused = [(r["cindex"], r["auc"]) for r in both["rows"] if r["method"] == "fused" and r["fold"] == 0]
    assert len(fused) == 2 and fused[0] != fused[1]
    assert "mean over the 2 training seeds" in (tmp_path / "both" / "results.md").read_text()
    # paired comparison fused - rf on the same test patients: its point difference is the
    # difference of the two methods' seed-averaged fold values in the table
    per_fold = {(r["method"], r["fold"], k): np.mean([x[k] for x in both["rows"] if x["method"] == r["method"]
                                                       and x["fold"] == r["fold"]])
                for r in both["rows"] for k in ("cindex", "auc")}
    for e in both["paired"]:
        assert (e["a"], e["b"]) == ("fused", "rf") and e["seeds_a"] == e["seeds_b"] == [0, 1]
        want = per_fold[("fused", e["fold"], e["metric"])] - per_fold[("rf", e["fold"], e["metric"])]
        assert e["diff"] == pytest.approx(want, abs=1e-12) and e["se"] > 0 and e["n_boot"] == 1000
    assert sorted((e["fold"], e["metric"]) for e in both["paired"]) == [(0, "auc"), (0, "cindex"),
                                                                         (1, "auc"), (1, "cindex")]
    (pt,) = both["paired_table"]
    assert pt["cindex"]["folds"] == 2 and pt["cindex"]["ci"][0] < pt["cindex"]["diff"] < pt["cindex"]["ci"][1]
    c_entries = [e for e in both["paired"] if e["metric"] == "cindex"]
    assert pt["cindex"]["diff"] == pytest.approx(np.mean([e["diff"] for e in c_entries]))
    assert pt["cindex"]["se"] == pytest.approx(np.sqrt(sum(e["se"] ** 2 for e in c_entries)) / 2)
    assert pt["cindex"]["fold_spread"] == pytest.approx(np.std([e["diff"] for e in c_entries], ddof=1))
    assert "Paired differences **fused − method**" in (tmp_path / "both" / "results.md").read_text()
    assert all("_pred" not in r for r in both["rows"])  # predictions are never written
    # runs of one seed each, merged, give the same table
    assert cli(["cv-merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert merged["seeds"] == [0, 1]
    # each input's paired entries average one seed, the merged table two: they are dropped
    assert merged["paired"] == [] and "Paired differences" not in (tmp_path / "m" / "results.md").read_text()
    # a run split by folds keeps its paired entries
    assert cli([*base, "--seeds", "0,1", "--fold-ids", "1", "--out", str(tmp_path / "f1")]) == 0
    assert cli(["cv-merge", str(tmp_path / "both"), str(tmp_path / "f1"), "--out", str(tmp_path / "mf")]) == 0
    kept = json.loads((tmp_path / "mf" / "results.json").read_text())["paired"]
    assert [(e["fold"], e["metric"], e["diff"]) for e in kept] == [
        (e["fold"], e["metric"], e["diff"]) for e in sorted(both["paired"], key=lambda e: (e["fold"], e["metric"]))]
    assert {e["source"] for e in kept if e["fold"] == 1} == {str(tmp_path / "f1" / "results.json")}
    for e1, e2 in zip(both["table"], merged["table"]):
        assert e2["cindex"] == pytest.approx(e1["cindex"]) and e2["auc"] == pytest.approx(e1["auc"])
    with pytest.raises(ValueError, match="repeats a seed"):
        cli([*base, "--seeds", "1,1", "--out", str(tmp_path / "bad")])
    with pytest.raises(ValueError, match="--bootstrap must be 0"):  # refused before any training
        cli([*base, "--bootstrap", "1", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_subset_metrics_score_only_patients_with_the_modality(two_sites):
    from simulations.cv import _subset_metrics, fold_metrics

    one = load_site(two_sites / "one")
    test = {"one": np.arange(len(one))}
    rng = np.random.default_rng(0)
    risk = {"one": rng.normal(size=len(one))}
    prob = {"one": None}
    sub = _subset_metrics({"one": one}, test, risk, prob)
    has_ct = one.modalities["ct"].present
    assert 0 < has_ct.sum() < len(one)  # the fixture has patients without CT
    expect = fold_metrics({"one": one}, {"one": np.flatnonzero(has_ct)}, {"one": risk["one"][has_ct]}, prob)
    assert sub["ct"]["cindex"] == pytest.approx(expect["cindex"])
    assert sub["lab"]["cindex"] == pytest.approx(fold_metrics({"one": one}, test, risk, prob)["cindex"]) \
        or not one.modalities["lab"].present.all()


def test_compare_runs_the_three_arms_on_identical_folds(two_sites, tmp_path):
    out = tmp_path / "cmp"
    rc = cli(["compare", "--sites-dir", str(two_sites), "--sites", "one,two", "--folds", "fold_cv",
              "--rounds", "2", "--max-folds", "1", "--out", str(out),
              "--set", "model.d_inter=16; model.d_token=8; model.hazard_hidden=16; model.dce_dim=8; "
              "model.n_heads=2; train.batch_size=8"])
    assert rc == 0
    res = json.loads((out / "compare.json").read_text())
    fold = res["folds"][0]
    for arm in ("centralised", "local", "federated"):
        assert fold[arm]["cindex"] is not None
    assert fold["federated"]["cindex_pooled_from_counts"] is not None
    assert "federated" in (out / "compare.md").read_text()


@pytest.mark.parametrize("refit", ["false", "true"])
def test_model_choice_never_uses_the_outer_test_fold(two_sites, monkeypatch, refit):
    import shared_model.train as train_module
    import simulations.cv as cv_module
    import simulations.model_choice as mc

    seen = {}
    real_train = train_module.train_local
    real_predict = cv_module.predict_rows  # model_choice scores the fused model through cv.run_neural
    calls = []

    def spy_train(model, parts, cfg, **kw):
        calls.append(kw.get("epochs"))
        seen["train"] = [(p.tensors.site.name, set(p.train_idx.tolist())
                          | (set(p.val_idx.tolist()) if p.val_idx is not None else set())) for p in parts]
        return real_train(model, parts, cfg, **kw)

    def spy_predict(model, tensors, rows):
        seen.setdefault("scored", []).append((tensors.site.name, set(np.asarray(rows).tolist())))
        return real_predict(model, tensors, rows)

    monkeypatch.setattr(train_module, "train_local", spy_train)
    monkeypatch.setattr(cv_module, "predict_rows", spy_predict)
    paths = [two_sites / "one", two_sites / "two"]
    overrides = {k: v for item in SMALL[1].split(";") for k, v in [item.strip().split("=")]}
    overrides["train.refit"] = refit
    sites = {s.name: s for s in (load_site(p) for p in paths)}
    fold = next(f for f in make_folds(list(sites.values()), "fold_cv") if f.index == 1)
    row = mc.score_fold(sites, fold, overrides=overrides, holdout=0.25, seed=0)
    for name, rows in seen["train"] + seen["scored"]:
        assert rows <= set(fold.train[name].tolist()) and not rows & set(fold.test[name].tolist())
    for (name, trained), (_, scored) in zip(seen["train"], seen["scored"]):
        assert trained and scored and not trained & scored
    assert 0.0 <= row["holdout_cindex"] <= 1.0 and row["best_epoch"] >= 1
    # with refit the second run trains on the same inner rows (fit + validation) for the chosen epochs
    assert calls == ([None, row["best_epoch"]] if refit == "true" else [None])


def test_model_choice_scores_a_classical_baseline_on_the_fused_models_hold_out(two_sites, monkeypatch):
    import simulations.cv as cv_module
    import simulations.model_choice as mc

    sites = {s.name: s for s in (load_site(two_sites / n) for n in ("one", "two"))}
    fold = next(f for f in make_folds(list(sites.values()), "fold_cv") if f.index == 1)
    seen = {}
    real_fit = cv_module.fit_coxph

    def spy_fit(x, time, event, strata=None, **kw):
        seen["n_fit"] = len(x)
        return real_fit(x, time, event, strata=strata, **kw)

    monkeypatch.setattr(cv_module, "fit_coxph", spy_fit)
    row = mc.score_fold(sites, fold, overrides={}, holdout=0.25, seed=0, method="coxph")
    held = {n: mc.carve_validation(s.event, fold.train[n], 0.25, mc.HOLDOUT_SEED)[1] for n, s in sites.items()}
    # fitted on exactly the inner-training patients, scored on the hold-out a fused run would use
    assert seen["n_fit"] == sum(len(fold.train[n]) - len(held[n]) for n in sites)
    model = cv_module.run_classical("coxph", sites, cv_module.FoldSpec(1, {n: np.setdiff1d(fold.train[n], held[n])
                                                                           for n in sites}, held), 0)
    expect = site_cindices({n: (s.time[held[n]], s.event[held[n]], model[0][n]) for n, s in sites.items()})
    assert row["method"] == "coxph" and row["holdout_cindex"] == pytest.approx(expect["cindex"])
    with pytest.raises(ValueError, match="unknown method 'svm'"):
        mc.score_fold(sites, fold, overrides={}, holdout=0.25, seed=0, method="svm")


def test_cli_helpers_load_relabelled_sites_their_folds_and_the_overrides(two_sites, capsys):
    from simulations.cv import cli_overrides, cli_sites_and_folds
    import simulations.model_choice as mc

    assert cli_overrides(["train.lr=0.1", "model.a=1; train.lr=0.2"]) == {"train.lr": "0.2", "model.a": "1"}
    sites, folds = cli_sites_and_folds(two_sites, " one, two ", "fold_cv", "event", "2,0")
    assert list(sites) == ["one", "two"] and [f.index for f in folds] == [0, 2]
    assert all(np.array_equal(s.status, s.event) for s in sites.values())  # relabelled: all deaths
    assert [f.index for f in cli_sites_and_folds(two_sites, "one", "fold_cv", "status", None)[1]] == [0, 1, 2]
    with pytest.raises(ValueError, match=r"fold ids \[7\] not in fold_cv"):
        cli_sites_and_folds(two_sites, "one", "fold_cv", "status", "7")
    # the model_choice command line goes through them
    assert mc.main(["--sites-dir", str(two_sites), "--sites", "one,two", "--folds", "fold_cv",
                    "--fold-ids", "1", "--method", "coxph"]) == 0
    assert "[model-choice] coxph: hold-out C (within sites)" in capsys.readouterr().out


def test_part_reading_is_a_within_site_rank_correlation_on_patients_with_the_part(two_sites):
    from simulations.cv import part_reading

    sites = {n: load_site(two_sites / n) for n in ("one", "two")}
    fold = make_folds(list(sites.values()), "fold_cv")[0]
    test = fold.test
    keys = sorted({k for s in sites.values() for k in s.oracle_parts})
    assert ("ct",) in keys and ("lab",) in keys
    ct = sites["one"].modalities["ct"].present[test["one"]]
    assert 0 < ct.sum() < len(ct)  # some test patients lack the CT

    def risk_from(part, offset):  # the part itself, a site offset, garbage where the CT is missing
        out = {}
        for n, s in sites.items():
            r = (s.oracle_parts[part][test[n]] if part in s.oracle_parts else np.zeros(len(test[n]))) + offset[n]
            if n == "one" and part == ("ct",):
                r = np.where(ct, r, 1e6)
            out[n] = r
        return out

    reads = part_reading(sites, test, risk_from(("ct",), {"one": 0.0, "two": 50.0}))
    assert reads["ct"] == pytest.approx(1.0)
    reads = part_reading(sites, test, risk_from(("lab",), {"one": 100.0, "two": -100.0}))
    assert reads["lab"] == pytest.approx(1.0)  # offsets between sites do not matter
    neg = {n: -r for n, r in risk_from(("lab",), {"one": 0.0, "two": 0.0}).items()}
    assert part_reading(sites, test, neg)["lab"] == pytest.approx(-1.0)
    # a real site (no oracle parts) contributes nothing
    real = {n: s for n, s in sites.items()}
    real["one"] = real["one"].__class__(**{**real["one"].__dict__, "oracle_parts": None})
    only_two = part_reading(real, test, risk_from(("lab",), {"one": 0.0, "two": 0.0}))
    assert "ct" not in only_two and only_two["lab"] == pytest.approx(1.0)
    assert part_reading({"one": real["one"]}, test, {"one": np.zeros(len(test["one"]))}) == {}


def test_ensemble_averages_members_trained_exactly_like_the_fused_runs(two_sites):
    """ensemble:2 at seed 3 = the mean of the fused model's predictions at seeds 3 and 4
    (each member is the run `fused` would do with that seed: same carve-out, same epoch)."""
    from shared_model.config import load_config
    from shared_model.runconfig import parse_overrides
    from simulations.cv import run_ensemble, run_neural

    sites = {s.name: s for s in (load_site(two_sites / n) for n in ("one", "two"))}
    fold = make_folds(list(sites.values()), "fold_cv")[0]
    cfg = load_config(overrides=parse_overrides(SMALL[1]))
    risk, prob, info = run_ensemble(sites, fold, cfg, 3, 2)
    members = [run_neural(sites, fold, cfg, sd) for sd in (3, 4)]
    assert info["member_seeds"] == [3, 4]
    assert info["member_best_epochs"] == [m[2]["best_epoch"] for m in members]
    for s in sites:
        a, b = members[0][0][s], members[1][0][s]
        assert not np.allclose(a, b)  # the members differ
        np.testing.assert_allclose(risk[s], (a + b) / 2, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(prob[s], (members[0][1][s] + members[1][1][s]) / 2, rtol=1e-6, atol=1e-7)


def test_model_choice_scores_an_ensemble_and_each_member_on_the_same_hold_out(two_sites, capsys):
    """ensemble:2 at seed 3: each member's hold-out C is the C a fused run at seed 3 / 4 gets on
    the same patients, and the ensemble's is the C of their averaged log-risks."""
    import simulations.model_choice as mc
    from simulations.cv import FoldSpec, run_neural
    from shared_model.config import load_config
    from shared_model.runconfig import parse_overrides

    sites = {s.name: s for s in (load_site(two_sites / n) for n in ("one", "two"))}
    fold = next(f for f in make_folds(list(sites.values()), "fold_cv") if f.index == 1)
    overrides = parse_overrides(SMALL[1])
    row = mc.score_fold(sites, fold, overrides=overrides, holdout=0.25, seed=3, method="ensemble:2")
    singles = [mc.score_fold(sites, fold, overrides=overrides, holdout=0.25, seed=sd)["holdout_cindex"]
               for sd in (3, 4)]
    assert row["method"] == "ensemble:2" and row["member_seeds"] == [3, 4]
    assert row["member_holdout_cindex"] == pytest.approx(singles)
    held = {n: mc.carve_validation(s.event, fold.train[n], 0.25, mc.HOLDOUT_SEED)[1] for n, s in sites.items()}
    inner = {n: np.setdiff1d(fold.train[n], held[n]) for n in sites}
    cfg = load_config(overrides=overrides)
    members = [run_neural(sites, FoldSpec(1, inner, held), cfg, sd) for sd in (3, 4)]
    mean_risk = {n: (members[0][0][n] + members[1][0][n]) / 2 for n in sites}
    expect = site_cindices({n: (s.time[held[n]], s.event[held[n]], mean_risk[n]) for n, s in sites.items()})
    assert row["holdout_cindex"] == pytest.approx(expect["cindex"])
    with pytest.raises(ValueError, match="N >= 2"):
        mc.main(["--sites-dir", str(two_sites), "--sites", "one", "--folds", "fold_cv", "--method", "ensemble:1"])
    with pytest.raises(SystemExit):
        mc.main(["--sites-dir", str(two_sites), "--sites", "one", "--folds", "fold_cv", "--method", "svm"])
    assert "expected fused, ensemble:N" in capsys.readouterr().err
    assert mc.main(["--sites-dir", str(two_sites), "--sites", "one,two", "--folds", "fold_cv", "--fold-ids", "1",
                    "--seed", "3", "--method", "ensemble:2", *SMALL]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    gain = row["holdout_cindex"] - np.mean(singles)
    assert (f"members alone {singles[0]:.3f}, {singles[1]:.3f}" in summary
            and f"ensemble - members' mean per fold {gain:+.3f} (folds [1])" in summary)


@pytest.mark.parametrize("method,match", [("ensemble:1", "N >= 2"), ("ensemble:x", "N >= 2"),
                                          ("single:slides", "no site has modality"),
                                          ("fusd", "unknown method")])
def test_bad_method_is_refused_before_training(two_sites, tmp_path, method, match):
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=match):
        cli(["cv", "--sites-dir", str(two_sites), "--sites", "one,two", "--folds", "fold_cv",
             "--methods", f"fused,{method}", "--out", str(out), *SMALL])
    assert not out.exists()


def _classical_fails(monkeypatch, when) -> None:
    """Make oncofed cv's classical jobs raise RuntimeError("boom") where ``when(fold, seed)``."""
    import simulations.cv as cv_module

    real = cv_module.run_classical

    def flaky(method, sites, fold, seed):
        if when(fold, seed):
            raise RuntimeError("boom")
        return real(method, sites, fold, seed)

    monkeypatch.setattr(cv_module, "run_classical", flaky)


def test_a_failing_job_becomes_an_error_row_the_others_are_written_and_the_exit_is_non_zero(
        two_sites, tmp_path, monkeypatch, capsys):
    _classical_fails(monkeypatch, lambda fold, seed: fold.index == 1)
    out = tmp_path / "cv"
    rc = cli(["cv", "--sites-dir", str(two_sites), "--sites", "one,two", "--folds", "fold_cv", "--methods", "coxph",
              "--max-folds", "2", "--bootstrap", "0", "--out", str(out)])
    assert rc == 1
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r.get("error") for r in sorted(rows, key=lambda r: r["fold"])] == [
        None, "fold 1, seed 0: RuntimeError: boom"]
    assert "1 job(s) failed: coxph fold 1, seed 0: RuntimeError: boom" in capsys.readouterr().err


def test_cv_merge_refuses_one_method_run_with_two_configurations(tmp_path):
    from simulations.cv_merge import merge_results

    def run(name, folds, method, warm, threads):
        rows = [{"method": method, "fold": k, "seed": 0, "cindex": 0.8, "auc": None} for k in folds]
        data = {"sites": ["s"], "simulated": [], "folds_column": "fold_cv", "folds": folds, "label": "event",
                "seed": 0, "seeds": [0], "methods": [method], "rows": rows, "protocol": None, "paired": [],
                "config": {"train": {"linear_warm_start": warm, "num_threads": threads}}}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(data))
        return tmp_path / name

    a, b = run("a", [0, 1], "fused", True, 1), run("b", [2], "fused", False, 1)
    with pytest.raises(ValueError, match=r"both hold \['fused'\] but were run with different settings "
                                         r"\(train.linear_warm_start\)"):
        merge_results([a, b], tmp_path / "m", log=lambda _: None)
    assert not (tmp_path / "m").exists()
    # threads may differ; a baseline run beside the fused one is noted, not refused
    merge_results([a, run("c", [2], "fused", True, 2)], tmp_path / "ok", log=lambda _: None)
    merge_results([a, run("d", [0, 1], "coxph", False, 1)], tmp_path / "noted", log=lambda _: None)
    assert "differ in train.linear_warm_start" in (tmp_path / "noted" / "results.md").read_text()


def test_a_failed_seed_leaves_its_fold_out_of_the_table_and_the_paired_comparison(two_sites, tmp_path, monkeypatch):
    _classical_fails(monkeypatch, lambda fold, seed: fold.index == 1 and seed == 1)
    out = tmp_path / "cv"
    rc = cli(["cv", "--sites-dir", str(two_sites), "--sites", "one,two", "--folds", "fold_cv",
              "--methods", "fused,coxph", "--seeds", "0,1", "--max-folds", "2", "--bootstrap", "20",
              "--out", str(out), *SMALL])
    assert rc == 1
    doc = json.loads((out / "results.json").read_text())
    coxph = next(e for e in doc["table"] if e["method"] == "coxph")
    assert coxph["folds"] == 1  # fold 1 is an error (seed 1 failed) in the table...
    compared = {(p["b"], p["fold"]) for p in doc["paired"]}
    assert ("coxph", 0) in compared and ("coxph", 1) not in compared  # ...and in the paired comparison
    paired_cindex = next(p for p in doc["paired_table"] if p["b"] == "coxph")["cindex"]
    assert paired_cindex["folds"] == 1


def test_silent_settings_are_refused_before_any_training(two_sites, tmp_path):
    from simulations.cv import run_cv

    paths = [two_sites / "one", two_sites / "two"]
    with pytest.raises(ValueError, match="train.seed is not read by oncofed cv"):
        run_cv(paths, "fold_cv", methods=["fused"], overrides={"train.seed": "7"}, out_dir=tmp_path / "a")
    unlabelled = write_synthetic_site(tmp_path / "sites", "nolabel", 30, modalities=(("lab", "tabular", 4),),
                                      seed=5, n_folds=3, with_status=False)
    with pytest.raises(ValueError, match="the patients of nolabel do not have both classes; use --label event"):
        run_cv([unlabelled], "fold_cv", methods=["coxph", "rf"], out_dir=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written


def test_a_site_with_test_but_no_training_patients_in_a_fold_is_refused(two_sites):
    one, two = load_site(two_sites / "one"), load_site(two_sites / "two")
    folds_of = two.splits

    def external(column):  # "two" as an external site: all its patients in the test set of fold 0
        splits = folds_of(column)
        splits[0] = dataclasses.replace(splits[0], train=np.zeros(0, np.int64), test=np.arange(len(two)))
        return splits

    object.__setattr__(two, "splits", external)
    with pytest.raises(ValueError, match="fold_cv, fold 0: site 'two' has 36 test patients but 0 training"):
        make_folds([one, two], "fold_cv")


@pytest.mark.parametrize("args, match", [
    (["--set", "train.seed=5"], "model-overrides sets keys that a federated run does not use: train.seed"),
    (["--server-optimizer", "bogus"], "server-optimizer must be one of fedavg, fedprox, fedadam, fedyogi"),
    (["--rounds", "0"], "num-server-rounds must be >= 1"),
    (["--max-folds", "0"], "--max-folds must be >= 1, got 0"),
    (["--folds", "nosuch"], "has no fold column 'nosuch'"),
])
def test_compare_refuses_bad_arguments_before_any_arm_trains(two_sites, tmp_path, capsys, monkeypatch, args, match):
    import simulations.compare as cmp

    monkeypatch.setattr(cmp, "compare_fold", lambda *a, **k: pytest.fail("an arm trained before the refusal"))
    rc = cli(["compare", "--sites-dir", str(two_sites), "--sites", "one,two", "--folds", "fold_cv",
              "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("oncofed compare: error: ") and match in err


def test_compare_refuses_an_empty_site_list(two_sites, tmp_path, capsys):
    rc = cli(["compare", "--sites-dir", str(two_sites), "--sites", ",", "--out", str(tmp_path / "x")])
    assert rc == 2 and "give at least one site (--sites)" in capsys.readouterr().err


def test_compare_lets_a_failure_while_training_raise_instead_of_calling_it_a_usage_error(two_sites, tmp_path,
                                                                                      monkeypatch):
    """Only the up-front checks become a one-line error with exit 2; a ValueError from an arm keeps its traceback."""
    import simulations.compare as cmp

    def broken(*a, **k):
        raise ValueError("a defect inside an arm")

    monkeypatch.setattr(cmp, "compare_fold", broken)
    with pytest.raises(ValueError, match="a defect inside an arm"):
        cli(["compare", "--sites-dir", str(two_sites), "--sites", "one,two", "--folds", "fold_cv",
             "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_compare_takes_a_fixed_split_column_and_folders_of_different_parents(two_sites, tmp_path, monkeypatch):
    """A split_* column is one fold; each federated node reads its own folder (another parent here)."""
    import shutil

    import simulations.compare as cmp

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(two_sites / "two", elsewhere / "two")
    seen = []
    real = cmp.run_local

    def spy(server_app, client_app, node_configs, **kw):
        seen.extend(node_configs)
        return real(server_app, client_app, node_configs, **kw)

    monkeypatch.setattr(cmp, "run_local", spy)
    res = cmp.run_compare([two_sites / "one", elsewhere / "two"], "split_default", rounds=1,
                          overrides="model.d_inter=16; model.d_token=8; model.hazard_hidden=16; model.dce_dim=8; "
                                    "model.n_heads=2; train.batch_size=8", log=lambda m: None)
    assert len(res["folds"]) == 1 and res["folds"][0]["federated"]["cindex"] is not None
    assert seen == [{"site-dir": str(two_sites / "one")}, {"site-dir": str(elsewhere / "two")}]
