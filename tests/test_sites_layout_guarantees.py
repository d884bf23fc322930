"""Guarantees of sites/layout.py, writer.py, hancock.py, missingness.py, problems.py that no
other test pinned (found by mutation testing, review round 45): every site.yaml check, the
default paths of FORMAT.md, the site.yaml round trip, the HANCOCK encoding against the copied
real data, and the exact draws of the missing-modality protocols."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sites import hancock, load_site, validate_site
from sites.builtin import site_config
from sites.layout import PATIENT_ID_RE, SiteLayout, is_archive, parse_site_yaml
from sites.missingness import (drop_site_modality, file_presence, haf_drop, haf_drop_mask,
                               parachute_drop, patient_uniforms, random_drop_mask)
from sites.problems import Problem, SiteValidationError
from sites.types import ModalitySpec, SiteSpec
from sites.writer import SiteContent, write_npz, write_site
from sites_fixtures import edit_yaml, synthetic_site, yaml_modalities

HANCOCK_DATA = hancock.DATA_DIR


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One valid synthetic site (seq folder, vec.npz, tab.csv, oracle_risk.csv), built once."""
    return synthetic_site(tmp_path_factory.mktemp("tpl"), "demo", 12)


@pytest.fixture()
def site(template: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(template, tmp_path / "demo"))


def _yaml_messages(site: Path) -> list[str]:
    return [p.message for p in validate_site(site) if p.file == "site.yaml"]


def _has(messages: list[str], text: str) -> bool:
    return any(text in m for m in messages)


# ----------------------------------------------------------------------------- site.yaml checks


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(patients="/etc/patients.csv"), "patients '/etc/patients.csv' must be a relative path"),
    (lambda d: yaml_modalities(d)["seq"].update(path="."), "path '.' must be a relative path"),
    (lambda d: d.update(format_version=0), "format_version 0 is not supported"),
    (lambda d: d.update(name="St Elsewhere"), "name 'St Elsewhere' must be lower-case"),
    (lambda d: d.update(name="Demo"), "name 'Demo' must be lower-case"),
    (lambda d: yaml_modalities(d)["seq"].update(name="1seq"), "name '1seq' must start with a lower-case letter"),
    (lambda d: yaml_modalities(d)["seq"].update(name="ct-scan"), "name 'ct-scan' must start with a lower-case letter"),
    (lambda d: d.update(tasks=["survival", "grade"]), "unknown task 'grade'"),
    (lambda d: d.update(tasks=["survival", "survival"]), "tasks lists a task twice"),
    (lambda d: d.update(tasks="survival"), "tasks must be a list"),
    (lambda d: d.update(simulated="yes"), "simulated must be true or false"),
    (lambda d: d.update(description=3), "description must be text"),
    (lambda d: d.update(source=["a"]), "source must be text"),
    (lambda d: d.update(oracle_risk="../oracle.csv"), "oracle_risk '../oracle.csv' must be a relative path"),
    (lambda d: d.update(provenance=[1, 2]), "provenance must be a mapping"),
    (lambda d: yaml_modalities(d)["tab"].update(path=d["oracle_risk"]), "already used by oracle_risk"),
    (lambda d: (yaml_modalities(d)["seq"].update(path="seq"), yaml_modalities(d)["vec"].update(path="seq/")), "already used by modality 'seq'"),
    (lambda d: d.update(modalities=[]), "modalities must be a non-empty list"),
    (lambda d: yaml_modalities(d)["seq"].update(colour="red"), "modalities[0]: unknown key 'colour'"),
    (lambda d: yaml_modalities(d)["tab"].update(columns=[], dim=None), "needs 'columns', a non-empty list"),
    (lambda d: yaml_modalities(d)["tab"].update(columns=["x0", "x1", "x1", "x3", "x4"]), "columns listed twice: ['x1']"),
    (lambda d: yaml_modalities(d)["tab"].update(columns=["x0", "x1", "x2", "x3", "patient_id"]), "'patient_id' is the key column"),
    (lambda d: yaml_modalities(d)["tab"].update(dim=6), "dim 6 does not match its 5 columns"),
    (lambda d: yaml_modalities(d)["vec"].update(columns=["a"]), "'columns' is only for tabular modalities"),
    (lambda d: yaml_modalities(d)["vec"].update(dim=0), "dim 0 must be a positive integer"),
    (lambda d: yaml_modalities(d)["tab"].update(path="tab.tsv"), "a tabular modality is a .csv file"),
    (lambda d: yaml_modalities(d)["seq"].update(path="seq.csv"), "a sequence modality is a folder of <patient_id>.npy or one .npz"),
    (lambda d: d.update(cohort="   "), "cohort is required"),
])
def test_every_site_yaml_rule_is_reported(site: Path, edit, message: str) -> None:
    edit_yaml(site, edit)
    messages = _yaml_messages(site)
    assert _has(messages, message), messages
    with pytest.raises(SiteValidationError):
        load_site(site)


def test_patient_ids_cannot_start_with_a_dot_or_dash() -> None:
    """Ids name files: '.x.npy' would be a hidden file, which the loader ignores."""
    for good in ("SE-001", "001", "a.b_c-d"):
        assert PATIENT_ID_RE.match(good)
    for bad in (".hidden", "-x", "_x", "a/b", "a b", ""):
        assert not PATIENT_ID_RE.match(bad), bad


def test_tasks_are_put_in_canonical_order(site: Path) -> None:
    edit_yaml(site, lambda d: d.update(tasks=["status", "survival"]))
    layout, problems = parse_site_yaml(site)
    assert problems == [] and layout.spec.tasks == ("survival", "status")


def test_default_paths_of_the_format_are_used_when_path_is_omitted(site: Path) -> None:
    """FORMAT.md: tabular <name>.csv, vector <name>.npz, sequence/bag folder <name>/."""
    def strip_paths(d):
        for m in d["modalities"]:
            m.pop("path", None)
    edit_yaml(site, strip_paths)
    layout, problems = parse_site_yaml(site)
    assert problems == []
    assert layout.modality_paths == {"seq": "seq/", "vec": "vec.npz", "tab": "tab.csv"}
    assert validate_site(site) == []


def test_an_upper_case_npz_suffix_is_an_archive() -> None:
    assert is_archive("emb/Pathology.NPZ") and is_archive("x.npz")
    assert not is_archive("radiology/") and not is_archive("npz_folder")


# ----------------------------------------------------------------------------- writing


def _content(paths=None, description="", source="", provenance=None, mod_desc="",
             patients_extra=None, oracle=False, parts=None, tables=None, tasks=("survival",)):
    mods = [ModalitySpec("v", "vector", 3, (), mod_desc)]
    if tables is not None:
        mods.append(ModalitySpec("t", "tabular", tables.shape[1], tuple(tables.columns)))
    spec = SiteSpec("tiny", "c", "days", tasks, tuple(mods), description=description,
                    source=source)
    mpaths = {"v": "v.npz"} if paths is None else paths
    if tables is not None:
        mpaths = {**mpaths, "t": "t.csv"}
    layout = SiteLayout(spec, "patients.csv", "oracle_risk.csv" if oracle else None, mpaths,
                        provenance or {})
    ids = ["A", "B", "C"]
    d = {"patient_id": ids, "time": [10.0, 20.0, 30.0], "event": [1, 0, 1]}
    d.update(patients_extra or {})
    o = pd.Series([0.5, -1.25, 2.0], index=ids) if oracle else None
    return SiteContent(layout, pd.DataFrame(d),
                       tokens={"v": {p: np.full(3, i, np.float32) for i, p in enumerate(ids)}},
                       tables={} if tables is None else {"t": tables},
                       oracle_risk=o, oracle_parts=parts)


def test_site_yaml_round_trips_the_layout(tmp_path: Path) -> None:
    content = _content(paths={"v": "v_archive.npz"}, description="Pancreas, 2019-2023",
                       source="local PACS", provenance={"seed": 3, "note": "x"},
                       mod_desc="TITAN slide embeddings")
    path = write_site(content, tmp_path / "tiny")
    layout, problems = parse_site_yaml(path)
    assert problems == []
    assert layout.spec == content.layout.spec
    assert layout.modality_paths == {"v": "v_archive.npz"}
    assert layout.provenance == {"seed": 3, "note": "x"}
    assert (path / "v_archive.npz").is_file() and not (path / "v.npz").exists()
    site = load_site(path)
    np.testing.assert_array_equal(site.modalities["v"].tokens(1), [[1, 1, 1]])


def test_patients_outside_a_split_are_written_empty_not_test(tmp_path: Path) -> None:
    content = _content(patients_extra={"split_x": ["train", "test", None]})
    site = load_site(write_site(content, tmp_path / "tiny"))
    s = site.splits("split_x")[0]
    assert list(s.train) == [0] and list(s.test) == [1]
    text = (tmp_path / "tiny" / "patients.csv").read_text().splitlines()
    assert text[3].endswith(",")  # C: empty cell


def test_table_values_and_oracle_parts_are_written_exactly(tmp_path: Path) -> None:
    tab = pd.DataFrame({"a": [0.123456789012345, np.nan, 1e-7], "b": [1.0, 2.5, 3.0]},
                       index=["A", "B", "C"])
    ids = ["A", "B", "C"]
    # parts given in another order than the oracle: they must be aligned by patient id
    parts = {("v",): pd.Series([0.25, 0.5, -1.0], index=ids)[::-1],
             ("t",): pd.Series([0.25, -1.75, 3.0], index=ids)}
    content = _content(tables=tab, oracle=True, parts=parts)
    site = load_site(write_site(content, tmp_path / "tiny"))
    np.testing.assert_array_equal(site.modalities["t"].values[:, 0],
                                  np.float32([0.123456789012345, np.nan, 1e-7]))
    np.testing.assert_array_equal(site.oracle_risk, [0.5, -1.25, 2.0])
    np.testing.assert_array_equal(site.oracle_parts[("v",)], [0.25, 0.5, -1.0])


def test_declared_oracle_without_values_is_a_clear_error(tmp_path: Path) -> None:
    content = _content(oracle=True)
    content.oracle_risk = None
    with pytest.raises(ValueError, match="declares oracle_risk but none was given"):
        write_site(content, tmp_path / "tiny")
    assert os.listdir(tmp_path) == []


def test_write_site_creates_missing_parent_folders(tmp_path: Path) -> None:
    path = write_site(_content(), tmp_path / "a" / "b" / "tiny")
    assert validate_site(path) == []


def test_event_two_is_refused_by_write_site(tmp_path: Path) -> None:
    content = _content()
    content.patients["event"] = [1, 2, 0]
    with pytest.raises(SiteValidationError, match="event '2' must be 0"):
        write_site(content, tmp_path / "tiny")
    assert os.listdir(tmp_path) == []


def test_npz_bytes_do_not_depend_on_insertion_order(tmp_path: Path) -> None:
    a = {"B": np.ones(3, np.float32), "A": np.zeros(3, np.float32)}
    write_npz(tmp_path / "1.npz", a)
    write_npz(tmp_path / "2.npz", dict(sorted(a.items())))
    assert (tmp_path / "1.npz").read_bytes() == (tmp_path / "2.npz").read_bytes()


# ---- defects found by the sixth review round (each test failed before its fix) ----


@pytest.mark.parametrize("column, values", [("event", [1, 0.5, 1]), ("status", [1, 0.7, 0])])
def test_non_binary_labels_are_reported_not_truncated(tmp_path: Path, column, values) -> None:
    content = _content(tasks=("survival", "status"), patients_extra={"status": [1, 0, 0]})
    content.patients[column] = values
    with pytest.raises(SiteValidationError, match="patient B"):
        write_site(content, tmp_path / "tiny")
    assert os.listdir(tmp_path) == []


def test_a_missing_event_is_named_and_a_missing_fold_is_outside_the_scheme(tmp_path: Path) -> None:
    """A NaN event or fold cell used to raise pandas' IntCastingNaNError naming neither column nor patient."""
    content = _content(patients_extra={"fold_x": [0, 1, 1]})
    content.patients["event"] = [1, np.nan, 1]
    with pytest.raises(SiteValidationError, match="patients.csv, patient B: event 'nan' must be 0"):
        write_site(content, tmp_path / "tiny")
    assert os.listdir(tmp_path) == []
    content = _content(patients_extra={"fold_x": [0, np.nan, 1]})
    site = load_site(write_site(content, tmp_path / "tiny"))
    assert site.folds["fold_x"].tolist() == [0, -1, 1]  # empty = outside the scheme (FORMAT.md)
    content = _content(patients_extra={"fold_x": [0, 1.5, 1]})
    with pytest.raises(SiteValidationError, match="patient B: fold_x '1.5' must be a whole number"):
        write_site(content, tmp_path / "other")


@pytest.mark.parametrize("paths", [{"v": "emb/v.npz"}])
def test_nested_modality_paths_can_be_written(tmp_path: Path, paths) -> None:
    path = write_site(_content(paths=paths), tmp_path / "tiny")
    assert validate_site(path) == []


def test_times_keep_every_digit(tmp_path: Path) -> None:
    content = _content()
    content.patients["time"] = [1234.56789012345, 1000.00000000001, 1000.0]
    site = load_site(write_site(content, tmp_path / "tiny"))
    np.testing.assert_array_equal(site.time, [1234.56789012345, 1000.00000000001, 1000.0])


# ----------------------------------------------------------------------------- problems


def test_problem_row_is_the_csv_line_and_error_names_the_folder() -> None:
    p = Problem("patients.csv", "time -3 is negative", patient="SE-002", line=3)
    assert p.row == 3
    assert str(p) == "patients.csv, line 3, patient SE-002: time -3 is negative"
    err = SiteValidationError("/data/st-elsewhere", [p])
    assert str(err).startswith("site folder /data/st-elsewhere is not valid (1 problem):")
    assert "2 problems" in str(SiteValidationError("x", [p, p]))


# ----------------------------------------------------------------------------- HANCOCK


@pytest.fixture(scope="module")
def hc() -> SiteContent:
    return hancock.build_content("hancock", site_config("hancock"), seed=0)


@pytest.fixture(scope="module")
def targets() -> pd.DataFrame:
    return pd.read_csv(HANCOCK_DATA / "targets.csv", dtype={"patient_id": str}).set_index("patient_id")


def test_hancock_time_is_days_to_last_information(hc: SiteContent, targets: pd.DataFrame) -> None:
    p = hc.patients.set_index("patient_id")
    np.testing.assert_array_equal(p["time"].to_numpy(),
                                  targets.loc[p.index, "days_to_last_information"].to_numpy(float))
    assert p.loc["001", "time"] == 2258.0 and p.loc["002", "time"] == 1753.0  # days, as in the file


def test_hancock_cv_folds_deal_the_largest_class_first(hc: SiteContent, targets: pd.DataFrame) -> None:
    """Seeded round-robin across classes, largest first: living (550) fills every fold with
    55; tumour-specific deaths (115) start at position 550 -> folds 0-4 get 12, 5-9 get 11;
    not-tumour-specific (89) start at 665 -> folds 5-9 and 0-3 get 9, fold 4 gets 8; cause
    unknown (9) start at 754 -> folds 4-9, 0-2."""
    cause = targets.loc[hc.patients["patient_id"], "survival_status_with_cause"].to_numpy()
    fold = hc.patients["fold_cv10"].to_numpy()
    count = {c: np.bincount(fold[cause == c], minlength=10).tolist() for c in np.unique(cause)}
    assert count["living"] == [55] * 10
    assert count["deceased tumor specific"] == [12] * 5 + [11] * 5
    assert count["deceased not tumor specific"] == [9, 9, 9, 9, 8, 9, 9, 9, 9, 9]
    assert count["deceased"] == [1, 1, 1, 0, 1, 1, 1, 1, 1, 1]


def test_hancock_tables_have_the_documented_widths_and_no_nominal_code(hc: SiteContent) -> None:
    widths = {m.name: m.dim for m in hc.layout.spec.modalities}
    assert widths == {"clinical": 7, "pathological": 37, "blood": 16, "icd": 40,
                      "tma_cell_density": 4, "tma_texture": 520}  # FORMAT.md, section 3
    for name, table in hc.tables.items():
        for c in hancock.NOMINAL_COLUMNS:
            assert c not in table.columns, (name, c)
    assert [c for c in hc.tables["clinical"].columns if c.startswith("smoking_status=")] == [
        "smoking_status=0", "smoking_status=1", "smoking_status=2", "smoking_status=3"]
    assert any(c.startswith("resection_status_carcinoma_in_situ=") for c in hc.tables["pathological"])


def test_one_hot_codes_are_ascending_whatever_their_order_of_appearance() -> None:
    df = pd.DataFrame({"grading": [3, 0, 2, 0]})
    out = hancock.one_hot_nominal(df, ("grading",))
    assert list(out.columns) == ["grading=0", "grading=2", "grading=3"]
    np.testing.assert_array_equal(out["grading=3"], [1, 0, 0, 0])


def test_hancock_bag_instances_are_the_real_stain_vectors_with_their_one_hot(hc: SiteContent) -> None:
    """Every instance = the 512-d vector of the stain named by its one-hot, in FORMAT.md order."""
    assert hancock.STAINS == ("CD163", "CD3", "CD56", "CD68", "CD8", "HE", "MHC1", "PDL1")
    bags = hc.tokens["tma_texture"]
    npz = {s: np.load(HANCOCK_DATA / f"tma_tile_dtr_256_{s}.npz") for s in hancock.STAINS}
    try:
        for pid in ("001", "002", sorted(bags)[-1]):
            bag = bags[pid]
            assert bag.shape[1] == 520
            for row in bag:
                onehot = row[512:]
                assert sorted(onehot.tolist()) == [0.0] * 7 + [1.0]
                stain = hancock.STAINS[int(onehot.argmax())]
                np.testing.assert_array_equal(row[:512], npz[stain][pid].astype(np.float32))
        seven = next(p for p, b in bags.items() if len(b) == 7)
        missing = [s for s in hancock.STAINS if seven not in npz[s].files]
        assert len(missing) == 1
        assert hancock.STAINS.index(missing[0]) not in bags[seven][:, 512:].argmax(axis=1)
    finally:
        for z in npz.values():
            z.close()


def test_hancock_provenance_counts_the_patients_with_each_modality(hc: SiteContent) -> None:
    assert hc.layout.provenance["patients_with_modality"] == {
        "clinical": 763, "pathological": 763, "blood": 692, "icd": 712,
        "tma_cell_density": 736, "tma_texture": 760}
    assert hc.layout.provenance["stain_order"] == list(hancock.STAINS)


def _data_copy(tmp_path: Path) -> Path:
    d = tmp_path / "hancock"
    d.mkdir()
    for f in HANCOCK_DATA.iterdir():
        (d / f.name).symlink_to(f)
    return d


def test_hancock_builder_refuses_inconsistent_sources(tmp_path: Path) -> None:
    cfg = site_config("hancock")
    d = _data_copy(tmp_path)
    with pytest.raises(ValueError, match="missing must be"):
        hancock.build_content("hancock", cfg, missing="some", data_dir=d)

    split = json.loads((HANCOCK_DATA / "dataset_split_in.json").read_text())
    (d / "dataset_split_in.json").unlink()
    (d / "dataset_split_in.json").write_text(json.dumps(split[:-1]))
    with pytest.raises(ValueError, match="dataset_split_in.json: patients differ"):
        hancock.build_content("hancock", cfg, data_dir=d)
    (d / "dataset_split_in.json").unlink()
    bad = [dict(e) for e in split]
    bad[5]["dataset"] = "validation"  # used to be a bare KeyError: 'validation'
    (d / "dataset_split_in.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=rf"dataset_split_in.json: patient '?{bad[5]['patient_id']}'? has "
                                         r"dataset 'validation' \(expected 'training' or 'test'; 1 such"):
        hancock.build_content("hancock", cfg, data_dir=d)
    (d / "dataset_split_in.json").unlink()
    (d / "dataset_split_in.json").symlink_to(HANCOCK_DATA / "dataset_split_in.json")

    t = pd.read_csv(HANCOCK_DATA / "targets.csv", dtype=str, keep_default_na=False)
    t.loc[3, "survival_status_with_cause"] = "lost to follow-up"
    (d / "targets.csv").unlink()
    t.to_csv(d / "targets.csv", index=False)
    with pytest.raises(ValueError, match=r"unknown survival_status_with_cause \['lost to follow-up'\]"):
        hancock.build_content("hancock", cfg, data_dir=d)
    (d / "targets.csv").unlink()
    (d / "targets.csv").symlink_to(HANCOCK_DATA / "targets.csv")

    with np.load(HANCOCK_DATA / "tma_tile_dtr_256_HE.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["001"] = arrays["001"][:100]
    (d / "tma_tile_dtr_256_HE.npz").unlink()
    write_npz(d / "tma_tile_dtr_256_HE.npz", arrays)
    with pytest.raises(ValueError, match=r"tma_tile_dtr_256_HE.npz: patient 001 has shape \(100,\)"):
        hancock.build_content("hancock", cfg, data_dir=d)


# ----------------------------------------------------------------------------- missingness


MODS = (("radiology", "sequence", 8), ("pathology", "vector", 6), ("labs", "tabular", 3))


@pytest.fixture(scope="module")
def rp(tmp_path_factory: pytest.TempPathFactory):
    return load_site(synthetic_site(tmp_path_factory.mktemp("rp"), "rp", 120, modalities=MODS,
                                    missing_rate=0.1, seed=2))


def test_parachute_drop_uses_the_lower_tail_of_the_draws() -> None:
    """Modality j drops when u[i, j] < ratio (docstring); restore = largest dropped draw."""
    present = np.ones((3, 2), bool)
    u = np.array([[0.10, 0.90], [0.95, 0.20], [0.05, 0.10]])
    keep = random_drop_mask(present, np.array([True, True]), 0.3, u)
    np.testing.assert_array_equal(keep, [[False, True], [True, False], [False, True]])


def test_mixed_mode_drops_both_modalities(rp) -> None:
    dropped = file_presence(rp) & ~file_presence(parachute_drop(rp, 0.30, "mixed", seed=1))
    assert dropped[:, 0].any() and dropped[:, 1].any() and not dropped[:, 2].any()


def test_negative_ratio_and_unknown_empty_mode_are_refused(rp) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        parachute_drop(rp, -0.1)
    with pytest.raises(ValueError, match="empty must be"):
        drop_site_modality(rp, "labs", empty="keep")


def test_haf_drops_the_modalities_with_the_smallest_ranks() -> None:
    present = np.ones((2, 3), bool)
    u = np.array([[0.0, 0.9, 0.1, 0.5],    # k = 1: drop modality 1 (rank 0.1)
                  [0.99, 0.3, 0.2, 0.1]])  # k = 2: drop modalities 2 and 1
    keep = haf_drop_mask(present, uniforms=u)
    np.testing.assert_array_equal(keep, [[True, False, True], [True, False, False]])


def test_haf_and_parachute_draw_from_their_own_streams(rp) -> None:
    names = rp.spec.modality_names
    u = patient_uniforms(rp.patient_ids, 3, "haf", len(names) + 1)
    expected = haf_drop_mask(file_presence(rp), uniforms=u)
    np.testing.assert_array_equal(file_presence(haf_drop(rp, seed=3)), expected)
