"""Bandwidth roofline of the L1 / L-inf / Top-k batch norms (alone, with a fused ReLU and
residual add, and in a ResNet-50-shaped training step), the mean-only batch norm, EquiNorm,
ENorm and bounded weight norm (p = 2, 1 and inf) on a GPU.

    python benchmarks/roofline.py [--quick] [--only SECTION ...] [--out DIR] [--peak-gbps GBPS] [--cpu-smoke]

The measurements and the tables are ``tritonorm.bench.roofline``'s and its sections'
(docs/benchmarks.md says what each section times and the bytes it counts); ``tritonorm
bench`` runs the same and prints one table.  This script prints the markdown page and writes
it, with the JSON record, to benchmarks/results/<device-slug>-<YYYY-MM-DD>.{md,json} (or to
--out DIR), with the device name, the peak bandwidth used, the torch and triton versions and
the date.  A case that fails is reported and left out; the script then exits with status 1.

``--only lp|equinorm|enorm|bwn|fused|stack`` (repeatable) runs those sections alone; the file names then
end with them, so a partial run does not overwrite the day's full table.

Without CUDA it prints a message and exits 0 writing nothing.  ``--cpu-smoke`` instead
runs one tiny shape (and one tiny EquiNorm layer, small ENorm nets, a small conv and linear
weight for bounded weight norm, a stack with channels / 16 at 16x16) on the CPU, PyTorch
implementations only (timed with perf_counter), to check that the script works; it writes
files only when --out is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tritonorm.bench import bwn_cases, lp_cases, roofline

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"only the shapes {lp_cases.QUICK_SHAPES}, two EquiNorm layers (one compiled), "
                             f"{len(bwn_cases.QUICK_WEIGHTS)} bounded-weight-norm weights, the fused norms in "
                             "bf16 only and the stack with one block per stage")
    parser.add_argument("--only", action="append", choices=roofline.SECTIONS,
                        help="run this section only (repeatable; default: all); the file names get the sections")
    parser.add_argument("--out", type=Path, help=f"directory of the .md and .json (default {RESULTS_DIR})")
    parser.add_argument("--peak-gbps", type=float, help="peak DRAM bandwidth, GB/s (default: from the device name)")
    parser.add_argument("--cpu-smoke", action="store_true", help="one tiny shape on CPU, PyTorch paths only")
    args = parser.parse_args(argv)

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("roofline.py: no CUDA device, nothing measured or written (it times GPU bandwidth; "
              "--cpu-smoke checks the script on CPU)")
        return 0
    log = roofline.progress_log()
    plan = roofline.plan_for("cpu" if args.cpu_smoke else "cuda", args.quick)
    result = roofline.run(plan, args.only or roofline.SECTIONS, args.peak_gbps, log)
    print(result.page)
    out_dir = args.out or (None if args.cpu_smoke else RESULTS_DIR)
    if out_dir is not None:
        stem = roofline.write(result, out_dir)
        log(f"wrote {stem}.md and {stem}.json")
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
