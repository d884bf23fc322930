"""Every bad input of a site folder is reported (file, patient/line, what), all at once."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from sites import (Problem, SitesValidationError, SiteValidationError, load_site, load_sites,
                   union_specs, validate_site)
from sites.layout import SiteLayout
from sites.types import ModalitySpec, SiteSpec
from sites.writer import SiteContent, write_npz, write_site
from sites_fixtures import (edit_csv, edit_yaml, find_problem, npz_arrays, set_cell, synthetic_site,
                            yaml_modalities)


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    return synthetic_site(tmp_path)


def test_valid_site_has_no_problem_and_loads(site: Path) -> None:
    assert validate_site(site) == []
    data = load_site(site)
    assert len(data) == 24
    assert data.time.dtype == np.float64 and data.event.dtype == np.int8
    for md in data.modalities.values():
        assert md.values.dtype == np.float32
    assert set(data.folds) == {"fold_cv", "split_default"}


def test_negative_time(site: Path) -> None:
    set_cell(site, "P0003", "time", "-5")
    p = find_problem(validate_site(site), "negative", "patients.csv", "P0003")
    assert p.line == 5  # header = line 1, P0003 is the 4th data row
    assert str(p).startswith("patients.csv, line 5, patient P0003:")


def test_reported_lines_count_blank_lines(site: Path) -> None:
    set_cell(site, "P0003", "time", "-5")
    text = (site / "patients.csv").read_text().splitlines()
    text.insert(2, "")  # a blank line after P0000 (line 3), which pandas skips
    text.insert(4, "   ")
    (site / "patients.csv").write_text("\n".join(text) + "\n")
    problems = validate_site(site)
    p = find_problem(problems, "negative", "patients.csv", "P0003")
    assert p.line == 7 and text[p.line - 1].startswith("P0003,")
    assert len(problems) == 1  # the blank lines themselves are not problems


@pytest.mark.parametrize("value", ["", "nan", "NaN"])
def test_nan_time(site: Path, value: str) -> None:
    set_cell(site, "P0002", "time", value)
    find_problem(validate_site(site), "time is missing", "patients.csv", "P0002")


def test_non_numeric_and_infinite_time(site: Path) -> None:
    set_cell(site, "P0002", "time", "soon")
    set_cell(site, "P0004", "time", "inf")
    problems = validate_site(site)
    find_problem(problems, "not a number", "patients.csv", "P0002")
    find_problem(problems, "infinite", "patients.csv", "P0004")


def test_time_zero_is_legal(site: Path) -> None:
    set_cell(site, "P0003", "time", "0")
    assert validate_site(site) == []
    assert load_site(site).time[3] == 0.0


@pytest.mark.parametrize("value", ["2", "yes", "", "-1", "0.5"])
def test_event_not_binary(site: Path, value: str) -> None:
    set_cell(site, "P0001", "event", value)
    find_problem(validate_site(site), "must be 0 (censored) or 1", "patients.csv", "P0001")


def test_status_not_binary(site: Path) -> None:
    set_cell(site, "P0001", "status", "3")
    find_problem(validate_site(site), "status '3'", "patients.csv", "P0001")


def test_unknown_patients_column(site: Path) -> None:
    edit_csv(site / "patients.csv", lambda df: df.rename(columns={"fold_cv": "fold cv"}))
    find_problem(validate_site(site), "unknown column 'fold cv'", "patients.csv")


def test_status_task_without_column(site: Path) -> None:
    edit_csv(site / "patients.csv", lambda df: df.drop(columns="status"))
    find_problem(validate_site(site), "missing required column(s) ['status']", "patients.csv")


def test_duplicate_patient_id(site: Path) -> None:
    def dup(df):
        return pd.concat([df, df.iloc[[5]]], ignore_index=True)
    edit_csv(site / "patients.csv", dup)
    p = find_problem(validate_site(site), "duplicate patient_id", "patients.csv", "P0005")
    assert p.line == 26 and "first on line 7" in p.message


def test_duplicate_patient_in_tabular_file(site: Path) -> None:
    edit_csv(site / "tab.csv", lambda df: pd.concat([df, df.iloc[[0]]], ignore_index=True))
    find_problem(validate_site(site), "duplicate patient_id", "tab.csv")


def test_unknown_patient_ids_in_every_kind_of_file(site: Path) -> None:
    np.save(site / "seq" / "GHOST1.npy", np.zeros((3, 16), np.float32))
    arrays = npz_arrays(site / "vec.npz")
    arrays["GHOST2"] = np.zeros(12, np.float32)
    write_npz(site / "vec.npz", arrays)

    def add_row(df):
        row = {c: "1" for c in df.columns}
        row["patient_id"] = "GHOST3"
        return pd.concat([df, pd.DataFrame([row])], ignore_index=True)
    edit_csv(site / "tab.csv", add_row)
    problems = validate_site(site)
    find_problem(problems, "unknown patient id", "seq/GHOST1.npy", "GHOST1")
    find_problem(problems, "unknown patient id", "vec.npz", "GHOST2")
    find_problem(problems, "unknown patient id", "tab.csv", "GHOST3")


def test_invalid_patient_id(site: Path) -> None:
    set_cell(site, "P0001", "patient_id", "bad id/1")
    find_problem(validate_site(site), "is not valid", "patients.csv")


def test_nan_and_inf_in_embeddings(site: Path) -> None:
    pid = sorted(p.stem for p in (site / "seq").glob("*.npy"))[0]
    arr = np.load(site / "seq" / f"{pid}.npy")
    arr[1, 3] = np.nan
    np.save(site / "seq" / f"{pid}.npy", arr)
    arrays = npz_arrays(site / "vec.npz")
    vpid = sorted(arrays)[0]
    arrays[vpid] = arrays[vpid].copy()
    arrays[vpid][0, 0] = np.inf
    write_npz(site / "vec.npz", arrays)
    problems = validate_site(site)
    p = find_problem(problems, "1 NaN and 0 Inf", f"seq/{pid}.npy", pid)
    assert "token 1" in p.message
    find_problem(problems, "0 NaN and 1 Inf", "vec.npz", vpid)


def test_wrong_dimension(site: Path) -> None:
    pid = sorted(p.stem for p in (site / "seq").glob("*.npy"))[0]
    np.save(site / "seq" / f"{pid}.npy", np.zeros((5, 15), np.float32))
    p = find_problem(validate_site(site), "dimension is 15", f"seq/{pid}.npy", pid)
    assert "dim 16" in p.message


def test_wrong_shape(site: Path) -> None:
    pid = sorted(p.stem for p in (site / "seq").glob("*.npy"))[0]
    np.save(site / "seq" / f"{pid}.npy", np.zeros(16, np.float32))  # a sequence must be 2-D
    find_problem(validate_site(site), "array has shape [16]", f"seq/{pid}.npy", pid)
    np.save(site / "seq" / f"{pid}.npy", np.zeros((0, 16), np.float32))
    find_problem(validate_site(site), "has no tokens", f"seq/{pid}.npy", pid)


@pytest.mark.parametrize("dtype", [np.int64, np.int8, np.complex64, np.bool_])
def test_wrong_dtype(site: Path, dtype) -> None:
    pid = sorted(p.stem for p in (site / "seq").glob("*.npy"))[0]
    np.save(site / "seq" / f"{pid}.npy", np.ones((4, 16), dtype))
    find_problem(validate_site(site), f"dtype {np.dtype(dtype)} is not accepted", f"seq/{pid}.npy", pid)


def test_values_beyond_float32_range_are_reported_not_loaded_as_inf(site: Path) -> None:
    pid = sorted(p.stem for p in (site / "seq").glob("*.npy"))[0]
    arr = np.zeros((4, 16), np.float64)
    arr[2, 5] = 1e300  # finite as float64, Inf as float32
    np.save(site / "seq" / f"{pid}.npy", arr)
    tab_id = str(pd.read_csv(site / "tab.csv", dtype=str).patient_id.iloc[0])
    set_cell(site, tab_id, "x2", "1e39", file="tab.csv")
    problems = validate_site(site)
    p = find_problem(problems, "1 values beyond float32 range", f"seq/{pid}.npy", pid)
    assert "token 2" in p.message
    find_problem(problems, "column 'x2': value '1e39' is beyond float32 range", "tab.csv", tab_id)


def test_npz_entry_that_is_not_an_array_is_reported(site: Path) -> None:
    import zipfile

    vpid = sorted(npz_arrays(site / "vec.npz"))[0]
    with zipfile.ZipFile(site / "vec.npz") as old:
        members = {n: old.read(n) for n in old.namelist()}
    members[f"{vpid}.npy"] = b"garbage bytes"  # one patient's member is not an .npy file
    with zipfile.ZipFile(site / "vec.npz", "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    assert isinstance(npz_arrays(site / "vec.npz")[vpid], bytes)  # what numpy hands back for it
    find_problem(validate_site(site), "entry is not an .npy array", "vec.npz", vpid)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, ">f4", ">f8"])
def test_float_dtypes_are_accepted_and_converted(site: Path, dtype) -> None:
    pid = sorted(p.stem for p in (site / "seq").glob("*.npy"))[0]
    arr = np.arange(4 * 16).reshape(4, 16).astype(dtype) / 8
    np.save(site / "seq" / f"{pid}.npy", arr)
    data = load_site(site)
    i = list(data.patient_ids).index(pid)
    got = data.modalities["seq"].tokens(i)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, arr.astype(np.float32))


def test_patient_with_no_modality(site: Path) -> None:
    data = load_site(site)
    pid = str(data.patient_ids[0])
    (site / "seq" / f"{pid}.npy").unlink(missing_ok=True)
    arrays = npz_arrays(site / "vec.npz")
    arrays.pop(pid, None)
    write_npz(site / "vec.npz", arrays)
    edit_csv(site / "tab.csv", lambda df: df[df.patient_id != pid])
    p = find_problem(validate_site(site), "no modality at all", "patients.csv", pid)
    assert p.line == 2


def test_declared_modality_absent(site: Path) -> None:
    shutil.rmtree(site / "seq")
    (site / "vec.npz").unlink()
    problems = validate_site(site)
    find_problem(problems, "modality 'seq' is declared in site.yaml but the folder does not exist", "seq/")
    find_problem(problems, "modality 'vec' is declared in site.yaml but the file does not exist", "vec.npz")


def test_declared_modality_empty(site: Path) -> None:
    for f in (site / "seq").glob("*.npy"):
        f.unlink()
    find_problem(validate_site(site), "no patient has it", "seq/")


def test_empty_site(site: Path) -> None:
    edit_csv(site / "patients.csv", lambda df: df.iloc[:0])
    problems = validate_site(site)
    find_problem(problems, "the site is empty", "patients.csv")
    # modality files are not flagged as "unknown patients" when patients.csv is unusable
    assert not any("unknown patient id" in p.message for p in problems)


def test_missing_folder_and_missing_yaml(tmp_path: Path) -> None:
    find_problem(validate_site(tmp_path / "nope"), "does not exist", ".")
    find_problem(validate_site(tmp_path), "missing: every site folder needs a site.yaml", "site.yaml")


def test_unreadable_files(site: Path) -> None:
    pid = sorted(p.stem for p in (site / "seq").glob("*.npy"))[0]
    (site / "seq" / f"{pid}.npy").write_bytes(b"\x93NUMPY garbage")
    (site / "vec.npz").write_bytes(b"not a zip archive")
    (site / "tab.csv").write_bytes(b'patient_id,x0\n"unterminated,1\n')
    problems = validate_site(site)
    find_problem(problems, "unreadable .npy file", f"seq/{pid}.npy", pid)
    find_problem(problems, "unreadable .npz archive", "vec.npz")
    find_problem(problems, "unreadable as CSV", "tab.csv")


def test_npy_and_npz_mixed_up(site: Path) -> None:
    pid = sorted(p.stem for p in (site / "seq").glob("*.npy"))[0]
    write_npz(site / "seq" / f"{pid}.npy", {"a": np.zeros((2, 16), np.float32)})
    np.save(site / "vec.npy", np.zeros((2, 12), np.float32))
    os.replace(site / "vec.npy", site / "vec.npz")
    problems = validate_site(site)
    find_problem(problems, "is not a .npy array", f"seq/{pid}.npy", pid)
    find_problem(problems, "not an .npz archive", "vec.npz")


def test_unreadable_yaml(site: Path) -> None:
    (site / "site.yaml").write_text("name: [unclosed\n")
    find_problem(validate_site(site), "not valid YAML", "site.yaml")


def test_site_yaml_content_problems(site: Path) -> None:
    doc = yaml.safe_load((site / "site.yaml").read_text())
    doc["time_unit"] = "months"
    doc["colour"] = "blue"
    doc["modalities"][0]["kind"] = "image"
    doc["modalities"][1]["dim"] = -3
    (site / "site.yaml").write_text(yaml.safe_dump(doc))
    problems = validate_site(site)
    find_problem(problems, "time_unit is 'months'", "site.yaml")
    find_problem(problems, "unknown key 'colour'", "site.yaml")
    find_problem(problems, "kind 'image' must be one of", "site.yaml")
    find_problem(problems, "dim -3 must be a positive integer", "site.yaml")


def test_tabular_problems(site: Path) -> None:
    data = load_site(site)
    tab_ids = [str(p) for p, ok in zip(data.patient_ids, data.modalities["tab"].present) if ok]

    def fn(df):
        df.loc[df.patient_id == tab_ids[0], "x1"] = "high"
        df.loc[df.patient_id == tab_ids[1], ["x0", "x1", "x2", "x3", "x4"]] = ""
        return df.rename(columns={"x4": "x9"})
    edit_csv(site / "tab.csv", fn)
    problems = validate_site(site)
    find_problem(problems, "declared in site.yaml but not in the file: ['x4']", "tab.csv")
    find_problem(problems, "not declared in site.yaml: ['x9']", "tab.csv")

    edit_csv(site / "tab.csv", lambda df: df.rename(columns={"x9": "x4"}))
    problems = validate_site(site)
    find_problem(problems, "column 'x1': value 'high' is not a number", "tab.csv", tab_ids[0])
    find_problem(problems, "row has no value at all", "tab.csv", tab_ids[1])


def test_nan_cells_in_tabular_are_legal(site: Path) -> None:
    data = load_site(site)
    tab = data.modalities["tab"]
    assert np.isnan(tab.values[tab.present]).any()  # the synthetic table has real gaps
    assert np.isnan(tab.values[~tab.present]).all()  # absent rows are all-NaN


def test_fold_columns_checked(site: Path) -> None:
    set_cell(site, "P0001", "split_default", "validation")
    set_cell(site, "P0002", "fold_cv", "1.5")
    problems = validate_site(site)
    find_problem(problems, "split_default value 'validation'", "patients.csv", "P0001")
    find_problem(problems, "fold_cv value '1.5'", "patients.csv", "P0002")


def test_every_problem_reported_at_once_and_load_raises_all(site: Path) -> None:
    set_cell(site, "P0001", "time", "-1")
    set_cell(site, "P0002", "event", "7")
    pid = sorted(p.stem for p in (site / "seq").glob("*.npy"))[0]
    np.save(site / "seq" / f"{pid}.npy", np.full((3, 16), np.nan, np.float32))
    (site / "vec.npz").unlink()
    problems = validate_site(site)
    assert len(problems) >= 4
    with pytest.raises(SiteValidationError) as exc:
        load_site(site)
    msg = str(exc.value)
    assert len(exc.value.problems) == len(problems)
    for p in problems:
        assert str(p) in msg
    assert f"{len(problems)} problems" in msg
    import pickle

    again = pickle.loads(pickle.dumps(exc.value))
    assert str(again) == msg and again.problems == exc.value.problems


def test_loading_writes_nothing(site: Path) -> None:
    def snapshot() -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(site)): (p.stat().st_size, p.stat().st_mtime_ns)
                for p in sorted(site.rglob("*"))}
    before = snapshot()
    load_site(site)
    validate_site(site)
    set_cell(site, "P0001", "time", "-1")
    before_bad = snapshot()
    with pytest.raises(SiteValidationError):
        load_site(site)
    assert snapshot() == before_bad
    assert set(before) == set(before_bad)


def test_union_specs_order_and_conflict() -> None:
    a = ModalitySpec("ct", "sequence", 8)
    b = ModalitySpec("wsi", "vector", 4)
    c = ModalitySpec("lab", "tabular", 2, ("x", "y"))
    s1 = SiteSpec("one", "c", "days", ("survival",), (b, a))
    s2 = SiteSpec("two", "c", "days", ("survival",), (c, a))
    assert union_specs([s1, s2]) == (b, a, c)
    assert union_specs([s2, s1]) == (c, a, b)
    bad = SiteSpec("three", "c", "days", ("survival",), (ModalitySpec("ct", "sequence", 9),))
    with pytest.raises(ValueError, match=r"'ct'.*site 'one'.*dim 8.*site 'three'.*dim 9"):
        union_specs([s1, bad])
    bad_cols = SiteSpec("four", "c", "days", ("survival",), (ModalitySpec("lab", "tabular", 2, ("x", "z")),))
    with pytest.raises(ValueError, match="site 'two'.*site 'four'"):
        union_specs([s2, bad_cols])


def test_load_sites_lists_problems_of_every_site(tmp_path: Path) -> None:
    synthetic_site(tmp_path, "a")
    synthetic_site(tmp_path, "b")
    synthetic_site(tmp_path, "c")
    assert [s.name for s in load_sites(tmp_path, ["c", "a"])] == ["c", "a"]
    set_cell(tmp_path / "a", "P0001", "time", "-1")
    set_cell(tmp_path / "b", "P0002", "event", "9")
    with pytest.raises(SitesValidationError) as exc:
        load_sites(tmp_path, ["a", "b", "c"])
    msg = str(exc.value)
    assert "patient P0001" in msg and "patient P0002" in msg
    assert len(exc.value.errors) == 2


def test_two_folders_with_one_site_name_are_refused(tmp_path: Path) -> None:
    """A copied folder whose site.yaml was not renamed would silently replace the other site."""
    from simulations.cv import make_folds
    from sites.loader import require_distinct_names

    synthetic_site(tmp_path, "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    with pytest.raises(ValueError, match=r"sites .*/a and .*/b are both named 'a' in their site.yaml"):
        load_sites(tmp_path, ["a", "b"])
    sites = [load_site(tmp_path / "a"), load_site(tmp_path / "b")]
    with pytest.raises(ValueError, match="both named 'a'"):
        make_folds(sites, "fold_cv")
    with pytest.raises(ValueError, match="both named 'a'"):
        require_distinct_names(sites)


def test_cli_validate(site: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from simulations.cli import main

    assert main(["sites", "validate", str(site)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "24 patients" in out and "seq" in out
    set_cell(site, "P0001", "time", "-1")
    assert main(["sites", "validate", str(site)]) == 1
    out = capsys.readouterr().out
    assert "INVALID" in out and "patients.csv, line 3, patient P0001" in out


def test_python_dash_m_sites(site: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "sites", "validate", str(site)],
                       capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


def test_write_site_is_atomic_and_careful(tmp_path: Path) -> None:
    spec = SiteSpec("broken", "c", "days", ("survival",), (ModalitySpec("v", "vector", 3),))
    layout = SiteLayout(spec, "patients.csv", None, {"v": "v.npz"})
    patients = pd.DataFrame({"patient_id": ["A", "B"], "time": [10.0, -1.0], "event": [1, 0]})
    content = SiteContent(layout, patients, tokens={"v": {"A": np.ones(3, np.float32),
                                                           "B": np.ones(3, np.float32)}})
    with pytest.raises(SiteValidationError, match="negative"):
        write_site(content, tmp_path / "broken")
    assert os.listdir(tmp_path) == []  # no target, no temporary folder left behind

    content.patients.loc[1, "time"] = 5.0
    path = write_site(content, tmp_path / "broken")
    assert validate_site(path) == []
    write_site(content, tmp_path / "broken")  # replacing an existing site folder is fine
    assert sorted(os.listdir(tmp_path)) == ["broken"]

    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a site folder"):
        write_site(content, tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- oracle parts


def test_oracle_parts_load_and_reveal_only_observed_modalities(site: Path) -> None:
    data = load_site(site)
    assert data.oracle_parts is not None and set(data.oracle_parts) == {("seq",), ("vec",), ("tab",)}
    np.testing.assert_allclose(sum(data.oracle_parts.values()), data.oracle_risk, atol=1e-12)
    seen = data.observable_oracle_risk()
    # E[eta | observed parts, site]: an unrevealed part enters at its mean over the site
    expected = sum(np.where(data.modalities[m].present, part, part.mean())
                   for (m,), part in data.oracle_parts.items())
    np.testing.assert_allclose(seen, expected, atol=1e-12)
    full = np.flatnonzero(data.presence_matrix().all(axis=1))
    lacking = np.flatnonzero(~data.presence_matrix().all(axis=1))
    assert len(full) and len(lacking)
    np.testing.assert_allclose(seen[full], data.oracle_risk[full], atol=1e-12)
    assert not np.allclose(seen[lacking], data.oracle_risk[lacking])
    sub = data.subset(lacking)  # parts follow the patients, the site's means stay the site's
    assert sub.part_means() == data.part_means()
    np.testing.assert_array_equal(sub.observable_oracle_risk(), seen[lacking])


def test_unrevealed_part_enters_at_its_site_mean_not_zero(site: Path) -> None:
    """A cohort whose parts sit away from 0: a patient without modality m is ranked
    against its site's other patients at m's site mean, so shifting a part by a constant
    (a higher-risk cohort) shifts every patient's observable risk by that constant."""
    data = load_site(site)
    shift = 2.5
    parts = dict(data.oracle_parts)
    parts[("seq",)] = parts[("seq",)] + shift
    shifted = dataclasses.replace(data, oracle_parts=parts, oracle_risk=data.oracle_risk + shift)
    np.testing.assert_allclose(shifted.observable_oracle_risk(), data.observable_oracle_risk() + shift,
                               atol=1e-12)
    lacking = ~data.modalities["seq"].present
    assert lacking.any()
    assert shifted.part_means()[("seq",)] == pytest.approx(data.part_means()[("seq",)] + shift)


def test_reveal_reads_only_the_named_parts(site: Path) -> None:
    data = load_site(site)
    means = data.part_means()
    only_seq = data.observable_oracle_risk([("seq",)])
    present = data.modalities["seq"].present
    expected = np.where(present, data.oracle_parts[("seq",)], means[("seq",)]) + means[("vec",)] + means[("tab",)]
    np.testing.assert_allclose(only_seq, expected, atol=1e-12)
    np.testing.assert_allclose(data.observable_oracle_risk(list(data.oracle_parts)),
                               data.observable_oracle_risk(), atol=1e-12)
    with pytest.raises(KeyError, match="no oracle parts"):
        data.observable_oracle_risk([("nope",)])


def test_interaction_part_needs_every_named_modality(site: Path) -> None:
    data = load_site(site)
    pres = data.presence_matrix(("seq", "vec"))
    pair = np.linspace(-1, 1, len(data))
    parts = {("seq",): data.oracle_risk - pair, ("seq", "vec"): pair}
    got = dataclasses.replace(data, oracle_parts=parts).observable_oracle_risk()
    both = pres.all(axis=1)
    assert (pres[:, 0] & ~both).any()  # some patients have seq but not vec
    # a subset carries its site's part means; replacing the parts themselves drops them
    again = dataclasses.replace(data.subset(np.arange(len(data))), oracle_parts=parts).observable_oracle_risk()
    np.testing.assert_allclose(again, got, atol=1e-12)
    np.testing.assert_allclose(got, np.where(pres[:, 0], parts[("seq",)], parts[("seq",)].mean())
                               + np.where(both, pair, pair.mean()))


def test_site_without_oracle_parts_still_loads(site: Path) -> None:
    edit_csv(site / "oracle_risk.csv", lambda df: df[["patient_id", "oracle_risk"]])
    data = load_site(site)
    assert data.oracle_parts is None and data.observable_oracle_risk() is None
    assert data.oracle_risk is not None


def test_oracle_parts_problems_are_named(site: Path) -> None:
    def break_rows(df):
        df.loc[df.patient_id == "P0003", "part:seq"] = str(float(df.loc[df.patient_id == "P0003", "part:seq"].iloc[0]) + 0.5)
        df.loc[df.patient_id == "P0005", "part:vec"] = "abc"
        return df
    edit_csv(site / "oracle_risk.csv", break_rows)
    problems = validate_site(site)
    p = find_problem(problems, "the oracle parts sum to", "oracle_risk.csv", "P0003")
    assert p.line == 5 and "not to oracle_risk" in p.message
    find_problem(problems, "part:vec 'abc' is not a finite number", "oracle_risk.csv", "P0005")
    with pytest.raises(SiteValidationError):
        load_site(site)


def test_oracle_part_naming_an_undeclared_modality(site: Path) -> None:
    edit_csv(site / "oracle_risk.csv", lambda df: df.rename(columns={"part:tab": "part:ct+tab"}))
    p = find_problem(validate_site(site), "names modalities ['ct'] the site does not declare", "oracle_risk.csv")
    assert "declared modalities" in p.message
    edit_csv(site / "oracle_risk.csv", lambda df: df.rename(columns={"part:ct+tab": "extra"}))
    find_problem(validate_site(site), "'extra' is not an oracle part", "oracle_risk.csv")


# ---- fourth review round (mutation testing of sites/): checks that no test exercised ----

def test_documented_minus_one_markers_are_legal(site: Path) -> None:
    """FORMAT.md: status empty *or -1* = no label; fold_<name> empty *or -1* = outside the scheme."""
    set_cell(site, "P0001", "status", "-1")
    set_cell(site, "P0002", "fold_cv", "-1")
    assert validate_site(site) == []
    data = load_site(site)
    assert data.status[1] == -1 and data.folds["fold_cv"][2] == -1


def test_numbers_are_parsed_the_same_whatever_the_other_cells(site: Path) -> None:
    """'1_000' is Python float syntax, not a number in a CSV: it was accepted when every other cell
    of its column parsed, and refused once one did not."""
    set_cell(site, "P0001", "time", "1_000")
    set_cell(site, "P0002", "event", "0_1")
    problems = validate_site(site)
    find_problem(problems, "time '1_000' is not a number", "patients.csv", "P0001")
    find_problem(problems, "must be 0 (censored) or 1", "patients.csv", "P0002")


def test_degenerate_label_columns_are_reported(site: Path) -> None:
    def fn(df):
        df["status"] = ""             # status task without a single label
        df["split_default"] = "train"  # a split without a test patient
        df["fold_cv"] = "0"            # a K-fold scheme with one fold
        return df
    edit_csv(site / "patients.csv", fn)
    problems = validate_site(site)
    find_problem(problems, "tasks list 'status' but no patient has a status label", "patients.csv")
    find_problem(problems, "split_default needs at least one 'train' and one 'test' patient", "patients.csv")
    find_problem(problems, "fold_cv needs at least two folds", "patients.csv")


def test_hidden_files_in_a_modality_folder_are_ignored(site: Path) -> None:
    (site / "seq" / "._P0000.npy").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
    (site / "seq" / ".DS_Store").write_bytes(b"junk")
    assert validate_site(site) == []


def test_every_patient_needs_an_oracle_risk(site: Path) -> None:
    edit_csv(site / "oracle_risk.csv", lambda df: df[df.patient_id != "P0004"])
    find_problem(validate_site(site), "patient has no oracle_risk", "oracle_risk.csv", "P0004")
    with pytest.raises(SiteValidationError):
        load_site(site)


def test_oracle_parts_must_sum_to_the_oracle_risk(site: Path) -> None:
    def fn(df):
        r = df.patient_id == "P0003"
        df.loc[r, "part:seq"] = repr(float(df.loc[r, "part:seq"].iloc[0]) + 1e-3)
        return df
    edit_csv(site / "oracle_risk.csv", fn)
    find_problem(validate_site(site), "the oracle parts sum to", "oracle_risk.csv", "P0003")


def test_load_sites_refuses_a_name_listed_twice(tmp_path: Path) -> None:
    synthetic_site(tmp_path, "a")
    with pytest.raises(ValueError, match=r"site names listed twice: \['a'\]"):
        load_sites(tmp_path, ["a", "a"])


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format_version=2), "format_version 2 is not supported"),
    (lambda d: d.update(tasks=["status"]), "tasks must include 'survival'"),
    (lambda d: d.update(patients="../patients.csv"), "must be a relative path inside the site folder"),
    (lambda d: yaml_modalities(d)["seq"].update(path="../elsewhere/seq/"), "must be a relative path inside the site folder"),
    (lambda d: yaml_modalities(d)["tab"].update(path="patients.csv"), "already used by patients"),
    (lambda d: yaml_modalities(d)["tab"].update(dim=4), "dim 4 does not match its 5 columns"),
    (lambda d: yaml_modalities(d)["vec"].update(dim=True), "dim True must be a positive integer"),
    (lambda d: d["modalities"].append(dict(yaml_modalities(d)["seq"])), "modality 'seq' is declared twice"),
])
def test_site_yaml_structural_problems(site: Path, edit, message: str) -> None:
    edit_yaml(site, edit)
    problems = validate_site(site)
    find_problem(problems, message, "site.yaml")
    with pytest.raises(SiteValidationError):
        load_site(site)


def test_sites_validation_error_lists_and_pickles_every_site() -> None:
    """The error crosses process boundaries (Ray workers) intact, with every site's problems."""
    a = SiteValidationError("a", [Problem("patients.csv", "time is infinite", "P1", 3)])
    b = SiteValidationError("b", [Problem("seq/", "no patient has it"), Problem("x.npz", "bad")])
    err = SitesValidationError([a, b])
    assert err.problems == a.problems + b.problems
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is SitesValidationError and len(again.errors) == 2
    assert str(again) == str(err) and again.problems == err.problems


def _tiny_content(times) -> SiteContent:
    spec = SiteSpec("tiny", "c", "days", ("survival",), (ModalitySpec("v", "vector", 3),))
    layout = SiteLayout(spec, "patients.csv", None, {"v": "v.npz"})
    ids = [f"A{i}" for i in range(len(times))]
    patients = pd.DataFrame({"patient_id": ids, "time": times, "event": [1] + [0] * (len(times) - 1)})
    return SiteContent(layout, patients, tokens={"v": {p: np.ones(3, np.float32) for p in ids}})


def test_written_times_round_trip_exactly(tmp_path: Path) -> None:
    """Times in days (e.g. months x 30.4375) are written without losing digits."""
    times = [42 * 30.4375, 1234.5678, 98765.4321, 0.0]
    site = load_site(write_site(_tiny_content(times), tmp_path / "tiny"))
    np.testing.assert_array_equal(site.time, times)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750)])
def test_written_site_folder_is_world_readable(tmp_path: Path, umask: int, mode: int) -> None:
    """The temporary folder (mkdtemp, mode 0700) becomes a normal site folder (0755 under the
    usual umask 022), so a Flower client running under another account can read it; a stricter
    umask is honoured, as mkdir would."""
    old = os.umask(umask)
    try:
        path = write_site(_tiny_content([10.0, 20.0]), tmp_path / "tiny")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode
