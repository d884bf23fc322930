"""Benchmark of the federation: time per round, communication, memory.

``python -m simulations.bench_federation`` prints, for the five built-in sites:

1. **In-process run** (real ServerApp + ClientApp, ``simulations.local_grid``, no
   Ray; clients run one after another): wall time per round, the share of it spent
   in local training vs. everything else (framework, aggregation, evaluation,
   serialisation), and the bytes each client sends (upload) and receives
   (download) per round, measured on the protobuf wire format, against the raw
   parameter bytes (target: upload <= 1.05x raw).
2. **``flwr run`` simulation** (Ray, ``simulations.main_job``): wall time, rounds
   and the peak memory of the whole simulation — the summed RSS of every process
   the run creates (CLI, SuperLink, SuperExec, ``flwr-simulation``, Ray workers),
   sampled every 0.2 s from /proc.

Medians are over rounds of one run; this machine is shared, so compare ratios
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _pids() -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit()}


class MemorySampler(threading.Thread):
    """Peak summed RSS of processes that did not exist when it started (the benchmark's own
    process, which has run the in-process federation by then, is not counted)."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.before = _pids()
        self.interval = interval
        self.peak_kb = 0
        self.peak_n = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            new = _pids() - self.before
            total = sum(_rss_kb(p) for p in new)
            if total > self.peak_kb:
                self.peak_kb, self.peak_n = total, len(new)
            time.sleep(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def in_process(sites_dir: Path, rounds: int) -> dict:
    from client.client_app import app as client_app
    from server.server_app import app as server_app
    from simulations.local_grid import run_local

    names = ("hancock", "cptac-pda", "cptac-ucec", "cptac-ccrcc", "tcga-kirc")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        _, grid = run_local(
            server_app, client_app, [{"partition-id": i} for i in range(len(names))],
            run_config_overrides={"sites": ",".join(names), "sites-dir": str(sites_dir), "results-dir": tmp,
                                  "run-name": "bench", "num-server-rounds": rounds, "min-sites": 5,
                                  "model-overrides": "train.num_threads=1"},
        )
        wall = time.perf_counter() - t0
        hist = json.loads((Path(tmp) / "bench" / "rounds.json").read_text())
        state = torch.load(Path(tmp) / "bench" / "final_model.pt")
    raw = sum(v.numel() * v.element_size() for v in state.values())
    round_wall = [r["seconds"]["train"] + r["seconds"]["evaluate"] for r in hist]
    train_sum = [sum(s.get("train_seconds", 0.0) for s in r["sites"].values()) for r in hist]
    up_per_round, down_per_round = {}, {}
    for (node, kind), sizes in grid.bytes_up.items():
        up_per_round.setdefault(node, 0)
        up_per_round[node] += sum(sizes) / rounds if kind != "query" else 0
    for (node, kind), sizes in grid.bytes_down.items():
        down_per_round.setdefault(node, 0)
        down_per_round[node] += sum(sizes) / rounds if kind != "query" else 0
    return {"rounds": rounds, "wall": wall, "round_wall": round_wall, "train_sum": train_sum,
            "raw_bytes": raw, "n_arrays": len(state), "up": up_per_round, "down": down_per_round,
            "names": names}


def flwr_run(sites_dir: Path, rounds: int) -> dict:
    sampler = MemorySampler()
    sampler.start()
    t0 = time.perf_counter()
    name = time.strftime("bench-%Y%m%d-%H%M%S")
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.main_job", "--sites-dir", str(sites_dir), "--run-name", name, "--",
         f"num-server-rounds={rounds}"],
        cwd=ROOT, capture_output=True, text=True,
    )
    wall = time.perf_counter() - t0
    sampler.stop()
    return {"rc": proc.returncode, "wall": wall, "peak_mb": sampler.peak_kb / 1024, "n_procs": sampler.peak_n,
            "run_dir": str(ROOT / "results" / name), "tail": proc.stdout[-1500:] + proc.stderr[-1500:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites-dir", default=str(ROOT / ".oncofed" / "sites"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-flwr", action="store_true", help="only the in-process part")
    args = ap.parse_args(argv)
    from simulations.main_job import ensure_sites

    sites_dir = Path(args.sites_dir)
    ensure_sites(sites_dir)

    r = in_process(sites_dir, args.rounds)
    med_round = statistics.median(r["round_wall"])
    share = statistics.median(t / w for t, w in zip(r["train_sum"], r["round_wall"]))
    print(f"In-process federation, 5 sites, {r['rounds']} rounds (clients sequential, no Ray):")
    print(f"  wall per round (median): {med_round:.2f} s; local training {100 * share:.0f} % of it, "
          f"framework + aggregation + evaluation {100 * (1 - share):.0f} %")
    print(f"  model: {r['raw_bytes']:,} raw parameter bytes in {r['n_arrays']} arrays")
    print(f"  {'site':<14}{'upload/round':>16}{'x raw':>8}{'download/round':>17}{'x raw':>8}")
    nodes = sorted(r["up"])
    for node, name in zip(nodes, r["names"]):
        up, down = r["up"][node], r["down"][node]
        print(f"  {name:<14}{up:>16,.0f}{up / r['raw_bytes']:>8.3f}{down:>17,.0f}{down / r['raw_bytes']:>8.3f}")
    worst = max(r["up"].values()) / r["raw_bytes"]
    print(f"  upload per client per round: max {worst:.4f} x raw parameter bytes (target <= 1.05): "
          f"{'OK' if worst <= 1.05 else 'OVER'}")
    print("  (download = the train message and the evaluate message each carry the global model: ~2x raw)")
    if not args.skip_flwr:
        f = flwr_run(sites_dir, args.rounds)
        actors = min(os.cpu_count() or 1, 5)  # main_job gives each client actor one CPU
        print(f"\n`flwr run` simulation (Ray, 5 SuperNodes, {actors} actors), {args.rounds} rounds: rc={f['rc']}, "
              f"wall {f['wall']:.0f} s")
        print(f"  peak memory of the whole simulation: {f['peak_mb']:.0f} MB summed RSS over "
              f"{f['n_procs']} processes")
        rounds_json = Path(f["run_dir"]) / "rounds.json"
        if rounds_json.exists():
            hist = json.loads(rounds_json.read_text())
            per = [x["seconds"]["train"] + x["seconds"]["evaluate"] for x in hist]
            tr = [x["seconds"]["client_train_max"] / (x["seconds"]["train"] + x["seconds"]["evaluate"])
                  for x in hist]
            print(f"  wall per round (median): {statistics.median(per):.2f} s; the slowest client's local "
                  f"training is {100 * statistics.median(tr):.0f} % of it")
        if f["rc"] != 0:
            print(f["tail"])
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
