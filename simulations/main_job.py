"""The main job: a ``flwr run`` simulation of the five built-in sites.

``python -m simulations.main_job`` (what ``make run`` calls):

1. builds the five built-in site folders into ``.oncofed/sites`` if they are not
   there yet, and validates them;
2. sets Flower's environment for an offline machine (../shared/FLOWER.md §0):
   project-local ``FLWR_HOME``, runtime dependency install disabled, no telemetry
   or update check;
3. runs ``flwr run <project> --stream`` with one SuperNode per site, absolute
   ``sites-dir``/``results-dir`` in the run config, from a neutral working
   directory (so Ray workers import the app bundle, not the checkout);
4. checks the run's final status with ``flwr ls`` (``flwr run`` exits 0 even when
   the run fails), stops the local SuperLink it started, and prints where the
   results are. Exit code 0 only for ``finished:completed``.

Extra ``--run-config`` entries can be passed after ``--``, e.g.
``python -m simulations.main_job -- num-server-rounds=20 server-optimizer='"fedadam"'``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = ("hancock", "cptac-pda", "cptac-ucec", "cptac-ccrcc", "tcga-kirc")


def flower_env(flwr_home: Path = ROOT / ".flwr") -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
        RAY_DEDUP_LOGS="0",
        ONCOFED_HOME=str(ROOT / ".oncofed"),
    )
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def ensure_sites(sites_dir: Path, names=BUILTIN) -> None:
    """Build the built-in sites if absent (only for built-in names), then validate ``names``."""
    from sites import validate_site
    from sites.builtin import build_all

    if set(names) <= set(BUILTIN) and not all((sites_dir / n / "site.yaml").exists() for n in names):
        print(f"[oncofed] building the built-in sites into {sites_dir} ...", flush=True)
        t0 = time.perf_counter()
        build_all(sites_dir)
        print(f"[oncofed] sites built in {time.perf_counter() - t0:.1f} s", flush=True)
    problems = [p for n in names for p in validate_site(sites_dir / n)]
    if problems:
        raise SystemExit("[oncofed] site validation failed:\n" + "\n".join(f"  {p}" for p in problems))


def _superlink_pids(flwr_home: Path) -> set[int]:
    """The flower-superlink processes started with this ``FLWR_HOME`` (another user's or another
    checkout's SuperLink is never stopped)."""
    out = subprocess.run(["pgrep", "-f", "flower-superlink"], capture_output=True, text=True)
    mine = set()
    for pid in (int(x) for x in out.stdout.split()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if f"FLWR_HOME={flwr_home}".encode() in environ:
            mine.add(pid)
    return mine


# run-config keys this driver sets from its own options
_OWN_KEYS = {"sites-dir": "--sites-dir", "results-dir": "--results-dir", "run-name": "--run-name",
             "sites": "--sites"}


def run_config_extras(extra: list[str]) -> list[str]:
    """The user's extra run-config entries, checked, with one torch thread per client added to
    ``model-overrides`` (two Ray actors share two cores; oversubscription is ~10x slower)."""
    out = []
    for entry in extra:
        key, _, value = entry.partition("=")
        key = key.strip()
        if key in _OWN_KEYS:
            raise SystemExit(f"[oncofed] {key} is set by this command: use {_OWN_KEYS[key]} instead of "
                             f"{entry!r} after --")
        if key == "model-overrides":
            text = value.strip().strip('"')
            if "train.num_threads" not in text:
                text = f"{text}; train.num_threads=1" if text.strip() else "train.num_threads=1"
            entry = f'model-overrides="{text}"'
        out.append(entry)
    if not any(e.startswith("model-overrides=") for e in out):
        out.append('model-overrides="train.num_threads=1"')
    return out


def stop_processes(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.killpg(os.getpgid(pid), signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def run_status(run_id: str, env: dict[str, str], cwd: Path) -> dict:
    out = subprocess.run(["flwr", "ls", "--run-id", run_id, "--format", "json"],
                         capture_output=True, text=True, env=env, cwd=cwd)
    try:
        data = json.loads(out.stdout)
    except json.JSONDecodeError:
        return {"status": "unknown", "status-details": out.stdout + out.stderr}
    runs = data.get("runs") or []
    return runs[0] if runs else {"status": "unknown", "status-details": out.stdout}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites-dir", default=str(ROOT / ".oncofed" / "sites"))
    ap.add_argument("--sites", default=",".join(BUILTIN), help="site folder names, one SuperNode each")
    ap.add_argument("--flwr-home", default=str(ROOT / ".flwr"), help="Flower's home (CLI config, SuperLink state)")
    ap.add_argument("--results-dir", default=str(ROOT / "results"))
    ap.add_argument("--run-name", default=time.strftime("main-%Y%m%d-%H%M%S"))
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds before the run is stopped")
    ap.add_argument("--keep-superlink", action="store_true", help="leave the local SuperLink running")
    ap.add_argument("extra", nargs="*", help="extra run-config entries key=value (after --)")
    args = ap.parse_args(argv)

    sites_dir = Path(args.sites_dir).resolve()
    results_dir = Path(args.results_dir).resolve()
    names = tuple(x.strip() for x in args.sites.split(",") if x.strip())
    if not names:  # refused here, not after flwr started a federation of 0 SuperNodes
        ap.error(f"--sites names no site ({args.sites!r}); give site folder names, e.g. {','.join(BUILTIN)}")
    from sites.problems import repeated  # sites is imported lazily here (see ensure_sites)

    twice = repeated(names)
    if twice:
        ap.error(f"--sites names {', '.join(twice)} more than once; each site is one SuperNode")
    ensure_sites(sites_dir, names)
    neutral = Path(args.flwr_home).resolve()
    env = flower_env(neutral)
    neutral.mkdir(parents=True, exist_ok=True)
    run_config = " ".join(
        [f'sites-dir="{sites_dir}"', f'results-dir="{results_dir}"', f'run-name="{args.run_name}"',
         f'sites="{",".join(names)}"', *run_config_extras(args.extra)]
    )
    cmd = ["flwr", "run", str(ROOT), "--stream", "--run-config", run_config,
           "--federation-config", f"num-supernodes={len(names)} client-resources-num-cpus=1"]
    before = _superlink_pids(neutral)
    print("[oncofed] " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=neutral, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    started: dict[str, str] = {}

    def pump() -> None:  # echo flwr's output; the timeout below holds even while it is silent
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            m = re.search(r"Successfully started run (\d+)", line)
            if m:
                started["run_id"] = m.group(1)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    status: dict = {"status": "unknown"}
    try:
        proc.wait(timeout=args.timeout)
        reader.join(timeout=5)
        if started.get("run_id"):
            status = run_status(started["run_id"], env, neutral)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        proc.kill()
        if started.get("run_id"):
            subprocess.run(["flwr", "stop", started["run_id"]], env=env, cwd=neutral, capture_output=True)
        print(f"[oncofed] run stopped after {time.perf_counter() - t0:.0f} s", flush=True)
        return 1
    finally:
        if not args.keep_superlink:
            stop_processes(_superlink_pids(neutral) - before)
    run_id = started.get("run_id")
    wall = time.perf_counter() - t0
    if run_id is None:
        print("[oncofed] flwr run did not start a run (see the output above)", flush=True)
        return 1
    run_dir = results_dir / args.run_name
    if not str(status.get("status")).startswith("finished:completed") or not (run_dir / "DONE").exists():
        print(f"[oncofed] run {run_id} did not complete: {status.get('status')} after {wall:.0f} s\n"
              f"{status.get('status-details', '')}", flush=True)
        return 1
    print(f"[oncofed] run {run_id} finished:completed in {wall:.0f} s", flush=True)
    print(f"[oncofed] results folder: {run_dir}", flush=True)
    for name in ("summary.md", "metrics_per_round.csv", "km_final.png", "cindex_per_round.png"):
        print(f"           {run_dir / name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
