"""One real `flwr run` (Ray simulation, local SuperLink) on two tiny sites.

Checks the run's final status with `flwr ls` (``flwr run`` itself exits 0 even when a
run fails, ../shared/FLOWER.md §0.3) through the same wrapper users run, under an
outer timeout so a hung run fails the test instead of hanging CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sites.synthetic import write_synthetic_site

ROOT = Path(__file__).resolve().parent.parent
SMALL = ("model.d_inter=16; model.d_token=8; model.hazard_hidden=16; model.dce_dim=8; "
         "model.n_heads=2; train.num_threads=1")


def test_flwr_run_simulation_completes(tmp_path: Path):
    sites = tmp_path / "sites"
    write_synthetic_site(sites, "north", 30, modalities=(("ct", "sequence", 8), ("lab", "tabular", 4)), seed=1)
    write_synthetic_site(sites, "south", 30, modalities=(("lab", "tabular", 4),), seed=2)
    cmd = [sys.executable, "-m", "simulations.main_job", "--sites-dir", str(sites), "--sites", "north,south",
           "--flwr-home", str(tmp_path / "flwr"), "--results-dir", str(tmp_path / "results"),
           "--run-name", "smoke", "--timeout", "240", "--",
           "num-server-rounds=1", "min-sites=2", f'model-overrides="{SMALL}"']
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"flwr run did not finish within 300 s:\n{(exc.stdout or '')[-3000:]}")
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "finished:completed" in log, log[-4000:]
    run = tmp_path / "results" / "smoke"
    rounds = json.loads((run / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1] and set(rounds[0]["sites"]) == {"north", "south"}
    assert (run / "km_final.png").exists() and (run / "final_model.pt").exists()
