"""Bandwidth roofline of the L1 / L-inf / Top-k batch norms on a GPU.

    python benchmarks/roofline.py [--quick] [--out DIR] [--peak-gbps GBPS] [--cpu-smoke]

At ResNet-like shapes, fp32 and bf16, training mode, it times forward and
forward+backward (``lp_cases`` defines both, and the bytes) of each norm's Triton path,
its PyTorch reference eager and ``torch.compile``-d, and ``nn.BatchNorm2d`` (cuDNN), all in
the same run: the median of ``triton.testing.do_bench`` (CUDA events, L2 flushed before
each call), whole call with host overhead.  A batch norm is memory-bound, so each time is
set against bandwidth:

* GB/s over the compulsory bytes (x in, y out; x and dy in, dx out), and the fraction of
  peak it is: floor time / time, where the floor time is compulsory bytes / peak
  bandwidth;
* for the Triton path, GB/s over the bytes of the passes its kernels make, and that
  fraction of peak: how close the kernels are to their own roofline;
* time / nn.BatchNorm2d time and time / compiled-reference time at the same shape, dtype
  and pass; and, in a table of its own, Top-k time / L1 time per implementation.

The table is printed and written as markdown and JSON to
benchmarks/results/<device-slug>-<YYYY-MM-DD>.{md,json} (or to --out DIR), with the
device name, the peak bandwidth used, the torch and triton versions and the date.  A case
that fails is reported and left out; the script then exits with status 1.

Without CUDA it prints a message and exits 0 writing nothing.  ``--cpu-smoke`` instead
runs one tiny shape on the CPU, PyTorch implementations only (timed with perf_counter),
to check that the script works; it writes files only when --out is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

import tritonorm
from lp_cases import (
    BASELINE,
    COMPILED,
    EAGER,
    PASSES,
    TOPK_K,
    TRITON,
    algorithm_bytes,
    build_layer,
    check_outputs,
    compulsory_bytes,
    dtype_name,
    make_inputs,
    shape_name,
    step,
    variants,
)

SHAPES = ((256, 64, 56, 56), (128, 128, 28, 28), (128, 256, 14, 14), (128, 512, 7, 7), (64, 64, 56, 56))
QUICK_SHAPES = ((64, 64, 56, 56), (128, 256, 14, 14))
DTYPES = (torch.float32, torch.bfloat16)
SMOKE_SHAPE = (4, 8, 8, 8)
SMOKE_REPEATS = 5
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Peak DRAM bandwidth in GB/s by device-name substring (first match); --peak-gbps overrides.
KNOWN_PEAKS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0))
DEFAULT_PEAK = 3350.0  # H100 SXM


def median_seconds(fn, device: str) -> float:
    """Median time of one call of ``fn``."""
    if device == "cuda":
        return triton.testing.do_bench(fn, return_mode="median") / 1e3
    times = []
    for _ in range(SMOKE_REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(shapes, dtypes, device: str, cases, log) -> tuple[list[dict], list[str]]:
    """Time every pass of every (norm, implementation) in ``cases`` at every shape and
    dtype; returns the rows and the errors of the cases that failed."""
    rows, errors = [], []
    for shape in shapes:
        for dtype in dtypes:
            x, dy = make_inputs(shape, dtype, device)
            block = []
            for norm, impl in cases:
                where = f"{shape_name(shape)} {dtype_name(dtype)} {norm} {impl}"
                log(where)
                try:
                    layer = build_layer(norm, impl, shape[1], device)
                    for pass_ in PASSES:
                        fn = step(layer, x, dy, pass_)
                        check_outputs(fn(), x)  # and the warm-up: compiles happen here
                        block.append({
                            "norm": norm, "impl": impl, "shape": shape_name(shape), "dtype": dtype_name(dtype),
                            "pass": pass_, "time_us": median_seconds(fn, device) * 1e6,
                            "compulsory_bytes": compulsory_bytes(pass_, x),
                            "algorithm_bytes": algorithm_bytes(norm, pass_, x) if impl == TRITON else None,
                        })
                except Exception as e:  # one failing case must not lose the rest of the table
                    errors.append(f"{where}: {type(e).__name__}: {e}")
                    log(f"FAILED {errors[-1]}")
                    if device == "cuda":
                        torch.cuda.empty_cache()
            rows += sorted(block, key=lambda r: PASSES.index(r["pass"]))  # stable: cases stay in order
    return rows, errors


def _ratio(num: dict, den: dict | None) -> float | None:
    return num["time_us"] / den["time_us"] if den else None


def derive(rows: list[dict], peak_gbps: float) -> list[dict]:
    """Add GB/s, fractions of peak and the ratios to the baseline and to the compiled
    reference to each row; return the Top-k / L1 time ratios."""
    index = {(r["shape"], r["dtype"], r["pass"], r["norm"], r["impl"]): r for r in rows}
    for r in rows:
        config = (r["shape"], r["dtype"], r["pass"])
        seconds = r["time_us"] * 1e-6
        r["gbps"] = r["compulsory_bytes"] / seconds / 1e9
        r["floor_fraction"] = r["gbps"] / peak_gbps
        if r["algorithm_bytes"] is not None:
            r["algorithm_gbps"] = r["algorithm_bytes"] / seconds / 1e9
            r["algorithm_fraction"] = r["algorithm_gbps"] / peak_gbps
        r["vs_batchnorm"] = _ratio(r, index.get((*config, *BASELINE)))
        r["vs_compiled"] = None if (r["norm"], r["impl"]) == BASELINE else _ratio(r, index.get((*config, r["norm"], COMPILED)))
    topk_over_l1 = []
    for (shape, dtype, pass_, norm, impl), r in index.items():
        l1 = index.get((shape, dtype, pass_, "l1", impl))
        if norm == "topk" and l1:
            topk_over_l1.append({"shape": shape, "dtype": dtype, "pass": pass_, "impl": impl, "ratio": _ratio(r, l1)})
    return topk_over_l1


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(headers, lines) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def report(meta: dict, rows: list[dict], topk_over_l1: list[dict], errors: list[str]) -> str:
    """The markdown page: set-up, the main table, Top-k / L1, failures."""
    main = markdown_table(
        ["norm", "impl", "shape", "dtype", "pass", "time (us)", "GB/s", "floor / time",
         "alg. GB/s", "alg. / peak", "/ BN", "/ compiled ref"],
        [[r["norm"], r["impl"], r["shape"], r["dtype"], r["pass"], f"{r['time_us']:.1f}", f"{r['gbps']:.0f}",
          f"{r['floor_fraction']:.1%}", _fmt(r.get("algorithm_gbps"), ".0f"), _fmt(r.get("algorithm_fraction"), ".1%"),
          _fmt(r["vs_batchnorm"], ".2f"), _fmt(r["vs_compiled"], ".2f")] for r in rows],
    )
    ratios = markdown_table(
        ["shape", "dtype", "pass", "impl", "Top-k / L1 time"],
        [[t["shape"], t["dtype"], t["pass"], t["impl"], f"{t['ratio']:.2f}"] for t in topk_over_l1],
    )
    lines = [
        f"# L1 / L-inf / Top-k batch norm roofline: {meta['device']}",
        "",
        f"{meta['date']}, torch {meta['torch']}, triton {meta['triton']}, tritonorm {meta['tritonorm']}; "
        f"peak bandwidth {meta['peak_gbps']:.0f} GB/s ({meta['peak_source']}); Top-k k={TOPK_K}; training mode, "
        "median of the whole call.",
        "",
        "GB/s: compulsory bytes (forward: read x, write y; backward: read x, dy, write dx) / time. "
        "floor / time: the time the compulsory bytes take at peak bandwidth, over the time. "
        "alg.: the same for the bytes of the passes the Triton kernels make. "
        "/ BN, / compiled ref: time over nn.BatchNorm2d's, and over torch.compile of the reference's.",
        "",
        main,
        "",
        "## Top-k time / L1 time",
        "",
        ratios,
    ]
    if errors:
        lines += ["", "## Failed cases", "", *(f"- {e}" for e in errors)]
    return "\n".join(lines) + "\n"


def peak_bandwidth(device_name: str, override: float | None) -> tuple[float, str]:
    """(GB/s, where the number comes from)."""
    if override is not None:
        return override, "--peak-gbps"
    for key, gbps in KNOWN_PEAKS:
        if key in device_name:
            return gbps, f"spec of {key}"
    return DEFAULT_PEAK, "H100 SXM default, device not recognized: pass --peak-gbps"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only the shapes {QUICK_SHAPES}")
    parser.add_argument("--out", type=Path, help=f"directory of the .md and .json (default {RESULTS_DIR})")
    parser.add_argument("--peak-gbps", type=float, help="peak DRAM bandwidth, GB/s (default: from the device name)")
    parser.add_argument("--cpu-smoke", action="store_true", help="one tiny shape on CPU, PyTorch paths only")
    args = parser.parse_args(argv)

    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    if args.cpu_smoke:
        device, device_name = "cpu", "cpu-smoke"
        shapes, dtypes = (SMOKE_SHAPE,), (torch.float32,)
        cases = variants((EAGER, COMPILED))
    elif torch.cuda.is_available():
        device, device_name = "cuda", torch.cuda.get_device_name()
        shapes, dtypes = QUICK_SHAPES if args.quick else SHAPES, DTYPES
        cases = variants()
    else:
        print("roofline.py: no CUDA device, nothing measured or written (it times GPU bandwidth; "
              "--cpu-smoke checks the script on CPU)")
        return 0

    peak_gbps, peak_source = peak_bandwidth(device_name, args.peak_gbps)
    meta = {
        "device": device_name, "peak_gbps": peak_gbps, "peak_source": peak_source,
        "torch": torch.__version__, "triton": triton.__version__, "tritonorm": tritonorm.__version__,
        "cuda": torch.version.cuda, "date": datetime.date.today().isoformat(), "topk_k": TOPK_K,
    }
    rows, errors = measure(shapes, dtypes, device, cases, log)
    topk_over_l1 = derive(rows, peak_gbps)
    page = report(meta, rows, topk_over_l1, errors)
    print(page)

    out_dir = args.out or (None if args.cpu_smoke else RESULTS_DIR)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = out_dir / f"{re.sub(r'[^a-z0-9]+', '-', device_name.lower()).strip('-')}-{meta['date']}"
        stem.with_suffix(".md").write_text(page)
        record = {"meta": meta, "rows": rows, "topk_over_l1": topk_over_l1, "errors": errors}
        stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
        log(f"wrote {stem}.md and {stem}.json")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
