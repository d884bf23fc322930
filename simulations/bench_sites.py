"""Benchmark: loading (with full validation) all five built-in sites. Target: median < 5 s.

    python simulations/bench_sites.py [--root DIR] [--repeats 5] [--seed 0]

Builds the sites into a temporary folder unless ``--root`` already holds them,
then loads all five ``--repeats`` times and prints the median wall time of one
full load, the per-site medians and each site's counts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from sites.builtin import BUILTIN_SITES, build_all
from sites.cli import summary_line
from sites.loader import load_site

TARGET_S = 5.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=None, help="folder with the five sites")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="oncofed-bench-") as tmp:
        root = args.root or Path(tmp)
        if not all((root / n / "site.yaml").is_file() for n in BUILTIN_SITES):
            t0 = time.perf_counter()
            build_all(root, seed=args.seed)
            print(f"built the five sites in {time.perf_counter() - t0:.2f} s under {root}")
        per_site: dict[str, list[float]] = {n: [] for n in BUILTIN_SITES}
        totals = []
        sites = []
        for _ in range(args.repeats):
            t_all = time.perf_counter()
            sites = []
            for name in BUILTIN_SITES:
                t0 = time.perf_counter()
                sites.append(load_site(root / name))
                per_site[name].append(time.perf_counter() - t0)
            totals.append(time.perf_counter() - t_all)
        med = statistics.median(totals)
        print(f"load all five sites (validated), median of {args.repeats}: {med:.3f} s "
              f"(min {min(totals):.3f}, max {max(totals):.3f}); target < {TARGET_S:.0f} s: "
              f"{'OK' if med < TARGET_S else 'MISSED'}")
        for site in sites:
            print(f"  {statistics.median(per_site[site.name]):6.3f} s  {summary_line(site)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
