"""Guarantees of `oncofed cv`, `cv-merge`, `model_choice` and `validation_curve` that a mutation
slipped past (fast: no network is trained — the fused model is a stand-in where a whole CV runs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import simulations.cv as cv
from shared_model.metrics import binary_auc, site_cindices
from sites import load_site
from sites.synthetic import write_synthetic_site


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("cv-guarantees")
    write_synthetic_site(r, "one", 40, modalities=(("ct", "sequence", 8), ("lab", "tabular", 4)), seed=1, n_folds=3)
    write_synthetic_site(r, "two", 36, modalities=(("lab", "tabular", 4),), seed=2, n_folds=3)
    write_synthetic_site(r, "four", 40, modalities=(("lab", "tabular", 4),), seed=4, n_folds=4)
    write_synthetic_site(r, "pair", 80, modalities=(("ct", "sequence", 16), ("slide", "vector", 12), ("lab", "tabular", 3)),
                         seed=3, n_folds=3)
    return r


@pytest.fixture(scope="module")
def sites(root):
    return {n: load_site(root / n) for n in ("one", "two")}


# ---------------------------------------------------------------- a stand-in for the trained network

def _fake_neural(calls):
    """run_neural stand-in: risk = the oracle risk + seed noise on the test rows; records its calls."""

    def fake(sites, fold, cfg, seed):
        calls.append({"fold": fold.index, "seed": seed, "cfg": cfg, "sites": sorted(sites),
                      "train": {s: np.asarray(fold.train[s]).copy() for s in sites},
                      "test": {s: np.asarray(fold.test[s]).copy() for s in sites}})
        risk, prob = {}, {}
        for s, site in sites.items():
            rows = fold.test.get(s, [])
            if len(rows):
                rng = np.random.default_rng(1000 * seed + 7 * fold.index + len(s))
                r = site.oracle_risk[rows] + rng.normal(0, 0.5 + 0.3 * seed, len(rows))
                risk[s], prob[s] = r, 1 / (1 + np.exp(-r))
        return risk, prob, {"best_epoch": 2 + seed, "epochs_run": 3, "selection": "loss", "val_score": 0.5,
                            "seconds": 0.0}

    return fake


@pytest.fixture
def fake(monkeypatch):
    calls: list = []
    monkeypatch.setattr(cv, "run_neural", _fake_neural(calls))
    return calls


def _run(root, tmp_path, methods, names=("one", "two"), **kw):
    out = tmp_path / "cv"
    kw.setdefault("bootstrap", 0)
    res = cv.run_cv([root / n for n in names], "fold_cv", methods=methods, out_dir=out, log=lambda m: None, **kw)
    return res, json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def test_run_cv_table_is_the_mean_and_population_std_of_each_folds_seed_mean(root, tmp_path, fake):
    res, doc, md = _run(root, tmp_path, ["fused", "coxph"], seeds=[0, 2])
    assert doc["seeds"] == [0, 2] and doc["seed"] == 0 and doc["folds"] == [0, 1, 2]
    assert doc["methods"] == ["fused", "coxph"] and doc["folds_column"] == "fold_cv" and doc["label"] == "status"
    assert doc["sites"] == ["one", "two"] and doc["simulated"] == ["one", "two"]
    assert set(doc["cohorts"]) == {"one", "two"} and doc["config"]["train"]
    assert len(doc["rows"]) == 2 * 3 * 2 and all("_pred" not in r for r in doc["rows"])
    for e in doc["table"]:
        for key in ("cindex", "cindex_pooled", "auc", "oracle_cindex", "observable_oracle_cindex"):
            per_fold = [np.mean([r[key] for r in doc["rows"] if r["method"] == e["method"] and r["fold"] == f])
                        for f in range(3)]
            assert e[key][0] == pytest.approx(np.mean(per_fold)), (e["method"], key)
            assert e[key][1] == pytest.approx(np.std(per_fold)), (e["method"], key)  # ddof 0
            assert e[key][2] == 3
        c = [[r["cindex"] for r in doc["rows"] if r["method"] == e["method"] and r["fold"] == f] for f in range(3)]
        want = np.mean([np.std(x) for x in c])
        assert (e["seed_std_cindex"] or 0.0) == pytest.approx(want)
        line = next(x for x in md.splitlines() if x.startswith(f"| {e['method']} |"))
        assert line.split(" | ")[1] == f"{e['cindex'][0]:.3f} ± {e['cindex'][1]:.3f}"
        assert line.split(" | ")[2] == f"{e['cindex_pooled'][0]:.3f} ± {e['cindex_pooled'][1]:.3f}"
        assert line.split(" | ")[4] == f"{e['auc'][0]:.3f} ± {e['auc'][1]:.3f}"
    fused = next(e for e in doc["table"] if e["method"] == "fused")
    assert fused["seed_std_cindex"] > 0
    assert f"fused {fused['seed_std_cindex']:.3f}" in md and "mean over the 2 training seeds" in md
    assert "folds `fold_cv` (3: 0, 1, 2)" in md and "seeds 0, 2" in md and "ddof = 0" in md
    assert "**Simulated data:**" in md
    # each (fold, seed) of the stand-in got exactly the fold's training and test patients
    folds = cv.make_folds([load_site(root / n) for n in ("one", "two")], "fold_cv")
    assert sorted((c["fold"], c["seed"]) for c in fake) == [(f, s) for f in range(3) for s in (0, 2)]
    for c in fake:
        for s in ("one", "two"):
            np.testing.assert_array_equal(c["train"][s], folds[c["fold"]].train[s])
            np.testing.assert_array_equal(c["test"][s], folds[c["fold"]].test[s])


def test_run_cv_rows_are_the_metrics_of_the_predictions_on_the_fold_test_patients(root, tmp_path, fake, sites):
    _, doc, _ = _run(root, tmp_path, ["fused"], seed=1)
    folds = cv.make_folds(list(sites.values()), "fold_cv")
    assert [r["seed"] for r in doc["rows"]] == [1, 1, 1] and doc["seed"] == 1
    for r in doc["rows"]:
        f = folds[r["fold"]]
        risk, prob, _ = _fake_neural([])(sites, f, None, 1)
        want = site_cindices({s: (sites[s].time[f.test[s]], sites[s].event[f.test[s]], risk[s]) for s in sites})
        assert r["cindex"] == pytest.approx(want["cindex"]) and r["cindex_pooled"] == pytest.approx(want["cindex_pooled"])
        per = [v for v in want["per_site"].values() if v is not None]
        assert r["cindex_sites"] == pytest.approx(np.mean(per))
        st = np.concatenate([sites[s].status[f.test[s]] for s in sites])
        p = np.concatenate([prob[s] for s in sites])
        assert r["auc"] == pytest.approx(binary_auc(st[st >= 0], p[st >= 0]))
        assert r["n_test"] == sum(len(f.test[s]) for s in sites)
        orc = site_cindices({s: (sites[s].time[f.test[s]], sites[s].event[f.test[s]], sites[s].oracle_risk[f.test[s]])
                             for s in sites})
        assert r["oracle_cindex"] == pytest.approx(orc["cindex"])
        assert r["best_epoch"] == 3  # the stand-in's info is kept in the row


def test_ablations_and_mlp_get_their_config_and_fused_gets_the_run_config(root, tmp_path, fake):
    _run(root, tmp_path, ["fused", "mlp", "-dce", "-gcs", "-alignment"], max_folds=1,
         overrides={"train.epochs": "4"})
    cfgs = [c["cfg"] for c in fake]
    assert len(cfgs) == 5 and all(c.train.epochs == 4 for c in cfgs)
    fused, mlp, dce, gcs, align = cfgs
    assert fused.model.use_dce and fused.model.use_gcs and fused.model.use_alignment
    assert fused.model.fusion_mode != "concat" and mlp.model.fusion_mode == "concat"
    assert not dce.model.use_dce and dce.model.use_gcs
    assert not gcs.model.use_gcs and gcs.model.use_dce
    assert not align.model.use_alignment and align.model.use_gcs


def test_max_folds_and_fold_ids_choose_the_folds(root, tmp_path, fake):
    _, doc, md = _run(root, tmp_path, ["fused"], max_folds=2)
    assert doc["folds"] == [0, 1] and sorted({c["fold"] for c in fake}) == [0, 1]
    fake.clear()
    _, doc, md = _run(root, tmp_path, ["fused"], fold_ids=[2, 0])
    assert doc["folds"] == [0, 2] and sorted({c["fold"] for c in fake}) == [0, 2]
    assert "(2: 0, 2)" in md
    with pytest.raises(ValueError, match=r"fold ids \[5\] not in fold_cv"):
        _run(root, tmp_path / "x", ["fused"], fold_ids=[5])
    for bad in (0, -1):  # 0 ran every fold and -1 dropped the last one, in a table that looked complete
        fake.clear()
        with pytest.raises(ValueError, match=f"--max-folds must be >= 1, got {bad}"):
            _run(root, tmp_path / f"bad{bad}", ["fused"], max_folds=bad)
        assert fake == [] and not (tmp_path / f"bad{bad}").exists()


def test_label_event_relabels_the_auc_label(root, tmp_path, fake, sites):
    _, doc, _ = _run(root, tmp_path, ["fused"], label="event", max_folds=1)
    f = cv.make_folds(list(sites.values()), "fold_cv")[0]
    risk, prob, _ = _fake_neural([])(sites, f, None, 0)
    ev = np.concatenate([sites[s].event[f.test[s]] for s in sites])
    p = np.concatenate([prob[s] for s in sites])
    assert doc["label"] == "event" and doc["rows"][0]["auc"] == pytest.approx(binary_auc(ev, p))


def test_paired_comparison_is_run_and_written(root, tmp_path, fake):
    _, doc, md = _run(root, tmp_path, ["fused", "coxph"], max_folds=2, bootstrap=30)
    assert {(e["b"], e["fold"], e["metric"]) for e in doc["paired"]} == {
        ("coxph", f, m) for f in (0, 1) for m in ("cindex", "auc")}
    row = {(r["method"], r["fold"]): r for r in doc["rows"]}
    for e in doc["paired"]:
        assert e["n_boot"] == 30
        assert e["diff"] == pytest.approx(row[("fused", e["fold"])][e["metric"]] - row[("coxph", e["fold"])][e["metric"]])
    assert doc["paired_table"] and "Paired differences" in md
    fake.clear()
    _, doc, md = _run(root, tmp_path / "nob", ["fused", "coxph"], max_folds=1, bootstrap=0)
    assert doc["paired"] == [] and "Paired differences" not in md


def test_single_modality_is_scored_on_its_patients_and_the_fused_model_on_the_same(root, tmp_path, fake, sites):
    _, doc, md = _run(root, tmp_path, ["fused", "single:ct"], max_folds=1, bootstrap=20)
    f = cv.make_folds(list(sites.values()), "fold_cv")[0]
    single = next(c for c in fake if c["sites"] == ["one"])  # only site one has the CT
    one = sites["one"]
    has = np.flatnonzero(one.modalities["ct"].present)
    # the restricted site's rows map back to exactly the fold's training / test patients with a CT
    ids = one.patient_ids[has]
    assert list(ids[single["train"]["one"]]) == [p for p in one.patient_ids[f.train["one"]] if p in set(ids)]
    assert list(ids[single["test"]["one"]]) == [p for p in one.patient_ids[f.test["one"]] if p in set(ids)]
    fused_row = next(r for r in doc["rows"] if r["method"] == "fused")
    keep = one.modalities["ct"].present[f.test["one"]]
    risk, prob, _ = _fake_neural([])(sites, f, None, 0)
    rows = f.test["one"][keep]
    want = site_cindices({"one": (one.time[rows], one.event[rows], risk["one"][keep])})["cindex"]
    assert fused_row["same_patients"]["ct"]["cindex"] == pytest.approx(want)
    e = next(e for e in doc["table"] if e["method"] == "single:ct")
    assert e["fused_same_patients"]["cindex"][0] == pytest.approx(want)
    assert e["fused_same_patients"]["auc"][0] == pytest.approx(fused_row["same_patients"]["ct"]["auc"])
    assert fused_row["same_patients"]["ct"]["auc"] != pytest.approx(want)
    pc = next(p for p in doc["paired"] if p["b"] == "single:ct" and p["metric"] == "cindex")
    assert pc["n_patients"] == int(keep.sum())
    assert "| ct |" in md


def test_error_row_is_kept_and_shown_and_the_other_folds_are_averaged(root, tmp_path, monkeypatch):
    real = cv.run_classical

    def flaky(method, s, fold, seed):
        if fold.index == 1:
            raise RuntimeError("boom")
        return real(method, s, fold, seed)

    monkeypatch.setattr(cv, "run_classical", flaky)
    _, doc, md = _run(root, tmp_path, ["coxph"])
    e = doc["table"][0]
    assert e["error"] == "fold 1, seed 0: RuntimeError: boom" and e["folds"] == 2 and e["cindex"][2] == 2
    assert "| coxph | error: fold 1, seed 0: RuntimeError: boom |" in md


def test_a_failed_seed_leaves_its_fold_out_of_the_paired_comparison(root, tmp_path, fake, monkeypatch):
    real = cv.run_classical

    def flaky(method, s, fold, seed):
        if fold.index == 1 and seed == 1:
            raise RuntimeError("boom")
        return real(method, s, fold, seed)

    monkeypatch.setattr(cv, "run_classical", flaky)
    _, doc, _ = _run(root, tmp_path, ["fused", "coxph"], seeds=[0, 1], max_folds=2, bootstrap=20)
    assert {(p["b"], p["fold"]) for p in doc["paired"]} == {("coxph", 0)}
    assert next(e for e in doc["table"] if e["method"] == "coxph")["folds"] == 1


def test_refusals_before_any_training(root, tmp_path, fake):
    for bad in (-5, 1):
        with pytest.raises(ValueError, match="--bootstrap must be 0"):
            _run(root, tmp_path, ["fused"], bootstrap=bad)
    with pytest.raises(ValueError, match="repeats a seed"):
        _run(root, tmp_path, ["fused"], seeds=[3, 0, 3])
    with pytest.raises(ValueError, match="unknown method"):
        _run(root, tmp_path, ["fused", "svm"])
    with pytest.raises(ValueError, match="--label must be status or event"):
        _run(root, tmp_path, ["fused"], label="death")
    assert fake == [] and not (tmp_path / "cv").exists()
    _run(root, tmp_path, ["fused"], bootstrap=2, max_folds=1)  # 2 replicates are allowed


def test_default_methods_and_check_methods(sites, root, tmp_path):
    s = list(sites.values())
    assert cv.default_methods(s) == ["fused", "single:ct", "single:lab", "mlp", "-dce", "-gcs", "-alignment",
                                     "coxph", "rf"]
    unl = load_site(write_synthetic_site(tmp_path, "unl", 30, modalities=(("lab", "tabular", 4),), seed=5,
                                         n_folds=3, with_status=False))
    assert "rf" not in cv.default_methods([unl]) and "rf" in cv.default_methods([unl, s[0]])
    cv.check_methods(["fused", "single:ct", "ensemble:3", "coxph-pairwise", "coxph-agreement", "rf", "mlp"], s)
    for bad in ("single:slide", "ensemble:1", "ensemble:", "Fused", "rf2"):
        with pytest.raises(ValueError):
            cv.check_methods([bad], s)
    with pytest.raises(ValueError, match="rf"):
        cv.check_methods(["rf"], [unl])
    one = s[0]
    mono = one.__class__(**{**one.__dict__, "status": np.where(one.status >= 0, 1, -1).astype(np.int8)})
    assert (mono.status < 0).any()  # labelled patients of one class, and unlabelled ones
    with pytest.raises(ValueError, match="do not have both classes"):
        cv.check_methods(["rf"], [mono])


def test_ensemble_size():
    assert cv.ensemble_size("ensemble:2") == 2 and cv.ensemble_size("ensemble:10") == 10
    assert cv.ensemble_size("fused") is None
    for bad in ("ensemble:1", "ensemble:0", "ensemble:-2", "ensemble:2.5", "ensemble:x"):
        with pytest.raises(ValueError, match="N >= 2"):
            cv.ensemble_size(bad)


def test_average_members():
    m = [({"a": np.array([0.0, 2.0])}, {"a": np.array([0.1, 0.4])}, {"best_epoch": 2, "seconds": 1.0}),
         ({"a": np.array([1.0, 0.0])}, {"a": np.array([0.2, 0.0])}, {"best_epoch": 9, "seconds": 2.0}),
         ({"a": np.array([5.0, 1.0])}, {"a": np.array([0.6, 0.2])}, {"best_epoch": 3, "seconds": 0.5})]
    risk, prob, info = cv.average_members(m, 5)
    np.testing.assert_allclose(risk["a"], [2.0, 1.0])  # the mean, not the median (1.0, 1.0)
    np.testing.assert_allclose(prob["a"], [0.3, 0.2])
    assert info["best_epoch"] == 3.0 and info["member_best_epochs"] == [2, 9, 3]
    assert info["member_seeds"] == [5, 6, 7] and info["seconds"] == pytest.approx(3.5)
    m[1][1]["a"] = None
    assert cv.average_members(m, 0)[1]["a"] is None


def test_ensemble_members_use_consecutive_seeds(monkeypatch, sites):
    seen = []
    monkeypatch.setattr(cv, "run_neural", lambda s, f, c, seed: seen.append(seed) or ({}, {}, {}))
    cv.ensemble_members(sites, None, None, 4, 3)
    assert seen == [4, 5, 6]


# ---------------------------------------------------------------- folds, relabelling, restriction

def test_make_folds_a_site_with_fewer_folds_trains_on_all_its_patients(root):
    one, four = load_site(root / "one"), load_site(root / "four")
    folds = cv.make_folds([one, four], "fold_cv")
    assert [f.index for f in folds] == [0, 1, 2, 3]
    np.testing.assert_array_equal(folds[3].train["one"], np.arange(len(one)))
    assert len(folds[3].test["one"]) == 0 and len(folds[3].test["four"]) > 0
    for i in range(3):
        np.testing.assert_array_equal(folds[i].test["one"], one.splits("fold_cv")[i].test)
        np.testing.assert_array_equal(folds[i].train["one"], one.splits("fold_cv")[i].train)
    with pytest.raises(ValueError):
        cv.make_folds([one, load_site(root / "one")], "fold_cv")  # two folders, one site name


def test_make_folds_refuses_a_site_with_test_patients_and_one_training_patient(root, monkeypatch):
    import dataclasses

    one = load_site(root / "one")
    real = one.splits

    def few(column):
        sp = real(column)
        sp[1] = dataclasses.replace(sp[1], train=sp[1].train[:1])
        return sp

    object.__setattr__(one, "splits", few)
    with pytest.raises(ValueError, match="fold 1: site 'one' has .* but 1 training"):
        cv.make_folds([one], "fold_cv")
    sp = real("fold_cv")

    def two_train(column):
        s = real(column)
        s[1] = dataclasses.replace(s[1], train=s[1].train[:2])
        return s

    object.__setattr__(one, "splits", two_train)
    assert len(cv.make_folds([one], "fold_cv")) == len(sp)  # 2 training patients are enough


def test_select_folds_keeps_fold_order(sites):
    folds = cv.make_folds(list(sites.values()), "fold_cv")
    assert [f.index for f in cv.select_folds(folds, [2, 0, 2], "fold_cv")] == [0, 2]
    with pytest.raises(ValueError, match=r"\[3, 9\]"):
        cv.select_folds(folds, [0, 9, 3], "fold_cv")


def test_relabel(sites):
    one = sites["one"]
    assert cv.relabel(one, "status") is one
    ev = cv.relabel(one, "event")
    np.testing.assert_array_equal(ev.status, one.event) and ev.status.dtype == np.int8
    assert not np.array_equal(one.status, one.event)  # the fixture's status label differs
    with pytest.raises(ValueError):
        cv.relabel(one, "Event")


def test_restrict_and_remap(sites):
    one = sites["one"]
    sub = cv.restrict(one, "ct")
    has = one.modalities["ct"].present
    assert list(sub.patient_ids) == list(one.patient_ids[has]) and sub.spec.modality_names == ("ct",)
    assert cv.restrict(one, "lab").spec.modality_names == ("lab",)
    f = cv.make_folds([one], "fold_cv")[0]
    rf = cv._remap_fold(f, {"one": one}, {"one": sub})
    np.testing.assert_array_equal(sub.patient_ids[rf.test["one"]], one.patient_ids[f.test["one"][has[f.test["one"]]]])
    np.testing.assert_array_equal(sub.patient_ids[rf.train["one"]], one.patient_ids[f.train["one"][has[f.train["one"]]]])
    sc = cv._single_scored({"one": one, "two": sites["two"]}, f if "two" in f.test else
                           cv.make_folds(list(sites.values()), "fold_cv")[0], ["fused", "single:ct", "single:lab"])
    assert set(sc) == {"single:ct", "single:lab"} and set(sc["single:ct"]) == {"one"}
    f2 = cv.make_folds(list(sites.values()), "fold_cv")[0]
    np.testing.assert_array_equal(sc["single:ct"]["one"], has[f2.test["one"]])


# ---------------------------------------------------------------- metrics of one fold

def test_fold_metrics_auc_leaves_out_unlabelled_and_prob_less_sites(sites):
    f = cv.make_folds(list(sites.values()), "fold_cv")[0]
    rng = np.random.default_rng(3)
    risk = {s: rng.normal(size=len(f.test[s])) for s in sites}
    prob = {s: rng.random(len(f.test[s])) for s in sites}
    out = cv.fold_metrics(sites, f.test, risk, prob)
    st = np.concatenate([sites[s].status[f.test[s]] for s in sites])
    assert (st < 0).any()  # some unlabelled test patients
    p = np.concatenate([prob[s] for s in sites])
    assert out["auc"] == pytest.approx(binary_auc(st[st >= 0], p[st >= 0]))
    only_one = cv.fold_metrics(sites, f.test, risk, {"one": prob["one"], "two": None})
    s1 = sites["one"].status[f.test["one"]]
    assert only_one["auc"] == pytest.approx(binary_auc(s1[s1 >= 0], prob["one"][s1 >= 0]))
    assert cv.fold_metrics(sites, f.test, risk, {"one": None, "two": None})["auc"] is None
    # a site without predictions is not counted
    alone = cv.fold_metrics(sites, f.test, {"one": risk["one"]}, {"one": prob["one"]})
    assert alone["n_test"] == len(f.test["one"]) and alone["cindex"] == pytest.approx(alone["cindex_sites"])
    # one status class among the labelled patients: no AUC, not an error
    lab = {s: np.where(sites[s].status[f.test[s]] >= 0, 1, -1) for s in sites}
    fake = {s: sites[s].__class__(**{**sites[s].__dict__, "status": sites[s].status.copy()}) for s in sites}
    for s in sites:
        fake[s].status[f.test[s]] = lab[s]
    assert cv.fold_metrics(fake, f.test, risk, prob)["auc"] is None


def test_subset_metrics_keep_probabilities_aligned(sites):
    one = sites["one"]
    rows = np.arange(len(one))
    rng = np.random.default_rng(0)
    risk, prob = {"one": rng.normal(size=len(one))}, {"one": rng.random(len(one))}
    sub = cv._subset_metrics({"one": one}, {"one": rows}, risk, prob)
    has = one.modalities["ct"].present
    st = one.status[has]
    assert sub["ct"]["auc"] == pytest.approx(binary_auc(st[st >= 0], prob["one"][has][st >= 0]))


def test_oracle_metrics_and_part_reading_leave_real_sites_out(sites):
    f = cv.make_folds(list(sites.values()), "fold_cv")[0]
    out = cv.oracle_metrics(sites, f.test, ["one", "two"])
    o = {s: (sites[s].time[f.test[s]], sites[s].event[f.test[s]], sites[s].observable_oracle_risk()[f.test[s]])
         for s in sites}
    assert out["observable_oracle_cindex"] == pytest.approx(site_cindices(o)["cindex"])
    real = dict(sites)
    real["two"] = sites["two"].__class__(**{**sites["two"].__dict__, "oracle_risk": None})
    assert "oracle_cindex" not in cv.oracle_metrics(real, f.test, ["one", "two"])
    assert cv.oracle_metrics(sites, f.test, []) == {}


def test_cindex_sites_is_the_mean_of_the_sites_c(root):
    three = {n: load_site(root / n) for n in ("one", "two", "four")}
    test = {n: np.arange(len(s)) for n, s in three.items()}
    rng = np.random.default_rng(5)
    risk = {n: s.oracle_risk + rng.normal(0, 1.0 + i, len(s)) for i, (n, s) in enumerate(three.items())}
    out = cv.fold_metrics(three, test, risk, {n: None for n in three})
    per = [site_cindices({n: (s.time, s.event, risk[n])})["cindex"] for n, s in three.items()]
    assert np.mean(per) != pytest.approx(np.median(per))
    assert out["cindex_sites"] == pytest.approx(np.mean(per))


# ---------------------------------------------------------------- training parts, classical baselines

def test_run_neural_scores_exactly_the_fold_test_patients(sites, monkeypatch):
    from shared_model.config import load_config

    seen = []
    real = cv.predict_rows
    monkeypatch.setattr(cv, "predict_rows", lambda model, t, rows: seen.append((t.site.name, np.asarray(rows).copy()))
                        or real(model, t, rows))
    cfg = load_config(None, {"model.d_inter": 16, "model.d_token": 8, "model.hazard_hidden": 16, "model.dce_dim": 8,
                             "model.n_heads": 2, "train.batch_size": 8, "train.epochs": 1, "train.min_epochs": 1,
                             "train.num_threads": 1})
    f = cv.make_folds(list(sites.values()), "fold_cv")[2]
    risk, prob, info = cv.run_neural(sites, f, cfg, 0)
    assert [n for n, _ in seen] == ["one", "two"]
    for n, rows in seen:
        np.testing.assert_array_equal(rows, f.test[n])
        assert len(risk[n]) == len(prob[n]) == len(f.test[n])
    assert info["best_epoch"] >= 1 and set(info) >= {"epochs_run", "selection", "val_score", "seconds"}


def test_training_parts_carve_validation_from_training_patients_and_skip_sites_without_two(sites, root):
    from shared_model.config import load_config

    import dataclasses

    f = cv.make_folds(list(sites.values()), "fold_cv")[0]
    cfg = load_config()
    specs, parts, tensors = cv.training_parts(sites, f, cfg, 3)
    assert [p.tensors.site.name for p in parts] == ["one", "two"] and set(tensors) == {"one", "two"}
    for p in parts:
        s = p.tensors.site.name
        fit, val = cv.carve_validation(sites[s].event, f.train[s], cfg.train.val_fraction, 3, status=sites[s].status)
        np.testing.assert_array_equal(p.train_idx, fit)
        np.testing.assert_array_equal(p.val_idx, val)
        assert len(val) and set(val) <= set(f.train[s]) and not set(val) & set(f.test[s])
    g = dataclasses.replace(f, train={**f.train, "two": f.train["two"][:1]})
    specs, parts, tensors = cv.training_parts(sites, g, cfg, 3)
    assert [p.tensors.site.name for p in parts] == ["one"]


def test_training_parts_standardise_with_training_patients(sites, monkeypatch):
    from shared_model.config import load_config

    seen = []
    real = cv.SiteTensors.for_training

    def spy(site, specs, rows, *a, **k):
        seen.append((site.name, np.asarray(rows).copy()))
        return real(site, specs, rows, *a, **k)

    monkeypatch.setattr(cv.SiteTensors, "for_training", staticmethod(spy))
    f = cv.make_folds(list(sites.values()), "fold_cv")[1]
    cv.training_parts(sites, f, load_config(), 0)
    for name, rows in seen:
        np.testing.assert_array_equal(rows, f.train[name])


def test_classical_baselines_fit_on_training_patients_only(sites, monkeypatch):
    f = cv.make_folds(list(sites.values()), "fold_cv")[0]
    seen = {}
    real_cox, real_rf = cv.fit_coxph, cv.fit_random_forest

    def spy_cox(x, t, e, strata=None, **kw):
        seen["cox"] = (len(x), t.copy(), list(strata))
        return real_cox(x, t, e, strata=strata, **kw)

    def spy_rf(x, y, seed=0, **kw):
        seen["rf"] = (len(x), y.copy(), seed)
        return real_rf(x, y, seed=seed, **kw)

    monkeypatch.setattr(cv, "fit_coxph", spy_cox)
    monkeypatch.setattr(cv, "fit_random_forest", spy_rf)
    risk, prob, _ = cv.run_classical("coxph", sites, f, 0)
    n, t, strata = seen["cox"]
    assert n == sum(len(f.train[s]) for s in sites)
    np.testing.assert_array_equal(t, np.concatenate([sites[s].time[f.train[s]] for s in sites]))
    assert strata == ["one"] * len(f.train["one"]) + ["two"] * len(f.train["two"])
    for s in sites:
        assert len(risk[s]) == len(f.test[s])
        np.testing.assert_allclose(prob[s], 1 / (1 + np.exp(-risk[s])))
    risk, prob, _ = cv.run_classical("rf", sites, f, 7)
    n, y, seed = seen["rf"]
    y_all = np.concatenate([sites[s].status[f.train[s]] for s in sites])
    assert seed == 7 and n == int((y_all >= 0).sum()) and (y >= 0).all()
    for s in sites:
        np.testing.assert_array_equal(risk[s], prob[s])
        assert len(risk[s]) == len(f.test[s])
    with pytest.raises(ValueError, match="unknown method"):
        cv.run_classical("svm", sites, f, 0)


def test_coxph_agreement_adds_the_agreement_column(root, monkeypatch):
    site = load_site(root / "pair")
    f = cv.make_folds([site], "fold_cv")[0]
    widths = []
    real = cv.fit_coxph
    monkeypatch.setattr(cv, "fit_coxph", lambda x, t, e, strata=None, **kw: widths.append(x.shape[1])
                        or real(x, t, e, strata=strata, **kw))
    plain = cv.run_classical("coxph", {"pair": site}, f, 0)[0]["pair"]
    agree = cv.run_classical("coxph-agreement", {"pair": site}, f, 0)[0]["pair"]
    assert widths[1] == widths[0] + 1 and not np.allclose(plain, agree)


def test_rf_refuses_one_status_class_in_the_training_folds(sites):
    f = cv.make_folds(list(sites.values()), "fold_cv")[0]
    one = sites["one"]
    st = one.status.copy()
    st[f.train["one"]] = np.where(st[f.train["one"]] >= 0, 1, -1)
    mono = {"one": one.__class__(**{**one.__dict__, "status": st})}
    with pytest.raises(ValueError, match="both classes"):
        cv.run_classical("rf", mono, cv.FoldSpec(0, {"one": f.train["one"]}, {"one": f.test["one"]}), 0)


def test_training_seed_problem():
    assert cv.training_seed_problem(None, {}) is None
    assert cv.training_seed_problem(None, {"train.lr": "0.1"}) is None
    assert "train.seed" in cv.training_seed_problem(None, {"train.seed": "1"})


# ---------------------------------------------------------------- summarise / write_results on given rows

def _rows():
    rows = []
    vals = {0: (0.6, 0.7), 1: (0.8, 0.8), 2: (0.5, None)}
    for f, (a, b) in vals.items():
        for sd, c in ((0, a), (1, b)):
            rows.append({"method": "fused", "fold": f, "seed": sd, "cindex": c, "auc": c and c - 0.1,
                         "reads": {"ct": c or 0.0},
                         "same_patients": {"ct": {"cindex": (c or 0.5) + 0.01, "auc": None}}})
        rows.append({"method": "single:ct", "fold": f, "seed": 0, "cindex": 0.55 + 0.1 * f, "auc": None})
        rows.append({"method": "single:ct", "fold": f, "seed": 1, "cindex": 0.65 + 0.1 * f, "auc": None})
    return rows


def test_mean_over_seeds_then_over_folds():
    merged = {(r["method"], r["fold"]): r for r in cv.mean_over_seeds(_rows())}
    assert merged[("fused", 0)]["cindex"] == pytest.approx(0.65) and merged[("fused", 0)]["seeds"] == [0, 1]
    assert merged[("fused", 2)]["cindex"] == pytest.approx(0.5)  # None is left out, not 0
    assert merged[("fused", 2)]["seed_std_cindex"] is None
    assert merged[("fused", 0)]["seed_std_cindex"] == pytest.approx(0.05)
    assert merged[("fused", 0)]["reads"]["ct"] == pytest.approx(0.65)
    assert merged[("fused", 0)]["same_patients"]["ct"]["cindex"] == pytest.approx(0.66)
    assert [k for k in merged] == sorted(merged)
    _, table = cv.summarise(_rows(), ["single:ct", "fused"], {})
    assert [e["method"] for e in table] == ["single:ct", "fused"]
    fused = table[1]
    per_fold = [0.65, 0.8, 0.5]
    assert fused["cindex"] == pytest.approx((np.mean(per_fold), np.std(per_fold), 3))
    assert fused["seed_std_cindex"] == pytest.approx(np.mean([0.05, 0.0]))
    assert fused["reads"]["ct"][0] == pytest.approx(np.mean([0.65, 0.8, 0.25]))
    single = table[0]
    assert single["cindex"] == pytest.approx((0.7, np.std([0.6, 0.7, 0.8]), 3))
    assert single["fused_same_patients"]["cindex"][0] == pytest.approx(np.mean([0.66, 0.81, 0.51]))
    # one seed of a fold failed: the fold is an error in the table
    rows = _rows() + [{"method": "fused", "fold": 3, "seed": 0, "cindex": 0.9},
                      {"method": "fused", "fold": 3, "seed": 1, "error": "fold 3, seed 1: boom"}]
    _, table = cv.summarise(rows, ["fused"], {})
    assert table[0]["folds"] == 3 and table[0]["error"] == "fold 3, seed 1: boom"


def test_write_results_markdown_and_json(tmp_path):
    rows = [{"method": "fused", "fold": f, "seed": 0, "cindex": c, "auc": None} for f, c in ((0, 0.6), (1, 0.7))]
    rows.append({"method": "coxph", "fold": 0, "seed": 0, "cindex": 0.612, "auc": 0.7})
    result = {"sites": ["a"], "simulated": [], "folds_column": "fold_cv", "folds": [0, 1], "label": "status",
              "seed": 0, "seeds": [0], "methods": ["fused", "coxph"], "rows": rows, "protocol": None}
    text = cv.write_results(result, tmp_path / "o", notes=["NOTE LINE", ""])
    md = (tmp_path / "o" / "results.md").read_text()
    assert md == text and "NOTE LINE" in md and "**Simulated data:**" not in md
    assert "| fused | 0.650 ± 0.050 |" in md
    assert "| coxph | 0.612 | — |" in md  # one fold: no ± ; undefined: a dash
    assert "training seeds" not in md and "seed 0" in md
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [e["method"] for e in doc["table"]] == ["fused", "coxph"] and "paired_table" in doc
    assert doc["rows"] == rows


# ---------------------------------------------------------------- cv-merge

def _write_run(tmp_path, name, rows, **over):
    data = {"sites": ["s"], "simulated": [], "folds_column": "fold_cv", "folds": sorted({r["fold"] for r in rows}),
            "label": "event", "seed": 0, "seeds": [0], "methods": sorted({r["method"] for r in rows}),
            "rows": rows, "protocol": None, "paired": [], "config": {"train": {"lr": 0.1, "num_threads": 1}}}
    data.update(over)
    (tmp_path / name).mkdir()
    (tmp_path / name / "results.json").write_text(json.dumps(data))
    return tmp_path / name


def _r(method, fold, c, seed=0):
    return {"method": method, "fold": fold, "seed": seed, "cindex": c, "auc": None}


def test_cv_merge_later_input_wins_and_the_table_is_over_the_merged_folds(tmp_path):
    from simulations.cv_merge import merge_results

    a = _write_run(tmp_path, "a", [_r("fused", 0, 0.6), _r("fused", 1, 0.7)])
    b = _write_run(tmp_path, "b", [_r("fused", 1, 0.9), _r("fused", 2, 0.5)])
    logs = []
    res = merge_results([a, b], tmp_path / "m", log=logs.append)
    assert res["folds"] == [0, 1, 2] and res["seeds"] == [0] and res["seed"] == 0
    src = {r["fold"]: r["source"] for r in res["rows"]}
    assert src == {0: str(a / "results.json"), 1: str(b / "results.json"), 2: str(b / "results.json")}
    assert res["table"][0]["cindex"] == pytest.approx((np.mean([0.6, 0.9, 0.5]), np.std([0.6, 0.9, 0.5]), 3))
    assert any("replaced by" in m for m in logs)
    assert [i["file"] for i in res["inputs"]] == [str(a / "results.json"), str(b / "results.json")]
    md = (tmp_path / "m" / "results.md").read_text()
    assert "Not every method" not in md and "from 2 runs" in md


def test_cv_merge_seeds_and_uneven_runs(tmp_path):
    from simulations.cv_merge import merge_results

    a = _write_run(tmp_path, "a", [_r("fused", 0, 0.6, 3), _r("fused", 1, 0.7, 3), _r("coxph", 0, 0.5, 3)],
                   seed=3, seeds=[3])
    old = _write_run(tmp_path, "old", [{"method": "fused", "fold": 0, "cindex": 0.8, "auc": None}], seed=5)
    res = merge_results([a, old], tmp_path / "m", log=lambda _: None)
    assert res["seeds"] == [3, 5] and res["seed"] == 3
    assert {(r["method"], r["fold"], r["seed"]) for r in res["rows"]} == {
        ("fused", 0, 3), ("fused", 1, 3), ("coxph", 0, 3), ("fused", 0, 5)}
    md = (tmp_path / "m" / "results.md").read_text()
    assert "**Not every method ran on every fold and seed:**" in md and "'coxph': 1" in md and "'fused': 3" in md
    fused = next(e for e in res["table"] if e["method"] == "fused")
    assert fused["cindex"][0] == pytest.approx(np.mean([0.7, 0.7]))


@pytest.mark.parametrize("key,value", [("sites", ["t"]), ("folds_column", "fold_x"), ("label", "status"),
                                       ("protocol", "other")])
def test_cv_merge_refuses_runs_of_another_experiment(tmp_path, key, value):
    from simulations.cv_merge import merge_results

    a = _write_run(tmp_path, "a", [_r("fused", 0, 0.6)], protocol="p")
    b = _write_run(tmp_path, "b", [_r("fused", 1, 0.6)], **{"protocol": "p", key: value})
    with pytest.raises(ValueError, match=key if key != "protocol" else "protocol"):
        merge_results([a, b], tmp_path / "m", log=lambda _: None)
    assert not (tmp_path / "m").exists()


def test_cv_merge_config_check_ignores_hardware_only(tmp_path):
    from simulations.cv_merge import config_differences, merge_results

    assert config_differences({"train": {"lr": 1, "num_threads": 1, "device": "cpu"}},
                              {"train": {"lr": 1, "num_threads": 8, "device": "cuda"}}) == []
    assert config_differences({"train": {"lr": 1}}, {"train": {"lr": 2}, "model": {"x": 1}}) == ["model.x", "train.lr"]
    a = _write_run(tmp_path, "a", [_r("fused", 0, 0.6)])
    b = _write_run(tmp_path, "b", [_r("fused", 1, 0.6)], config={"train": {"lr": 0.2, "num_threads": 1}})
    with pytest.raises(ValueError, match="different settings"):
        merge_results([a, b], tmp_path / "m", log=lambda _: None)


def test_cv_merge_refuses_what_is_not_a_cv_result(tmp_path):
    from simulations.cv_merge import merge_results

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        merge_results([tmp_path / "bad"], tmp_path / "m")
    (tmp_path / "part.json").write_text(json.dumps({"sites": [], "folds_column": "x", "label": "event"}))
    with pytest.raises(ValueError, match=r"lacks \['rows'\]"):
        merge_results([tmp_path / "part.json"], tmp_path / "m")
    with pytest.raises(ValueError, match="at least one"):
        merge_results([], tmp_path / "m")
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------- model_choice

def test_model_choice_hold_out_is_fixed_by_the_fold_not_the_seed(sites, monkeypatch):
    import simulations.model_choice as mc

    f = cv.make_folds(list(sites.values()), "fold_cv")[1]
    seen = []
    real = mc.run_classical

    def spy(method, s, fold, seed):
        seen.append((method, seed, {k: v.copy() for k, v in fold.train.items()}, {k: v.copy() for k, v in fold.test.items()}))
        return real(method, s, fold, seed)

    monkeypatch.setattr(mc, "run_classical", spy)
    r0 = mc.score_fold(sites, f, overrides={}, holdout=0.25, seed=0, method="coxph")
    r1 = mc.score_fold(sites, f, overrides={}, holdout=0.25, seed=9, method="rf")
    (_, s0, tr0, te0), (_, s1, tr1, te1) = seen
    assert (s0, s1) == (0, 9)
    for s in sites:
        inner, held = mc.carve_validation(sites[s].event, f.train[s], 0.25, mc.HOLDOUT_SEED)
        np.testing.assert_array_equal(te0[s], held) and np.testing.assert_array_equal(te1[s], held)
        np.testing.assert_array_equal(tr0[s], inner)
        assert not set(held) & set(f.test[s]) and not set(inner) & set(held)
        assert abs(len(held) - 0.25 * len(f.train[s])) <= 2
    held = {s: te0[s] for s in sites}
    assert r0["holdout_cindex"] is not None and r0["fold"] == 1 and r0["method"] == "coxph"
    assert r1["holdout_auc"] is not None
    assert r0["oracle_cindex"] == pytest.approx(site_cindices(
        {s: (sites[s].time[held[s]], sites[s].event[held[s]], sites[s].oracle_risk[held[s]]) for s in sites})["cindex"])


def test_model_choice_leaves_out_a_site_with_fewer_than_four_training_patients(sites, monkeypatch):
    import simulations.model_choice as mc

    f = cv.make_folds(list(sites.values()), "fold_cv")[0]
    g = cv.FoldSpec(0, {"one": f.train["one"], "two": f.train["two"][:3]}, f.test)
    row = mc.score_fold(sites, g, overrides={}, holdout=0.25, seed=0, method="coxph")
    inner, held = mc.carve_validation(sites["one"].event, f.train["one"], 0.25, mc.HOLDOUT_SEED)
    risk, _, _ = cv.run_classical("coxph", {"one": sites["one"]}, cv.FoldSpec(0, {"one": inner}, {"one": held}), 0)
    want = site_cindices({"one": (sites["one"].time[held], sites["one"].event[held], risk["one"])})["cindex"]
    assert row["holdout_cindex"] == pytest.approx(want)
    g4 = cv.FoldSpec(0, {"one": f.train["one"], "two": f.train["two"][:4]}, f.test)
    row4 = mc.score_fold(sites, g4, overrides={}, holdout=0.25, seed=0, method="coxph")
    assert row4["holdout_cindex"] != pytest.approx(want)  # 4 training patients: the site is scored


def test_model_choice_method_problem():
    import simulations.model_choice as mc

    assert mc.method_problem("fused") is None and mc.method_problem("coxph-pairwise") is None
    assert mc.method_problem("ensemble:3") is None and "unknown method" in mc.method_problem("mlp")


def test_model_choice_summary_is_mean_and_std_over_folds(root, capsys, monkeypatch):
    import simulations.model_choice as mc

    vals = iter([(0.6, 0.7), (0.8, None), (0.7, 0.5)])

    def fake(sites, fold, **kw):
        c, a = next(vals)
        return {"fold": fold.index, "holdout_cindex": c, "holdout_auc": a, "observable_oracle_cindex": 0.9}

    monkeypatch.setattr(mc, "score_fold", fake)
    assert mc.main(["--sites-dir", str(root), "--sites", "one", "--folds", "fold_cv", "--method", "coxph"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"hold-out C (within sites) {np.mean([0.6, 0.8, 0.7]):.3f} ± {np.std([0.6, 0.8, 0.7]):.3f}" in last
    assert f"status AUC {np.mean([0.7, 0.5]):.3f} ± {np.std([0.7, 0.5]):.3f}" in last
    assert "over folds [0, 1, 2]" in last
    with pytest.raises(SystemExit):
        mc.main(["--sites-dir", str(root), "--sites", "one", "--folds", "fold_cv", "--set", "train.seed=3"])


# ---------------------------------------------------------------- validation_curve

def test_curves_mean_over_folds_and_best_epoch(sites, monkeypatch):
    import simulations.validation_curve as vc

    per = {0: [0.5, 0.6, 0.7, 0.65], 1: [0.5, 0.7, 0.6, 0.6], 2: [0.4, 0.8, 0.7, 0.5]}
    monkeypatch.setattr(vc, "fold_curve", lambda s, f, cfg, epochs, seed: {"fold": f.index, "metric": "cindex",
                                                                           "val": per[f.index], "train_loss": []})
    folds = cv.make_folds(list(sites.values()), "fold_cv")
    out = vc.curves(sites, folds, None, 3, 4, log=lambda _: None)
    mean = np.mean(list(per.values()), axis=0)
    assert out["mean"] == pytest.approx(mean.tolist()) and out["best_epoch"] == 1
    assert out["seed"] == 4 and out["epochs"] == 3 and [f["fold"] for f in out["folds"]] == [0, 1, 2]


def test_fold_curve_refuses_a_fold_without_validation_rows(sites):
    from shared_model.config import load_config
    import simulations.validation_curve as vc

    f = cv.make_folds(list(sites.values()), "fold_cv")[0]
    with pytest.raises(ValueError, match="no validation rows"):
        vc.fold_curve(sites, f, load_config(None, {"train.val_fraction": 0.0}), 2, 0)


def test_fold_curve_never_stops_early(sites, monkeypatch):
    from shared_model.config import load_config
    import simulations.validation_curve as vc

    seen = {}

    def fake_train(model, parts, cfg, epochs, seed):
        seen.update(cfg=cfg, epochs=epochs, seed=seed)
        raise RuntimeError("stop here")

    monkeypatch.setattr(vc, "train_local", fake_train)
    monkeypatch.setattr(vc, "validation_score", lambda model, parts, metric: ("cindex", 0.5))
    cfg = load_config(None, {"model.d_inter": 16, "model.d_token": 8, "model.hazard_hidden": 16, "model.dce_dim": 8,
                             "model.n_heads": 2, "train.min_epochs": 5, "train.early_stopping_patience": 2})
    with pytest.raises(RuntimeError, match="stop here"):
        vc.fold_curve(sites, cv.make_folds(list(sites.values()), "fold_cv")[0], cfg, 7, 3)
    assert seen["epochs"] == 7 and seen["seed"] == 3
    assert seen["cfg"].early_stopping_patience > 7 and seen["cfg"].min_epochs <= 1


@pytest.mark.parametrize("holdout", [0.0, -0.2, 1.0, 1.5])
def test_model_choice_refuses_a_holdout_that_is_not_a_fraction(root, sites, capsys, holdout):
    """0 or less left no hold-out (a 'nan ± nan' line, exit 0); 1 or more trained on one patient per stratum."""
    import simulations.model_choice as mc

    fold = cv.make_folds(list(sites.values()), "fold_cv")[0]
    with pytest.raises(ValueError, match="--holdout must be a fraction strictly between 0 and 1"):
        mc.score_fold(sites, fold, overrides={}, holdout=holdout, seed=0, method="coxph")
    with pytest.raises(SystemExit) as exit_:
        mc.main(["--sites-dir", str(root), "--sites", "one", "--folds", "fold_cv", "--method", "coxph",
                 "--holdout", str(holdout)])
    assert exit_.value.code == 2 and "--holdout must be a fraction" in capsys.readouterr().err


def test_model_choice_exits_1_when_no_fold_has_a_hold_out_c_index(root, capsys, monkeypatch):
    import simulations.model_choice as mc

    monkeypatch.setattr(mc, "score_fold", lambda sites, fold, **kw: {
        "fold": fold.index, "holdout_cindex": None, "holdout_auc": None, "observable_oracle_cindex": None})
    assert mc.main(["--sites-dir", str(root), "--sites", "one", "--folds", "fold_cv", "--method", "coxph"]) == 1
    out = capsys.readouterr()
    assert "nan" not in out.out and "hold-out C-index is undefined on every fold [0, 1, 2]" in out.err
