"""What the roofline sections share (each at the end of its ``*_cases`` module): the passes
timed, the timer, the guard around a case, the bandwidth and ratio helpers and the tables.

On CUDA a call is timed by the median of ``triton.testing.do_bench`` (CUDA events, L2
flushed before each call); on the CPU by the median of ``SMOKE_REPEATS`` perf_counter
calls, which only checks that a benchmark runs.  A case runs inside ``guarded``, so one
failing case (an out-of-memory at a large batch, a compile error) is reported and the
rest of the table is kept.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

try:
    import triton
    import triton.testing
except ImportError:  # no triton on this platform: the CPU timings still run
    triton = None

# The passes every section times: the forward alone, and the forward then its backward.
PASSES = ("forward", "forward+backward")
SMOKE_REPEATS = 5


def median_seconds(fn, device: str, rep_ms: float | None = None) -> float:
    """Median time of one call of ``fn``; on CUDA over about ``rep_ms`` of calls (default:
    do_bench's 100 ms)."""
    if device == "cuda":
        window = {} if rep_ms is None else {"rep": rep_ms}
        return triton.testing.do_bench(fn, return_mode="median", **window) / 1e3
    times = []
    for _ in range(SMOKE_REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def guarded(where: str, errors: list[str], log, device: str, run: Callable[[], list]) -> list:
    """``run()``'s rows, or none if it fails: the error goes to ``errors`` and the log, so
    one failing case does not lose the rest of the table."""
    log(where)
    try:
        return run()
    except Exception as e:  # noqa: BLE001 (any failure: reported, and the table goes on)
        errors.append(f"{where}: {type(e).__name__}: {e}")
        log(f"FAILED {errors[-1]}")
        if device == "cuda":
            torch.cuda.empty_cache()
        return []


def by_pass(rows: list[dict]) -> list[dict]:
    """Forward rows first; stable, so the cases stay in order."""
    return sorted(rows, key=lambda r: PASSES.index(r["pass"]))


def time_passes(step_of: Callable[[str], Callable], check: Callable[[tuple], None], device: str) -> dict:
    """{pass: median microseconds} of ``step_of(pass)`` for each pass; its first call, checked
    by ``check``, is the warm-up (compiles happen there)."""
    times = {}
    for pass_ in PASSES:
        fn = step_of(pass_)
        check(fn())
        times[pass_] = median_seconds(fn, device) * 1e6
    return times


def ratio(num: dict, den: dict | None) -> float | None:
    """num's time over den's, None without den."""
    return num["time_us"] / den["time_us"] if den else None


def add_bandwidth(r: dict, floor_bytes: int, peak_gbps: float) -> None:
    """GB/s of row ``r`` over ``floor_bytes`` and over its kernels' own bytes (when it has
    them), each also as a fraction of peak."""
    seconds = r["time_us"] * 1e-6
    r["gbps"] = floor_bytes / seconds / 1e9
    r["floor_fraction"] = r["gbps"] / peak_gbps
    if r["algorithm_bytes"] is not None:
        r["algorithm_gbps"] = r["algorithm_bytes"] / seconds / 1e9
        r["algorithm_fraction"] = r["algorithm_gbps"] / peak_gbps


def fmt(value, spec: str) -> str:
    """``value`` formatted, "-" for None."""
    return "-" if value is None else format(value, spec)


def markdown_table(headers, lines) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)
