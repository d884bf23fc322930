"""sites/loader.py: checks that the earlier rounds' tests did not pin (seventh review round,
mutation testing of the loader). Every bad input must be named by file, patient/line and
what is wrong; every good input must load with its exact values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sites import Problem, load_site, validate_site
from sites.writer import write_npz
from sites_fixtures import edit_csv, edit_yaml, find_problem, npz_arrays, set_cell, synthetic_site


def _line_of(path: Path, start: str) -> int:
    """1-based line of the first line of ``path`` starting with ``start``."""
    for i, line in enumerate(path.read_text().splitlines()):
        if line.startswith(start):
            return i + 1
    raise AssertionError(f"{start!r} not in {path}")


def _seq_pid(site: Path) -> str:
    return sorted(p.stem for p in (site / "seq").glob("*.npy"))[0]


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    return synthetic_site(tmp_path)


# ----------------------------------------------------------------------------- summarising


def test_more_than_twenty_problems_of_one_kind_are_summarised(site: Path) -> None:
    """24 negative times, each with its own message: 20 listed, then one summary naming the
    kind and the 4 not listed (the kind, not the message, is what is counted)."""
    edit_csv(site / "patients.csv",
             lambda df: df.assign(time=[str(-(i + 1)) for i in range(len(df))]))
    problems = validate_site(site)
    negative = [p for p in problems if "is negative" in p.message]
    assert len(negative) == 20
    assert [p.patient for p in negative] == [f"P{i:04d}" for i in range(20)]
    assert [p.line for p in negative] == list(range(2, 22))
    summary = [p for p in problems if p.message.startswith("... and")]
    assert summary == [Problem("patients.csv", "... and 4 more problems like: negative time")]


def test_exactly_twenty_problems_of_one_kind_are_all_listed(site: Path) -> None:
    edit_csv(site / "patients.csv",
             lambda df: df.assign(time=[str(-(i + 1)) if i < 20 else t for i, t in enumerate(df.time)]))
    problems = validate_site(site)
    assert len([p for p in problems if "is negative" in p.message]) == 20
    assert not any(p.message.startswith("... and") for p in problems)


# ----------------------------------------------------------------------------- CSV reading


def test_spaces_around_header_names_ids_and_numbers_are_ignored(site: Path) -> None:
    ref = load_site(site)
    text = (site / "patients.csv").read_text().splitlines()
    text[0] = ", ".join(text[0].split(","))  # 'patient_id, time, event, ...'
    row = text[4].split(",")  # P0003
    row[0], row[1] = f"  {row[0]} ", f" {row[1]}  "
    text[4] = ",".join(row)
    (site / "patients.csv").write_text("\n".join(text) + "\n")
    assert validate_site(site) == []
    data = load_site(site)
    np.testing.assert_array_equal(data.patient_ids, ref.patient_ids)
    np.testing.assert_array_equal(data.time, ref.time)


def test_a_blank_cell_of_spaces_is_missing_not_a_bad_number(site: Path) -> None:
    set_cell(site, "P0002", "time", "   ")
    p = find_problem(validate_site(site), "time is missing", "patients.csv", "P0002")
    assert p.line == 4


def test_tabular_line_numbers_count_blank_lines(site: Path) -> None:
    tab = site / "tab.csv"
    pid = pd.read_csv(tab, dtype=str).patient_id.iloc[3]
    set_cell(site, pid, "x1", "abc", file="tab.csv")
    text = tab.read_text().splitlines()
    text.insert(2, "")
    (tab).write_text("\n".join(text) + "\n")
    p = find_problem(validate_site(site), "column 'x1': value 'abc' is not a number", "tab.csv", pid)
    assert p.line == _line_of(tab, pid + ",") == 6


def test_header_names_equal_once_stripped_are_reported_twice(site: Path) -> None:
    text = (site / "tab.csv").read_text().splitlines()
    text[0] = text[0].replace(",x1,", ", x0,")  # patient_id,x0, x0,x2,x3,x4
    (site / "tab.csv").write_text("\n".join(text) + "\n")
    find_problem(validate_site(site), "header lists columns twice: ['x0']", "tab.csv")


# ----------------------------------------------------------------------------- patients.csv


def test_invalid_patient_id_names_its_line(site: Path) -> None:
    set_cell(site, "P0004", "patient_id", "bad id")
    p = find_problem(validate_site(site), "patient_id 'bad id' is not valid", "patients.csv")
    assert p.line == 6 and p.patient is None


def test_missing_time_names_its_line(site: Path) -> None:
    set_cell(site, "P0006", "time", "")
    p = find_problem(validate_site(site), "time is missing", "patients.csv", "P0006")
    assert p.line == 8


def test_status_column_without_status_task_is_reported(site: Path) -> None:
    edit_yaml(site, lambda d: d.update(tasks=["survival"]))
    find_problem(validate_site(site), "has a status column but site.yaml tasks do not list 'status'",
          "patients.csv")


@pytest.mark.parametrize("column", ["fold_", "split_", "fold_-x", "split_a b"])
def test_fold_and_split_columns_need_a_well_formed_name(site: Path, column: str) -> None:
    edit_csv(site / "patients.csv", lambda df: df.rename(columns={"fold_cv": column}))
    find_problem(validate_site(site), f"unknown column {column!r}", "patients.csv")


def test_status_two_is_refused(site: Path) -> None:
    set_cell(site, "P0002", "status", "2")
    p = find_problem(validate_site(site), "status '2' must be 0, 1 or empty", "patients.csv", "P0002")
    assert p.line == 4


def test_labels_load_with_their_values(site: Path) -> None:
    """event and status as written (an empty status is -1 = no label, never 0)."""
    df = pd.read_csv(site / "patients.csv", dtype=str, keep_default_na=False)
    data = load_site(site)
    np.testing.assert_array_equal(data.event, df.event.astype(int))
    want_status = [int(s) if s else -1 for s in df.status]
    assert -1 in want_status and 0 in want_status and 1 in want_status
    np.testing.assert_array_equal(data.status, want_status)
    np.testing.assert_array_equal(data.time, df.time.astype(float))


def test_split_values_are_case_insensitive_and_loaded_lower_case(site: Path) -> None:
    edit_csv(site / "patients.csv",
             lambda df: df.assign(split_default=df.split_default.str.upper()))
    assert validate_site(site) == []
    v = load_site(site).folds["split_default"]
    assert set(v) <= {"train", "test", ""} and "train" in set(v) and "test" in set(v)


def test_fold_minus_two_is_refused(site: Path) -> None:
    set_cell(site, "P0003", "fold_cv", "-2")
    p = find_problem(validate_site(site), "fold_cv value '-2' must be a fold number", "patients.csv", "P0003")
    assert p.line == 5


def test_patient_without_modality_after_a_dropped_row_names_its_own_line(site: Path) -> None:
    """A repeated row is dropped; the lines of the rows after it must not shift."""
    edit_csv(site / "patients.csv",
             lambda df: pd.concat([df.iloc[:2], df.iloc[[1]], df.iloc[2:]], ignore_index=True))
    pid = "P0006"
    (site / "seq" / f"{pid}.npy").unlink(missing_ok=True)
    arrays = npz_arrays(site / "vec.npz")
    arrays.pop(pid, None)
    write_npz(site / "vec.npz", arrays)
    edit_csv(site / "tab.csv", lambda df: df[df.patient_id != pid])
    problems = validate_site(site)
    assert find_problem(problems, "duplicate patient_id", "patients.csv", "P0001").line == 4
    p = find_problem(problems, "no modality at all", "patients.csv", pid)
    assert p.line == _line_of(site / "patients.csv", pid + ",") == 9


# ----------------------------------------------------------------------------- token files


def test_long_double_embeddings_are_refused(site: Path) -> None:
    if np.dtype(np.longdouble).itemsize not in (12, 16):
        pytest.skip("long double is float64 on this platform")
    pid = _seq_pid(site)
    np.save(site / "seq" / f"{pid}.npy", np.ones((3, 16), np.longdouble))
    find_problem(validate_site(site), f"dtype {np.dtype(np.longdouble)} is not accepted",
          f"seq/{pid}.npy", pid)


def test_float64_at_exactly_the_float32_maximum_is_accepted(site: Path) -> None:
    pid = _seq_pid(site)
    arr = np.zeros((3, 16), np.float64)
    arr[1, 2] = np.finfo(np.float32).max
    arr[2, 0] = -float(np.finfo(np.float32).max)
    np.save(site / "seq" / f"{pid}.npy", arr)
    assert validate_site(site) == []
    data = load_site(site)
    got = data.modalities["seq"].tokens(list(data.patient_ids).index(pid))
    assert np.isfinite(got).all() and got[1, 2] == np.finfo(np.float32).max


def test_a_non_npy_file_in_a_modality_folder_is_an_unexpected_entry(site: Path) -> None:
    pid = _seq_pid(site)
    (site / "seq" / f"{pid}.txt").write_text("notes")
    (site / "seq" / "README").write_text("notes")
    problems = validate_site(site)
    for name in (f"{pid}.txt", "README"):
        p = find_problem(problems, "unexpected entry", f"seq/{name}")
        assert p.patient is None
    assert not any("unknown patient" in p.message or "unreadable" in p.message for p in problems)


def test_token_values_and_offsets_are_loaded_per_patient(site: Path) -> None:
    data = load_site(site)
    seq = data.modalities["seq"]
    for i, pid in enumerate(data.patient_ids):
        f = site / "seq" / f"{pid}.npy"
        assert seq.present[i] == f.exists()
        if f.exists():
            np.testing.assert_array_equal(seq.tokens(i), np.load(f).astype(np.float32))
    arrays = npz_arrays(site / "vec.npz")
    vec = data.modalities["vec"]
    for i, pid in enumerate(data.patient_ids):
        assert vec.present[i] == (pid in arrays)
        if pid in arrays:
            np.testing.assert_array_equal(vec.tokens(i), np.atleast_2d(arrays[pid]).astype(np.float32))


# ----------------------------------------------------------------------------- tables


def test_table_with_a_header_and_no_row_is_reported(site: Path) -> None:
    edit_csv(site / "tab.csv", lambda df: df.iloc[:0])
    find_problem(validate_site(site), "modality 'tab' is declared in site.yaml but the file has no rows",
          "tab.csv")


@pytest.mark.parametrize("value", ["inf", "-inf", "Infinity"])
def test_infinite_table_value_is_reported(site: Path, value: str) -> None:
    pid = pd.read_csv(site / "tab.csv", dtype=str).patient_id.iloc[2]
    set_cell(site, pid, "x3", value, file="tab.csv")
    p = find_problem(validate_site(site), "column 'x3': value is infinite", "tab.csv", pid)
    assert p.line == 4


# ----------------------------------------------------------------------------- oracle_risk.csv


def test_oracle_columns_in_the_wrong_order_are_reported(site: Path) -> None:
    edit_csv(site / "oracle_risk.csv",
             lambda df: df[["oracle_risk", "patient_id", *df.columns[2:]]])
    find_problem(validate_site(site), "must start with the columns patient_id, oracle_risk",
          "oracle_risk.csv")


def test_one_oracle_part_named_twice_is_reported(site: Path) -> None:
    def fn(df):
        df["part:seq+vec"] = "0"
        df["part:vec+seq"] = "0"
        return df
    edit_csv(site / "oracle_risk.csv", fn)
    find_problem(validate_site(site), "column 'part:vec+seq' repeats the oracle part of 'part:seq+vec'",
          "oracle_risk.csv")


@pytest.mark.parametrize("value", ["inf", "-inf", ""])
def test_oracle_risk_must_be_finite(site: Path, value: str) -> None:
    set_cell(site, "P0002", "oracle_risk", value, file="oracle_risk.csv")
    p = find_problem(validate_site(site), f"oracle_risk {value!r} is not a finite number",
              "oracle_risk.csv", "P0002")
    assert p.line == 4


def test_unknown_patient_in_oracle_file_is_reported(site: Path) -> None:
    set_cell(site, "P0003", "patient_id", "GHOST", file="oracle_risk.csv")
    problems = validate_site(site)
    p = find_problem(problems, "unknown patient id", "oracle_risk.csv", "GHOST")
    assert p.line == 5


def test_oracle_values_and_parts_load_per_patient(site: Path) -> None:
    df = pd.read_csv(site / "oracle_risk.csv")
    data = load_site(site)
    order = [list(df.patient_id).index(p) for p in data.patient_ids]
    np.testing.assert_array_equal(data.oracle_risk, df.oracle_risk.to_numpy()[order])
    for (m,), part in data.oracle_parts.items():
        np.testing.assert_array_equal(part, df[f"part:{m}"].to_numpy()[order])


# ----------------------------------------------------------------------------- defects found by the sixth review round


def test_a_header_naming_one_column_twice_is_reported_as_such(site: Path) -> None:
    """pandas renamed the repeat to 'x0.1' before the check: 'declared but not in the file: ['x1']'."""
    text = (site / "tab.csv").read_text().splitlines()
    text[0] = text[0].replace("x1", "x0")  # patient_id,x0,x0,x2,x3,x4
    (site / "tab.csv").write_text("\n".join(text) + "\n")
    problems = validate_site(site)
    find_problem(problems, "header lists columns twice: ['x0']", "tab.csv")
    assert not any("x0.1" in p.message for p in problems)
    pat = site / "patients.csv"
    lines = pat.read_text().splitlines()
    lines[0] = lines[0].replace("event", "time")  # was "unknown column 'time.1'"
    pat.write_text("\n".join(lines) + "\n")
    problems = validate_site(site)
    find_problem(problems, "header lists columns twice: ['time']", "patients.csv")
    assert not any("time.1" in p.message for p in problems)


def test_lines_after_a_multi_line_quoted_cell_are_the_true_lines(site: Path) -> None:
    """Rows after such a cell used to be numbered as rows: each problem named the line before its own."""
    tab = site / "tab.csv"
    text = tab.read_text().splitlines()
    first = text[1].split(",")
    first[1] = '"1\n2"'
    text[1] = ",".join(first)
    later = text[4].split(",")
    later[1] = "abc"
    text[4] = ",".join(later)
    tab.write_text("\n".join(text) + "\n")
    problems = validate_site(site)
    assert find_problem(problems, "is not a number", "tab.csv", first[0]).line == 2  # the row's first line
    p = find_problem(problems, "value 'abc' is not a number", "tab.csv", later[0])
    assert p.line == _line_of(tab, later[0] + ",") == 6
