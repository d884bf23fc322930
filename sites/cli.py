"""``oncofed sites ...``: validate site folders and build the built-in sites.

    oncofed sites validate PATH [PATH ...]
    oncofed sites build --all OUT_DIR [--seed 0] [--missing default|none]
    oncofed sites build cptac-pda hancock OUT_DIR

``validate`` prints every problem of every folder and exits 1 if there is any;
otherwise one summary line per site (patients, events, modality coverage).
"""

from __future__ import annotations

import argparse
import sys
import time

from sites.builtin import BUILTIN_SITES, MISSING_CHOICES, build_site
from sites.loader import read_site
from sites.types import SiteData


def summary_line(site: SiteData) -> str:
    """One line: name, patients, events, per-modality coverage, and whether it is simulated."""
    n = len(site)
    cover = ", ".join(
        f"{name} {int(md.present.sum())}/{n}" for name, md in site.modalities.items()
    )
    status = ""
    if "status" in site.spec.tasks:
        labelled = site.status >= 0
        status = f", status labels {int(labelled.sum())} ({int((site.status == 1).sum())} positive)"
    sim = " [SIMULATED embeddings]" if site.spec.simulated else ""
    folds = f"; folds: {', '.join(site.folds)}" if site.folds else ""
    return (f"{site.name}: {n} patients, {int(site.event.sum())} events{status}; "
            f"{cover}{folds}{sim}")


def cmd_validate(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.paths:
        site, problems = read_site(path)
        if problems:
            failed += 1
            print(f"INVALID {path}: {len(problems)} problem(s)")
            for p in problems:
                print(f"  - {p}")
        else:
            print(f"OK {path}: {summary_line(site)}")
    return 1 if failed else 0


def cmd_build(args: argparse.Namespace) -> int:
    if args.all and args.names:
        print("oncofed sites build: give either --all or site names, not both", file=sys.stderr)
        return 2
    names = list(BUILTIN_SITES) if args.all else list(args.names)
    if not names:
        print("oncofed sites build: give --all or at least one site name "
              f"({', '.join(BUILTIN_SITES)})", file=sys.stderr)
        return 2
    unknown = [n for n in names if n not in BUILTIN_SITES]
    if unknown:
        print(f"oncofed sites build: unknown site(s) {unknown}; choose from "
              f"{', '.join(BUILTIN_SITES)}", file=sys.stderr)
        return 2
    for name in names:
        t0 = time.perf_counter()
        try:
            path = build_site(name, args.out_dir, seed=args.seed, missing=args.missing)
        except FileExistsError as exc:  # the writer refuses to replace a folder that is not a site
            print(f"oncofed sites build: {exc}", file=sys.stderr)
            return 1
        print(f"built {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``sites`` subcommand (with ``validate`` and ``build``) to ``subparsers``."""
    p = subparsers.add_parser("sites", help="validate site folders; build the built-in sites",
                              description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="sites_command", required=True)

    v = sub.add_parser("validate", help="check site folders and report every problem")
    v.add_argument("paths", nargs="+", metavar="PATH", help="site folder(s)")
    v.set_defaults(func=cmd_validate)

    b = sub.add_parser("build", help="write built-in sites in the site format",
                       description="Write built-in sites: " + ", ".join(BUILTIN_SITES) +
                       ". The CPTAC/TCGA embeddings are SIMULATED around real labels.")
    b.add_argument("--all", action="store_true", help="build all five built-in sites")
    b.add_argument("names", nargs="*", metavar="NAME", help="site name(s), unless --all")
    b.add_argument("out_dir", metavar="OUT_DIR", help="folder that receives one folder per site")
    b.add_argument("--seed", type=int, default=0, help="generator / fold seed (default 0)")
    b.add_argument("--missing", choices=MISSING_CHOICES, default="default",
                   help="patient-level missingness of the simulated sites: the documented "
                        "pattern (default) or none (every patient has both modalities)")
    b.set_defaults(func=cmd_build)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sites")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["sites", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)
