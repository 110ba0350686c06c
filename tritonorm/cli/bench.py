"""``tritonorm bench``: the roofline benchmarks on this device, as one table; with
``--traffic``, the bytes and launches of the batch norms counted on any machine.

On a CUDA device it runs the GPU cases of ``tritonorm.bench.roofline`` (``--quick``: a few of
them; the full run takes a while, torch.compile of every reference included); on the CPU,
the tiny cases with the PyTorch implementations only, which check that the benchmarks run
(their fractions of the floor are against a GPU's peak bandwidth).  It prints one table,
a row per case, contender and pass: time, GB/s over the bytes the operation must move, the
fraction of the bandwidth floor, and the time over the closest torch baseline's and over
torch.compile of the reference's (the legend under the table names the baselines).
``--out DIR`` also writes the roofline's markdown page and JSON record there.

``--traffic`` times nothing: it runs the L1 / L-inf / Top-k and mean-only batch norms at
ResNet-50's activations (``--shape``: others) through Triton's interpreter and counts, per training-step
pass, the bytes the kernels move, the launches and the torch ops around them, with the
launches planned for ``--sms`` SMs (132: an H100 or H200); ``tritonorm.bench.traffic_cases``
says what and how.  ``--estimate`` turns the counts into H100 times with a model, beside
cuDNN BatchNorm's; ``--launches`` lists every launch and op; ``--out DIR`` writes the table
as markdown and JSON.  Without ``TRITON_INTERPRET=1`` in this process, it runs itself again
with it.

Exit status: 0; 1 when a case failed (listed under the table); 2 when ``--device cuda``
finds no CUDA device, or a traffic option comes without ``--traffic``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import triton

import tritonorm

from ..bench import roofline, timing, traffic, traffic_cases
from ..bench.enorm_cases import SGD_STEP
from ..bench.equinorm_cases import NORM_ONLY
from ..bench.fused_cases import RELU
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
    "convolution, nor for the stack's training steps). "
    "floor/time: the time those bytes take at the peak bandwidth, over the time. "
    "/ torch: time over the torch baseline's at the same shape, dtype and pass: nn.BatchNorm2d (*-bn), "
    "nn.Conv2d + nn.BatchNorm2d (equinorm layers), the PyTorch reference (equinorm kernels), one SGD step "
    "(enorm), torch.nn.utils.parametrizations.weight_norm (bounded-wn), nn.BatchNorm2d (+ r) + ReLU "
    "(*+relu: fused norms; stack: the stack's training step with it, eager). "
    "/ compiled: time over torch.compile of the reference's (*-bn, equinorm), of the plain formula "
    "rho * v / ||v|| (bounded-wn), of nn.BatchNorm2d (+ r) + ReLU (*+relu) or of the bn stack (stack)."
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
    parser.add_argument("--traffic", action="store_true",
                        help="count the batch norms' bytes, launches and torch ops in Triton's interpreter (no GPU)")
    parser.add_argument("--estimate", action="store_true",
                        help="with --traffic: estimated H100 times (a model) and their ratio to cuDNN BatchNorm's")
    parser.add_argument("--sms", type=_positive_int, default=traffic.H100_SMS,
                        help="with --traffic: plan the launches for this many SMs (default: %(default)s, H100/H200)")
    parser.add_argument("--shape", action="append", type=_shape, metavar="NxCxHxW",
                        help="with --traffic: this activation instead of ResNet-50's (repeatable)")
    parser.add_argument("--launches", action="store_true",
                        help="with --traffic: list every launch (and its bytes per argument) and torch op")
    parser.set_defaults(run=run)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return int(text)


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        return traffic_cases.parse_shape(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    """Measure (or with --traffic, count), print the table, write the files if asked; the
    exit status."""
    if args.traffic:
        return run_traffic(args)
    misused = [f"--{name}" for name in ("estimate", "shape", "launches") if getattr(args, name)]
    misused += ["--sms"] if args.sms != traffic.H100_SMS else []
    if misused:
        print(f"tritonorm bench: {', '.join(misused)} only go with --traffic", file=sys.stderr)
        return 2
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
            *_bwn_rows(record["bounded_weight_norm"]), *_fused_rows(record["fused"]), *_stack_rows(record["stack"])]


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


def _fused_rows(rows: list[dict]) -> list[dict]:
    return [{
        "op": ("bn" if r["norm"] == "bn" else f"{r['norm']}-bn") + ("+relu" if r["epilogue"] == RELU else "+add+relu"),
        "contender": r["impl"], "shape": r["shape"], "dtype": r["dtype"], "pass": r["pass"], "time_us": r["time_us"],
        "gbps": r["gbps"], "floor_fraction": r["floor_fraction"], "vs_torch": r["vs_torch"],
        "vs_compiled": r["vs_compiled"],
    } for r in rows]


def _stack_rows(rows: list[dict]) -> list[dict]:
    return [{
        "op": f"stack {r['norm']}", "contender": r["mode"], "shape": r["stack"], "dtype": r["dtype"], "pass": "step",
        "time_us": r["time_ms"] * 1e3, "gbps": None, "floor_fraction": None, "vs_torch": r["vs_torch"],
        "vs_compiled": r["vs_compiled"],
    } for r in rows]


# ----------------------------------------------------------------------------- --traffic

TRAFFIC_COLUMNS = (
    ("norm", "norm", None), ("shape", "shape", None), ("layout", "layout", None), ("dtype", "dtype", None),
    ("pass", "pass", None), ("path", "path", None), ("launches", "launches", "d"), ("MB", "mb", ".4g"),
    ("passes", "passes", ".2f"),
    ("floor", "floor", "d"), ("cuDNN", "cudnn_passes", "d"), ("bytes", "method", None),
    ("torch ops outside the kernels", "outside", None),
)
ESTIMATE_COLUMNS = (("est. us", "time_us", ".1f"), ("cuDNN est. us", "cudnn_us", ".1f"), ("/ cuDNN", "vs_cudnn", ".2f"))
TRAFFIC_LEGEND = (
    "Counted in Triton's interpreter, not measured: bytes read and written by the kernels' unmasked lanes, plus the "
    "torch ops outside them (their bytes modelled from their tensors; * marks an op on an x-sized tensor). path: "
    "on-chip (each channel held in registers: one read of x) or split (channels split over many programs). launches: "
    "Triton launches and torch ops, the running-statistics update included. passes: bytes / bytes of x. floor: any "
    "batch norm (forward: read x, write y; backward: read x, dy, write dx). cuDNN: cuDNN BatchNorm's passes. bytes: "
    "counted (every program and loop iteration ran), predicted (sampled, the rest predicted exactly from loop "
    "patterns and affine loop bounds, see tritonorm.bench.traffic) or averaged (some programs took their class mean: "
    "approximate)."
)
ESTIMATE_LEGEND = (
    "est. us: a MODEL, not a measurement: bytes / (0.85 x 3.35 TB/s) + launches x 4 us, an H100 SXM at 85% of its "
    "DRAM bandwidth; cuDNN est. us: the same for cuDNN BatchNorm (3 passes and 3 launches forward, 5 passes and 2 "
    "launches backward). The model ignores L2 hits, occupancy, serial loops and arithmetic."
)


def _traffic_argv(args: argparse.Namespace, out: bool = True) -> list[str]:
    """The command line of ``args``' traffic run (``out``: with its --out)."""
    argv = ["bench", "--traffic", "--sms", str(args.sms)]
    argv += [flag for flag in ("--estimate", "--launches") if getattr(args, flag[2:])]
    argv += [item for shape in args.shape or () for item in ("--shape", "x".join(map(str, shape)))]
    return argv + (["--out", str(args.out)] if out and args.out is not None else [])


def run_traffic(args: argparse.Namespace) -> int:
    """Count every case, print the table (and the launches), write the files if asked."""
    if not traffic.channel_reduce.INTERPRETED:  # the kernels were compiled: count in a fresh process
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.call([sys.executable, "-m", "tritonorm", *_traffic_argv(args)], env=env)
    results = traffic_cases.run(traffic_cases.inputs(args.shape), log=lambda line: print(line, file=sys.stderr),
                                sms=args.sms)
    rows = [{**row, "mb": row["bytes"] / 1e6} for row, _ in results]
    meta = {"command": "tritonorm " + " ".join(_traffic_argv(args, out=False)),
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "triton": triton.__version__,
            "tritonorm": tritonorm.__version__, "sms": args.sms, "estimate": args.estimate}
    print(render_traffic(rows, meta))
    if args.launches:
        for row, counted in results:
            print(f"\n{row['norm']} {row['shape']} {row['layout']} {row['dtype']} {row['pass']}:")
            print(traffic.describe(counted, round(traffic_cases.activation_bytes(row)), arguments=True))
    if args.out is not None:
        stem = args.out / f"traffic-{meta['date']}"
        args.out.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".md").write_text(traffic_markdown(rows, meta) + "\n")
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        print(f"\nwrote {stem}.md and {stem}.json")
    return 0


def _traffic_columns(meta: dict) -> tuple:
    return TRAFFIC_COLUMNS + (ESTIMATE_COLUMNS if meta["estimate"] else ())


def _target_lines(rows: list[dict]) -> list[str]:
    return [f"{t['target']}: {t['met']} of {t['cases']} cases; worst {t['worst']:.2f} ({t['at']})"
            for t in traffic_cases.targets(rows)]


def render_traffic(rows: list[dict], meta: dict) -> str:
    """The set-up line, the table, with --estimate the traffic targets (``traffic_cases.targets``), and the legend."""
    lines = [
        f"tritonorm bench --traffic: torch {meta['torch']}, triton {meta['triton']}, tritonorm {meta['tritonorm']}, "
        f"{meta['date']}; launches planned for {meta['sms']} SMs; Top-k k={traffic_cases.TOPK_K}",
        "",
        format_table(rows, _traffic_columns(meta)),
        "",
        textwrap.fill(TRAFFIC_LEGEND, LEGEND_WIDTH),
    ]
    if meta["estimate"]:
        lines += ["", textwrap.fill(ESTIMATE_LEGEND, LEGEND_WIDTH), "", "Targets (estimated):", *_target_lines(rows)]
    return "\n".join(lines)


def traffic_markdown(rows: list[dict], meta: dict) -> str:
    """The table as a markdown page: what it is, the command, the table, the targets."""
    columns = _traffic_columns(meta)
    table = timing.markdown_table([header for header, _, _ in columns],
                                    [[_cell(row[key], spec) for _, key, spec in columns] for row in rows])
    kind = "ESTIMATED (a model, not a measurement)" if meta["estimate"] else "COUNTED (no timing)"
    lines = [f"Batch-norm traffic, {kind}: `{meta['command']}`, {meta['date']}, torch {meta['torch']}, "
             f"triton {meta['triton']}, tritonorm {meta['tritonorm']}, launches planned for {meta['sms']} SMs, "
             f"Top-k k={traffic_cases.TOPK_K}.", "", TRAFFIC_LEGEND]
    if meta["estimate"]:
        lines += ["", ESTIMATE_LEGEND, "", "Targets (estimated):", "", *(f"- {line}" for line in _target_lines(rows))]
    return "\n".join([*lines, "", table])


def _cell(value, spec: str | None) -> str:
    if value is None:
        return "-"
    return str(value) if spec is None else format(value, spec)


def format_table(rows: list[dict], columns=COLUMNS) -> str:
    """``rows`` as aligned plain text under the headers of ``columns`` ((header, row key,
    number format) triples): text left, numbers right, "-" where a value does not apply, at
    least two spaces between columns (no cell holds two spaces in a row)."""
    cells = [[header for header, _, _ in columns]]
    cells += [[_cell(row[key], spec) for _, key, spec in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if spec is None else v.rjust(w)
                         for v, w, (_, _, spec) in zip(values, widths, columns, strict=True)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])])
