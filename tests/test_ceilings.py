"""simulations.ceilings: perfect readers of the generator's latent risk on each test fold."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from shared_model.metrics import site_cindices
from simulations.ceilings import fold_ceilings, main, readers, render, summarise
from simulations.cv import make_folds
from sites import load_site
from sites_fixtures import edit_csv, synthetic_site


@pytest.fixture()
def site(tmp_path: Path):
    """The synthetic site with an interaction part between seq and vec carved out of seq's part."""
    data = load_site(synthetic_site(tmp_path, n=40, seed=5))
    parts = dict(data.oracle_parts)
    pair = np.linspace(-1.0, 1.0, len(data))
    parts[("seq",)] = parts[("seq",)] - pair + 0.7  # an off-centre part: a high-risk cohort's
    parts[("seq", "vec")] = pair - 0.7
    return dataclasses.replace(data, oracle_parts=parts)


def _c(site, rows, risk):
    return site_cindices({site.name: (site.time[rows], site.event[rows], risk[rows])})["cindex"]


def test_each_reader_is_the_c_of_its_perfect_risk_on_each_test_fold(site) -> None:
    sites = {site.name: site}
    folds = make_folds([site], "fold_cv")
    got = fold_ceilings(sites, folds)
    assert list(got) == ["oracle", "observable", "observable, no interaction", "seq alone", "tab alone",
                         "vec alone"]
    pres = {m: site.modalities[m].present for m in ("seq", "vec", "tab")}
    p = site.oracle_parts
    mean = {k: v.mean() for k, v in p.items()}
    fill = {k: np.where(np.all([pres[m] for m in k], axis=0), v, mean[k]) for k, v in p.items()}
    expected = {
        "oracle": site.oracle_risk,
        "observable": sum(fill.values()),
        "observable, no interaction": fill[("seq",)] + fill[("vec",)] + fill[("tab",)] + mean[("seq", "vec")],
    }
    for name, risk in expected.items():
        assert got[name] == pytest.approx([_c(site, f.test[site.name], risk) for f in folds], abs=1e-12), name
    # m alone: m's part, on the test patients who have m (the patients a single:m model scores)
    has = pres["seq"]
    assert not has.all()
    alone = [_c(site, f.test[site.name][has[f.test[site.name]]], p[("seq",)]) for f in folds]
    assert got["seq alone"] == pytest.approx(alone, abs=1e-12)
    # the observable reader is the oracle on patients with every modality, below it elsewhere
    full = np.all(list(pres.values()), axis=0)
    np.testing.assert_allclose(expected["observable"][full], site.oracle_risk[full], atol=1e-12)
    s = summarise(got)
    assert s["oracle"]["mean"] == pytest.approx(np.mean(got["oracle"]))
    assert s["oracle"]["std"] == pytest.approx(np.std(got["oracle"]))  # ddof=0, as oncofed cv
    # a reader whose C is undefined on every fold is shown as a dash, not a crash
    nowhere = summarise({"none": [None, None]})
    assert nowhere["none"]["mean"] is None and "| none | — | —, — |" in render(nowhere, "# t")


def test_a_site_without_oracle_parts_is_refused_by_name(tmp_path: Path) -> None:
    path = synthetic_site(tmp_path, name="real")
    edit_csv(path / "oracle_risk.csv", lambda df: df[["patient_id", "oracle_risk"]])
    data = load_site(path)
    with pytest.raises(ValueError, match=r"\['real'\].*no oracle parts"):
        readers({"real": data})


def test_cli_writes_the_table_and_what_is_simulated(tmp_path: Path) -> None:
    synthetic_site(tmp_path / "sites", name="s1", n=30, seed=1)
    out = tmp_path / "out"
    main(["--sites-dir", str(tmp_path / "sites"), "--sites", "s1", "--folds", "fold_cv", "--out", str(out)])
    doc = json.loads((out / "ceilings.json").read_text())
    assert doc["sites"] == ["s1"] and doc["folds_column"] == "fold_cv"
    assert set(doc["ceilings"]) == {"oracle", "observable", "seq alone", "vec alone", "tab alone"}
    assert all(len(v["folds"]) == len(doc["folds"]) for v in doc["ceilings"].values())
    md = (out / "ceilings.md").read_text()
    assert "| observable |" in md and "site mean" in md


def test_a_site_without_a_modalitys_part_is_not_scored_by_its_alone_reader(site) -> None:
    """``<m> alone`` scores no patient of a site whose generator has no part of m (NaN, not a
    constant risk that would add tied pairs to the within-site C)."""
    parts = {k: v for k, v in site.oracle_parts.items() if "vec" not in k}
    other = dataclasses.replace(site, spec=dataclasses.replace(site.spec, name="other"), oracle_parts=parts)
    both = fold_ceilings({site.name: site, "other": other}, make_folds([site, other], "fold_cv"))
    alone = fold_ceilings({site.name: site}, make_folds([site], "fold_cv"))
    assert both["vec alone"] == pytest.approx(alone["vec alone"], abs=1e-12)
