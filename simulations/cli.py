"""The ``oncofed`` command line: one entry point, subcommands owned by their modules.

    oncofed sites validate PATH      (sites.cli)
    oncofed sites build --all OUT    (sites.cli)
    oncofed cv ...                   (simulations.cv)
    oncofed cv-merge DIR... --out D  (simulations.cv_merge)
    oncofed compare ...              (simulations.compare)
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand, module providing `register(subparsers)`)
_COMMANDS: tuple[tuple[str, str], ...] = (
    ("sites", "sites.cli"),
    ("cv", "simulations.cv"),
    ("cv-merge", "simulations.cv_merge"),
    ("compare", "simulations.compare"),
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that subcommand's module is imported (fast start)."""
    parser = argparse.ArgumentParser(prog="oncofed", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in _COMMANDS:
        if only is None or name == only:
            importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = argv[0] if argv else None
    parser = build_parser(first if first in dict(_COMMANDS) else None)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
