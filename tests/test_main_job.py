"""The main-job driver's own logic (no Flower run): its run-config extras and which SuperLink it stops."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from simulations.main_job import _superlink_pids, run_config_extras


def test_extras_keep_one_torch_thread_per_client_and_refuse_the_drivers_own_keys():
    assert run_config_extras([]) == ['model-overrides="train.num_threads=1"']
    assert run_config_extras(['num-server-rounds=3', 'model-overrides="model.use_gcs=false"']) == [
        'num-server-rounds=3', 'model-overrides="model.use_gcs=false; train.num_threads=1"']
    assert run_config_extras(['model-overrides="train.num_threads=2"']) == ['model-overrides="train.num_threads=2"']
    with pytest.raises(SystemExit, match="run-name is set by this command: use --run-name"):
        run_config_extras(['run-name="x"', "resume=true"])


def test_only_the_superlink_of_this_flower_home_is_ours(tmp_path: Path):
    """A process named flower-superlink started with another FLWR_HOME is never stopped, even one
    whose FLWR_HOME starts with this one's (``<home>2``: no prefix match)."""
    mine, other, longer = tmp_path / "mine", tmp_path / "other", tmp_path / "mine2"
    procs = [subprocess.Popen(["flower-superlink-test", "30"], executable="/bin/sleep",
                              env={**os.environ, "FLWR_HOME": str(home)}) for home in (mine, other, longer)]
    try:
        time.sleep(0.2)
        assert procs[0].pid in _superlink_pids(mine) and procs[1].pid not in _superlink_pids(mine)
        assert procs[1].pid in _superlink_pids(other)
        assert procs[2].pid not in _superlink_pids(mine)
    finally:
        for p in procs:
            p.kill()
            p.wait()
