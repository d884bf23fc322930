"""The ``oncofed`` command line: one entry point, subcommands owned by their modules.

    oncofed sites validate PATH      (sites.cli)
    oncofed sites build --all OUT    (sites.cli)
    oncofed cv ...                   (simulations.cv)
    oncofed compare ...              (simulations.compare)
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand, module providing `register(subparsers)`)
_COMMANDS: tuple[tuple[str, str], ...] = (
    ("sites", "sites.cli"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oncofed", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for _, module in _COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
