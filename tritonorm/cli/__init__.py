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
import importlib
import sys
from types import ModuleType, SimpleNamespace

from . import info


def _needs_extra(name: str, extra: str) -> ModuleType | SimpleNamespace:
    """The module of subcommand ``name``; where numpy, which comes with the ``extra`` extra
    (``compare`` and ``bench`` import it), is not installed, a stand-in whose parser takes any
    arguments (no option prefix, none looks like an option) and whose run says what to
    install, so that ``tritonorm info`` works with the library alone."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as error:
        if error.name != "numpy":
            raise
    message = f"tritonorm {name} needs numpy: pip install 'tritonorm[{extra}]'"

    def add_parser(subparsers) -> None:
        parser = subparsers.add_parser(name, help=f"({message})", description=message, prefix_chars="\0",
                                       add_help=False)
        parser.add_argument("arguments", nargs="*")
        parser.set_defaults(run=lambda args: print(message, file=sys.stderr) or 2)

    return SimpleNamespace(add_parser=add_parser)


COMMANDS = (_needs_extra("compare", "compare"), _needs_extra("bench", "bench"), info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tritonorm", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{compare,bench,info}")
    for command in COMMANDS:
        command.add_parser(subparsers)
    args = parser.parse_args(argv)
    return args.run(args)
