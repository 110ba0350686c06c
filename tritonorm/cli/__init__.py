"""The command line: ``tritonorm`` (console script) or ``python -m tritonorm``.

    tritonorm compare   train one model with each normalization on real data; table, JSON, CSV, PNG
    tritonorm bench     the roofline benchmarks on this device, one table
    tritonorm info      versions, device, and what backend "auto" picks and why

Each subcommand lives in its own module with ``add_parser(subparsers)``, which registers its
arguments and sets ``run``, the function that takes the parsed arguments and returns the
exit status.
"""

from __future__ import annotations

import argparse

from . import bench, compare, info

COMMANDS = (compare, bench, info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tritonorm", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{compare,bench,info}")
    for command in COMMANDS:
        command.add_parser(subparsers)
    args = parser.parse_args(argv)
    return args.run(args)
