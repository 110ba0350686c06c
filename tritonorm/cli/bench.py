"""``tritonorm bench``: the roofline benchmarks on this device, as one table.

On a CUDA device it runs the GPU cases of ``tritonorm.bench.roofline`` (``--quick``: a few of
them; the full run takes a while, torch.compile of every reference included); on the CPU,
the tiny cases with the PyTorch implementations only, which check that the benchmarks run
(their fractions of the floor are against a GPU's peak bandwidth).  It prints one table,
a row per case, contender and pass: time, GB/s over the bytes the operation must move, the
fraction of the bandwidth floor, and the time over the closest torch baseline's and over
torch.compile of the reference's (the legend under the table names the baselines).
``--out DIR`` also writes the roofline's markdown page and JSON record there.

Exit status: 0; 1 when a case failed (listed under the table); 2 when ``--device cuda``
finds no CUDA device.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import torch

from ..bench import roofline
from ..bench.enorm_cases import SGD_STEP
from ..bench.equinorm_cases import NORM_ONLY
from ..bench.lp_cases import BASELINE

# (header, row key, number format; None: text, left-aligned).
COLUMNS = (
    ("op", "op", None), ("contender", "contender", None), ("shape", "shape", None), ("dtype", "dtype", None),
    ("pass", "pass", None), ("time (us)", "time_us", ".1f"), ("GB/s", "gbps", ".4g"),
    ("floor/time", "floor_fraction", ".1%"), ("/ torch", "vs_torch", ".2f"), ("/ compiled", "vs_compiled", ".2f"),
)
LEGEND_WIDTH = 110
LEGEND = (
    "GB/s: the bytes the operation must move / time (none for the EquiNorm layer rows, which include a "
    "convolution). "
    "floor/time: the time those bytes take at the peak bandwidth, over the time. "
    "/ torch: time over the torch baseline's at the same shape, dtype and pass: nn.BatchNorm2d (*-bn), "
    "nn.Conv2d + nn.BatchNorm2d (equinorm layers), the PyTorch reference (equinorm kernels), one SGD step "
    "(enorm), torch.nn.utils.parametrizations.weight_norm (bounded-wn). "
    "/ compiled: time over torch.compile of the reference's (*-bn, equinorm), of the plain formula "
    "rho * v / ||v|| (bounded-wn)."
)


def add_parser(subparsers) -> None:
    """Register ``bench`` and its options."""
    parser = subparsers.add_parser("bench", help="the roofline benchmarks on this device, one table",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="on CUDA, a few shapes, layers and weights only")
    parser.add_argument("--only", action="append", choices=roofline.SECTIONS,
                        help="run this section only (repeatable; default: all)")
    parser.add_argument("--out", type=Path, help="write the markdown page and the JSON record to this directory")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        help="cuda: the GPU cases; cpu: tiny cases, PyTorch paths only (default: cuda if available)")
    parser.add_argument("--peak-gbps", type=float, help="peak DRAM bandwidth, GB/s (default: from the device name)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Measure, print the table, write the files if asked; the exit status."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("tritonorm bench: --device cuda, but torch sees no CUDA device (use --device cpu)", file=sys.stderr)
        return 2
    result = roofline.run(roofline.plan_for(device, args.quick), args.only or roofline.SECTIONS, args.peak_gbps)
    print(render(result))
    if args.out is not None:
        stem = roofline.write(result, args.out)
        print(f"\nwrote {stem}.md and {stem}.json")
    return 1 if result.errors else 0


def render(result: roofline.Roofline) -> str:
    """The set-up line, the table, its legend and the failed cases."""
    meta = result.meta
    scope = "tiny cases, PyTorch paths only" if meta["device"] == "cpu" else "median of the whole call"
    lines = [
        f"tritonorm bench on {meta['device']} ({scope}): torch {meta['torch']}, triton {meta['triton']}, "
        f"tritonorm {meta['tritonorm']}, {meta['date']}; peak {meta['peak_gbps']:.0f} GB/s ({meta['peak_source']})",
        "",
        format_table(table_rows(result.record)),
        "",
        textwrap.fill(LEGEND, LEGEND_WIDTH),
    ]
    if result.errors:
        lines += ["", "Failed cases:", *(f"  {e}" for e in result.errors)]
    return "\n".join(lines)


def table_rows(record: dict) -> list[dict]:
    """The rows of every section in the roofline's JSON ``record``, with the keys of ``COLUMNS``."""
    return [*_lp_rows(record["rows"]), *_equinorm_rows(record["equinorm_layers"]),
            *_kernel_rows(record["equinorm_kernels"]), *_enorm_rows(record["enorm"]),
            *_bwn_rows(record["bounded_weight_norm"])]


def _lp_rows(rows: list[dict]) -> list[dict]:
    return [{
        "op": "bn" if r["norm"] == BASELINE[0] else f"{r['norm']}-bn", "contender": r["impl"], "shape": r["shape"],
        "dtype": r["dtype"], "pass": r["pass"], "time_us": r["time_us"], "gbps": r["gbps"],
        "floor_fraction": r["floor_fraction"], "vs_torch": r["vs_batchnorm"], "vs_compiled": r["vs_compiled"],
    } for r in rows]


def _equinorm_rows(rows: list[dict]) -> list[dict]:
    return [{
        "op": "equinorm norm-only" if r["what"] == NORM_ONLY else r["what"], "contender": r["impl"],
        "shape": r["layer"], "dtype": r["dtype"], "pass": r["pass"], "time_us": r["time_us"], "gbps": None,
        "floor_fraction": None, "vs_torch": r["vs_conv_bn"], "vs_compiled": r["vs_compiled"],
    } for r in rows]


def _kernel_rows(rows: list[dict]) -> list[dict]:
    return [{
        "op": f"equinorm {r['kernel']}", "contender": r["impl"], "shape": r["shape"], "dtype": r["dtype"],
        "pass": r["direction"], "time_us": r["time_us"], "gbps": r["gbps"], "floor_fraction": r["peak_fraction"],
        "vs_torch": r["vs_reference"], "vs_compiled": None,
    } for r in rows]


def _enorm_rows(rows: list[dict]) -> list[dict]:
    return [{
        "op": "enorm", "contender": r["contender"], "shape": r["net"], "dtype": "fp32",
        "pass": "step" if r["contender"] == SGD_STEP else "cycle", "time_us": r["time_us"], "gbps": r["gbps"],
        "floor_fraction": r["peak_fraction"], "vs_torch": r["vs_sgd"], "vs_compiled": None,
    } for r in rows]


def _bwn_rows(rows: list[dict]) -> list[dict]:
    return [{
        "op": "bounded-wn", "contender": r["contender"], "shape": r["weight"], "dtype": r["dtype"],
        "pass": r["pass"], "time_us": r["time_us"], "gbps": r["gbps"], "floor_fraction": r["floor_fraction"],
        "vs_torch": r["vs_weight_norm"], "vs_compiled": r["vs_formula_compiled"],
    } for r in rows]


def _cell(value, spec: str | None) -> str:
    if value is None:
        return "-"
    return str(value) if spec is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
    """``rows`` as aligned plain text under the headers of ``COLUMNS``: text left, numbers
    right, "-" where a value does not apply, at least two spaces between columns (no cell
    holds two spaces in a row)."""
    cells = [[header for header, _, _ in COLUMNS]]
    cells += [[_cell(row[key], spec) for _, key, spec in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if spec is None else v.rjust(w)
                         for v, w, (_, _, spec) in zip(values, widths, COLUMNS)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])])
