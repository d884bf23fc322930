"""The five built-in sites: real counts, folds, oracle C-index of the simulated sites."""

from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from lifelines.utils import concordance_index

from shared_model.batch import SiteTensors
from sites import load_site, union_specs, validate_site
from sites import hancock
from sites.builtin import BUILTIN_SITES, build_site, site_config
from sites.cptac_tcga import LABELS_DIR, content_from_labels, missing_pattern, read_labels
from sites.hancock import STAINS, one_hot_nominal, stratified_folds
from sites.simulate import latent_risk
from sites.types import SiteData
from sites_fixtures import builtin_root, builtin_sites  # noqa: F401  (pytest fixtures)

SIMULATED = ("cptac-pda", "cptac-ucec", "cptac-ccrcc", "tcga-kirc")

#: Oracle Harrell C-index (lifelines, eta vs the real time/event) of each simulated site,
#: seed 0: the best C-index a model reading these embeddings could reach.
ORACLE_C = {"cptac-pda": 0.8500, "cptac-ucec": 0.8493, "cptac-ccrcc": 0.8485, "tcga-kirc": 0.8502}
#: Harrell C of E[eta | the parts the patients' observed modalities reveal, the site] (seed
#: 0, default missingness): the ceiling of any model given what the patients have.
OBSERVABLE_ORACLE_C = {"cptac-pda": 0.8248, "cptac-ucec": 0.8428, "cptac-ccrcc": 0.8485,
                       "tcga-kirc": 0.8571}
#: (patients, events, PARACHUTE folds, patients without radiology, without pathology) at seed 0
COHORTS = {
    "cptac-pda": (96, 70, 5, 14, 0),
    "cptac-ucec": (34, 29, 4, 0, 3),
    "cptac-ccrcc": (42, 4, 5, 2, 2),
    "tcga-kirc": (50, 18, 5, 15, 0),
}


def test_all_five_sites_are_valid(builtin_root: Path) -> None:
    assert sorted(p.name for p in builtin_root.iterdir()) == sorted(BUILTIN_SITES)
    for name in BUILTIN_SITES:
        assert validate_site(builtin_root / name) == [], name


def test_hancock_counts(builtin_sites: dict[str, SiteData]) -> None:
    h = builtin_sites["hancock"]
    assert len(h) == 763
    assert int(h.event.sum()) == 213  # every death is a survival event
    coverage = {k: int(v.present.sum()) for k, v in h.modalities.items()}
    assert coverage == {"clinical": 763, "pathological": 763, "blood": 692, "icd": 712,
                        "tma_cell_density": 736, "tma_texture": 760}
    # status: living 550 -> 0; tumour-specific 115 + cause unknown 9 -> 1; 89 not tumour-specific -> unlabelled
    assert (h.status == 0).sum() == 550 and (h.status == 1).sum() == 124 and (h.status == -1).sum() == 89
    assert (h.event[h.status == -1] == 1).all()  # ... but they are deaths for the survival task
    assert h.oracle_risk is None and not h.spec.simulated
    assert h.time.min() >= 0


def test_hancock_tma_texture_bag(builtin_sites: dict[str, SiteData]) -> None:
    tex = builtin_sites["hancock"].modalities["tma_texture"]
    assert tex.spec.kind == "bag" and tex.spec.dim == 520
    counts = tex.n_tokens()[tex.present]
    assert set(np.unique(counts)) == {7, 8}  # 743 patients with 8 stains, 17 with 7
    assert (counts == 8).sum() == 743
    one_hot = tex.values[:, 512:]
    assert ((one_hot == 0) | (one_hot == 1)).all() and (one_hot.sum(axis=1) == 1).all()
    i = int(np.flatnonzero(tex.present)[0])
    bag = tex.tokens(i)
    assert list(bag[:, 512:].argmax(axis=1)) == sorted(bag[:, 512:].argmax(axis=1))  # stain order
    with np.load(Path(__file__).parents[1] / "sites/data/hancock/tma_tile_dtr_256_CD163.npz") as z:
        pid = str(builtin_sites["hancock"].patient_ids[i])
        np.testing.assert_array_equal(bag[0, :512], z[pid])  # first stain = CD163, real values
    assert STAINS[0] == "CD163"


def test_hancock_folds(builtin_sites: dict[str, SiteData]) -> None:
    h = builtin_sites["hancock"]
    official = h.splits("split_official")[0]
    assert len(official.train) == 611 and len(official.test) == 152
    assert not set(official.train) & set(official.test)
    cv = h.splits("fold_cv10")
    assert len(cv) == 10
    tests = np.concatenate([s.test for s in cv])
    assert sorted(tests) == list(range(763))  # every patient tested exactly once
    for s in cv:
        assert not set(s.train) & set(s.test)
        assert len(s.test) in (76, 77)
    cause = pd.read_csv(Path(__file__).parents[1] / "sites/data/hancock/targets.csv",
                        dtype={"patient_id": str})["survival_status_with_cause"].to_numpy()
    fold = h.folds["fold_cv10"]
    for c in np.unique(cause):  # stratified on the cause-of-death classes
        per_fold = np.bincount(fold[cause == c], minlength=10)
        assert per_fold.max() - per_fold.min() <= 1, c


def test_hancock_one_hot_keeps_nan() -> None:
    df = pd.DataFrame({"grading": [0, 2, np.nan, 2], "age": [50, 60, 70, 80]})
    out = one_hot_nominal(df, ("grading",))
    assert list(out.columns) == ["grading=0", "grading=2", "age"]
    assert np.isnan(out.loc[2, ["grading=0", "grading=2"]].to_numpy(float)).all()
    assert out.loc[1, "grading=2"] == 1 and out.loc[1, "grading=0"] == 0


def test_hancock_nominal_columns_are_one_hot(builtin_sites: dict[str, SiteData]) -> None:
    h = builtin_sites["hancock"]
    cols = h.modalities["pathological"].spec.columns
    assert "histologic_type" not in cols and "histologic_type=8" in cols
    assert "pT_stage" in cols and "pN_stage" in cols  # ordinal: stays numeric
    path = h.modalities["pathological"]
    j = [k for k, c in enumerate(cols) if c.startswith("grading=")]
    assert (np.nansum(path.values[:, j], axis=1) == 1).all()
    assert np.isnan(path.values).any()  # real gaps kept (perinodal_invasion, ...)


def test_stratified_folds_balanced() -> None:
    labels = pd.Series(["a"] * 23 + ["b"] * 9 + ["c"] * 5)
    f1 = stratified_folds(labels, 4, seed=3)
    assert (f1 == stratified_folds(labels, 4, seed=3)).all()
    assert not (f1 == stratified_folds(labels, 4, seed=4)).all()
    sizes = np.bincount(f1)
    assert sizes.max() - sizes.min() <= 1


@pytest.mark.parametrize("name", SIMULATED)
def test_simulated_site_counts_and_shapes(builtin_sites: dict[str, SiteData], name: str) -> None:
    s = builtin_sites[name]
    n, events, k, no_rad, no_path = COHORTS[name]
    assert len(s) == n and int(s.event.sum()) == events
    assert sorted(np.unique(s.folds["fold_parachute"])) == list(range(k))
    rad, path = s.modalities["radiology"], s.modalities["pathology"]
    assert (~rad.present).sum() == no_rad and (~path.present).sum() == no_path
    assert not (~rad.present & ~path.present).any()  # nobody lacks both
    slices = rad.n_tokens()[rad.present]
    assert slices.min() >= 40 and slices.max() <= 150 and len(np.unique(slices)) > 10
    assert rad.spec.dim == 1024 and path.spec.dim == 768
    assert s.spec.simulated and "SIMULATED" in s.spec.description
    assert s.oracle_risk is not None and np.isfinite(s.oracle_risk).all()


def test_site_yaml_says_simulated(builtin_root: Path) -> None:
    for name in SIMULATED:
        doc = yaml.safe_load((builtin_root / name / "site.yaml").read_text())
        assert doc["simulated"] is True
        assert doc["provenance"]["embeddings"] == "simulated"
        assert all("SIMULATED" in m["description"] for m in doc["modalities"])
        assert np.load(builtin_root / name / "radiology" / next(
            iter(sorted(p.name for p in (builtin_root / name / "radiology").iterdir())))).dtype == np.float16


def test_pda_slides_match_label_rows(builtin_sites: dict[str, SiteData]) -> None:
    labels = read_labels("CPTACPDA.tsv")
    s = builtin_sites["cptac-pda"]
    assert list(s.patient_ids) == labels.patient_ids
    np.testing.assert_array_equal(s.modalities["pathology"].n_tokens(), labels.n_slides)
    assert labels.n_slides.sum() == 226 and labels.n_slides.max() == 5


def test_ccrcc_split_by_id_prefix(builtin_sites: dict[str, SiteData]) -> None:
    assert all(p.startswith(("C3L-", "C3N-")) for p in builtin_sites["cptac-ccrcc"].patient_ids)
    assert all(p.startswith("TCGA-") for p in builtin_sites["tcga-kirc"].patient_ids)
    assert (builtin_sites["cptac-ccrcc"].time == 0).sum() == 1  # the MMIST patient with time 0


@pytest.mark.parametrize("name", SIMULATED)
def test_oracle_c_index(builtin_sites: dict[str, SiteData], name: str) -> None:
    s = builtin_sites[name]
    c = concordance_index(s.time, -s.oracle_risk, s.event)
    assert c == pytest.approx(ORACLE_C[name], abs=5e-4)
    assert 0.80 <= c <= 0.90


@pytest.mark.parametrize("name", SIMULATED)
def test_oracle_parts_are_the_generator_components(builtin_sites: dict[str, SiteData], name: str) -> None:
    s = builtin_sites[name]
    lat = latent_risk(s.time, s.event, name, 0)
    parts = s.oracle_parts
    assert parts is not None and set(parts) == {("radiology",), ("pathology",), ("pathology", "radiology")}
    np.testing.assert_allclose(parts[("radiology",)], lat.r, atol=1e-12)
    np.testing.assert_allclose(parts[("pathology",)], lat.p, atol=1e-12)
    np.testing.assert_allclose(parts[("pathology", "radiology")], lat.x, atol=1e-5)
    obs = s.observable_oracle_risk()
    rad, path = s.modalities["radiology"].present, s.modalities["pathology"].present
    x = lat.eta - lat.r - lat.p
    # a part the patient cannot reveal enters at its mean over the site's patients
    np.testing.assert_allclose(obs, np.where(rad, lat.r, lat.r.mean()) + np.where(path, lat.p, lat.p.mean())
                               + np.where(rad & path, x, x.mean()), atol=1e-9)
    c = concordance_index(s.time, -obs, s.event)
    assert c == pytest.approx(OBSERVABLE_ORACLE_C[name], abs=5e-4)


@pytest.mark.parametrize("name", SIMULATED)
def test_parachute_folds_disjoint_and_patient_level(builtin_sites: dict[str, SiteData], name: str) -> None:
    s = builtin_sites[name]
    splits = s.splits("fold_parachute")
    seen = []
    for sp in splits:
        assert not set(sp.train) & set(sp.test)
        assert len(sp.train) + len(sp.test) == len(s)
        seen.extend(s.patient_ids[sp.test])
    assert sorted(seen) == sorted(s.patient_ids)  # each patient (all its slides) tested once
    assert len(set(s.patient_ids)) == len(s)


def test_folds_match_the_label_files(builtin_sites: dict[str, SiteData]) -> None:
    raw = pd.read_csv(Path(__file__).parents[1] / "sites/data/cptac_tcga_labels/CPTACUCEC.tsv", sep="\t")
    s = builtin_sites["cptac-ucec"]
    for pid, fold in zip(s.patient_ids, s.folds["fold_parachute"]):
        row = raw[raw.case_id == pid].iloc[0]
        assert row[f"fold_{fold}"] == "test"
        assert (row[[f"fold_{k}" for k in range(4) if k != fold]] == "train").all()


def test_union_of_builtin_specs(builtin_sites: dict[str, SiteData]) -> None:
    specs = union_specs([builtin_sites[n].spec for n in BUILTIN_SITES])
    assert [m.name for m in specs] == ["clinical", "pathological", "blood", "icd",
                                       "tma_cell_density", "tma_texture", "radiology", "pathology"]


def test_sites_turn_into_batches(builtin_sites: dict[str, SiteData]) -> None:
    specs = union_specs([builtin_sites[n].spec for n in BUILTIN_SITES])
    tensors = SiteTensors(builtin_sites["cptac-pda"], specs)
    batch = tensors.batch(np.arange(6))
    assert batch.modalities["radiology"].values.shape[0] == 6
    assert batch.modalities["radiology"].values.shape[2] == 1024
    assert not batch.modalities["clinical"].present.any()
    h = SiteTensors(builtin_sites["hancock"], specs).batch(np.arange(4))
    assert h.modalities["tma_texture"].values.shape[1:] == (8, 520)


def test_build_is_deterministic_and_missing_none(tmp_path: Path, builtin_root: Path) -> None:
    a = build_site("cptac-ucec", tmp_path / "a", seed=0)
    cmp = filecmp.dircmp(a, builtin_root / "cptac-ucec")
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only
    for sub in cmp.subdirs.values():
        assert not sub.diff_files and not sub.left_only and not sub.right_only
    assert (a / "pathology.npz").read_bytes() == (builtin_root / "cptac-ucec/pathology.npz").read_bytes()

    full = load_site(build_site("cptac-ucec", tmp_path / "full", seed=0, missing="none"))
    assert full.modalities["pathology"].present.all() and full.modalities["radiology"].present.all()
    default = load_site(a)
    # missingness only removes data: the embeddings of present patients are the same
    i = int(np.flatnonzero(default.modalities["pathology"].present)[0])
    np.testing.assert_array_equal(full.modalities["pathology"].tokens(i),
                                  default.modalities["pathology"].tokens(i))

    other = load_site(build_site("cptac-ucec", tmp_path / "other", seed=1))
    assert not np.array_equal(other.oracle_risk, default.oracle_risk)


def test_builders_refuse_unknown_input(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="unknown built-in site"):
        build_site("mayo", tmp_path)
    with pytest.raises(ValueError, match="missing must be"):
        build_site("cptac-ucec", tmp_path, missing="some")
    assert list(tmp_path.iterdir()) == []


def test_cli_build_and_validate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from simulations.cli import main

    assert main(["sites", "build", "cptac-ucec", str(tmp_path), "--missing", "none"]) == 0
    assert "built" in capsys.readouterr().out
    assert main(["sites", "validate", str(tmp_path / "cptac-ucec")]) == 0
    out = capsys.readouterr().out
    assert "34 patients, 29 events" in out and "SIMULATED" in out and "pathology 34/34" in out
    assert main(["sites", "build", str(tmp_path / "x")]) == 2  # neither --all nor names
    assert main(["sites", "build", "--all", "hancock", str(tmp_path / "x")]) == 2
    assert main(["sites", "build", "mayo", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_cli_build_refuses_to_replace_a_folder_that_is_not_a_site(tmp_path: Path, capsys) -> None:
    from sites.cli import main as sites_main

    (tmp_path / "cptac-ucec").mkdir()
    (tmp_path / "cptac-ucec" / "notes.txt").write_text("mine")
    assert sites_main(["build", "cptac-ucec", str(tmp_path)]) == 1
    assert "exists and is not a site folder" in capsys.readouterr().err  # one line, no traceback
    assert (tmp_path / "cptac-ucec" / "notes.txt").read_text() == "mine"


# ---- fourth review round (mutation testing of sites/): builders' checks no test exercised ----

def test_label_times_are_the_real_os_days() -> None:
    """time = OS_days of the label file, unchanged (days, never rescaled)."""
    raw = pd.read_csv(LABELS_DIR / "CPTACUCEC.tsv", sep="\t", dtype={"case_id": str})
    lab = read_labels("CPTACUCEC.tsv")
    first = raw.groupby("case_id", sort=False)["OS_days"].first()
    np.testing.assert_array_equal(lab.time, first.loc[lab.patient_ids].to_numpy(np.float64))
    assert lab.time.max() < 5000  # ~13.7 years: a days scale, not months x 30.4375


def test_missing_pattern_counts_round_and_refuse_overflow() -> None:
    ids = [f"P{i}" for i in range(10)]
    out = missing_pattern(ids, {"radiology": 0.29, "pathology": 0.31}, "s", 0)
    assert len(out["radiology"]) == 3 and len(out["pathology"]) == 3  # round(2.9), round(3.1)
    assert not out["radiology"] & out["pathology"]
    with pytest.raises(ValueError, match="sum to more than 1"):
        missing_pattern(ids, {"radiology": 0.6, "pathology": 0.6}, "s", 0)


def test_missing_pattern_refuses_unknown_modalities() -> None:
    """A misspelt modality used to build a site without gaps whose provenance claimed them."""
    lab = read_labels("CPTACUCEC.tsv")
    with pytest.raises(ValueError, match=r"unknown modalities \['radiolgy'\]"):
        content_from_labels("x", "X", lab, {"radiolgy": 0.3}, 0, "d", "s", "default", "CPTACUCEC.tsv")


def _write_tsv(tmp_path: Path, rows) -> Path:
    cols = ["case_id", "OS_event", "OS_days", "fold_0", "fold_1"]
    pd.DataFrame(rows, columns=cols).to_csv(tmp_path / "L.tsv", sep="\t", index=False)
    return tmp_path


def test_read_labels_refuses_inconsistent_or_unfolded_patients(tmp_path: Path) -> None:
    d = _write_tsv(tmp_path, [["A", "True", 10, "test", "train"], ["A", "True", 11, "test", "train"],
                              ["B", "False", 20, "train", "test"]])
    with pytest.raises(ValueError, match="disagree on time/event/folds: \\['A'\\]"):
        read_labels("L.tsv", labels_dir=d)
    d = _write_tsv(tmp_path, [["A", "True", 10, "test", "test"], ["B", "False", 20, "train", "test"]])
    with pytest.raises(ValueError, match="exactly one fold column"):
        read_labels("L.tsv", labels_dir=d)
    d = _write_tsv(tmp_path, [["A", "True", 10, "train", "train"], ["B", "False", 20, "train", "test"]])
    with pytest.raises(ValueError, match="exactly one fold column"):
        read_labels("L.tsv", labels_dir=d)


def test_hancock_cv_folds_follow_the_seed() -> None:
    cfg = site_config("hancock")
    f0 = hancock.build_content("hancock", cfg, seed=0).patients["fold_cv10"].to_numpy()
    f1 = hancock.build_content("hancock", cfg, seed=1).patients["fold_cv10"].to_numpy()
    assert not np.array_equal(f0, f1)
    assert sorted(np.bincount(f1)) == sorted(np.bincount(f0))  # same sizes, other patients


def _hancock_data_copy(tmp_path: Path) -> Path:
    d = tmp_path / "hancock"
    d.mkdir()
    for f in hancock.DATA_DIR.iterdir():
        (d / f.name).symlink_to(f)
    return d


def test_hancock_builder_refuses_corrupt_source_tables(tmp_path: Path) -> None:
    cfg = site_config("hancock")
    d = _hancock_data_copy(tmp_path)
    lines = (hancock.DATA_DIR / "clinical.csv").read_text().splitlines()
    (d / "clinical.csv").unlink()
    (d / "clinical.csv").write_text("\n".join(lines + [lines[1]]) + "\n")  # a patient twice
    with pytest.raises(ValueError, match="duplicate patient_id"):
        hancock.build_content("hancock", cfg, data_dir=d)
    stranger = "999999" + lines[1][lines[1].index(","):]
    (d / "clinical.csv").write_text("\n".join(lines + [stranger]) + "\n")  # not in targets.csv
    with pytest.raises(ValueError, match="patients not in targets.csv"):
        hancock.build_content("hancock", cfg, data_dir=d)


def test_build_all_passes_seed_and_missing_to_every_site(tmp_path: Path, monkeypatch) -> None:
    from sites import builtin

    calls = []
    monkeypatch.setattr(builtin, "build_site", lambda name, out, seed=0, missing="default":
                        calls.append((name, seed, missing)) or Path(out) / name)
    builtin.build_all(tmp_path, seed=3, missing="none")
    assert calls == [(n, 3, "none") for n in builtin.BUILTIN_SITES]
