"""Flower's run-time dependency step must work on an offline machine (../shared/FLOWER.md §0.2).

The SuperLink runs ``uv sync`` on the app's ``pyproject.toml`` before a run (unless
FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION is set). uv resolves every dependency and every
extra of the project, so anything listed there fails offline; this runs the same command as
``flwr.supercore.superexec.dependency_installer`` with ``--offline`` on a copy of the project file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_flowers_uv_sync_succeeds_offline_on_this_pyproject(tmp_path):
    pytest.importorskip("uv")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(tmp_path / "env"), "UV_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("VIRTUAL_ENV", None)
    cmd = [sys.executable, "-m", "uv", "sync", "--offline", "--python", sys.executable, "--no-install-project",
           "--no-install-package", "flwr", "--inexact"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
