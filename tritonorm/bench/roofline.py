"""The bandwidth roofline: what ``tritonorm bench`` and ``benchmarks/roofline.py`` run, over
the sections of ``SECTIONS``, each measured, derived and rendered beside its cases:

* "lp": the L1 / L-inf / Top-k and mean-only batch norms (``lp_cases``);
* "equinorm": EquiNormConv2d and its kernels (``equinorm_cases``);
* "enorm": the ENorm cycle (``enorm_cases``);
* "bwn": bounded weight norm, p = 2, 1 and inf (``bwn_cases``);
* "fused": the batch norms with a fused ReLU and residual add (``fused_cases``);
* "stack": a training step of a ResNet-50-shaped stack (``stack_cases``).

What each section times, against what, and the bytes each time is set against (the byte
model) are described once, in docs/benchmarks.md ("How the timing works", "What each
benchmark measures"); the timer and the table helpers are ``timing``'s.

``plan_for(device, quick)`` says what to run: on "cuda" the GPU cases (``quick``: a few of
them), on "cpu" one tiny case per section, PyTorch implementations only, timed with
perf_counter, to check that the benchmarks work.  ``run(plan, sections)`` measures the
sections and returns a ``Roofline``: the set-up (device, the peak bandwidth used, torch /
triton / tritonorm versions, date), the JSON record of every row and the markdown page of
the tables.  A case that fails is reported in ``errors`` and left out.  ``write(result,
out_dir)`` writes the page and the record as ``<device-slug>-<YYYY-MM-DD>[-<sections>].{md,json}``:
the sections end the name when not all ran, so a partial run does not overwrite the day's
full table.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

import tritonorm

try:
    import triton
except ImportError:  # no triton on this platform: the CPU timings still run
    triton = None

from . import bwn_cases, enorm_cases, equinorm_cases, fused_cases, lp_cases, stack_cases

SECTIONS = ("lp", "equinorm", "enorm", "bwn", "fused", "stack")
# The JSON record's entries of every section, as they stand when the section does not run.
EMPTY_RECORD = {
    "rows": [], "topk_over_l1": [], "equinorm_layers": [], "equinorm_kernels": [], "equinorm_overhead": None,
    "enorm": [], "enorm_targets": [], "bounded_weight_norm": [], "bounded_weight_norm_targets": [],
    "bounded_weight_norm_summary": None, "fused": [], "stack": [],
}
# Peak DRAM bandwidth in GB/s by device-name substring (first match), unless the caller
# passes one.
KNOWN_PEAKS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0))
DEFAULT_PEAK = 3350.0  # H100 SXM


def report(meta: dict, sections: list[list[str]], errors: list[str]) -> str:
    """The markdown page: set-up, the sections (batch norms, EquiNorm, ENorm, bounded weight
    norm, those run), failures."""
    lines = [
        f"# tritonorm roofline: {meta['device']}",
        "",
        f"{meta['date']}, torch {meta['torch']}, triton {meta['triton']}, tritonorm {meta['tritonorm']}; "
        f"peak bandwidth {meta['peak_gbps']:.0f} GB/s ({meta['peak_source']}); training mode, median of the "
        "whole call.",
    ]
    for section in sections:
        lines += ["", *section]
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


class Plan(NamedTuple):
    """What one run measures: the device, and per section the cases and the contenders."""

    device: str
    shapes: tuple  # batch norms
    dtypes: tuple
    lp_cases: list  # (norm, implementation) pairs
    equinorm_layers: tuple
    equinorm_compiled: tuple  # the layers also timed with torch.compile
    impls: tuple  # EquiNorm implementations (layers, norm-only, kernels)
    enorm_nets: tuple
    enorm_contenders: tuple
    bwn_weights: tuple
    bwn_contenders: tuple
    fused_shapes: tuple
    fused_dtypes: tuple
    fused_cases: list  # (norm, implementation) pairs, both epilogues each
    stack_cases: tuple
    stack_contenders: tuple  # (norm, mode) pairs


class Roofline(NamedTuple):
    """One run's outcome: the set-up, the JSON record (every row), the markdown page."""

    meta: dict
    record: dict
    page: str
    errors: list[str]


def plan_for(device: str, quick: bool = False) -> Plan:
    """The GPU cases on "cuda" (``quick``: the quick shapes, two EquiNorm layers, one
    compiled, ``bwn_cases.QUICK_WEIGHTS``, the fused norms in bf16 only, the one-block
    stacks); on "cpu" the tiny ones, PyTorch implementations only (``quick`` changes
    nothing)."""
    eager, triton_, compiled = lp_cases.EAGER, lp_cases.TRITON, lp_cases.COMPILED
    if device == "cpu":
        smoke_layer = equinorm_cases.SMOKE_LAYER
        return Plan(
            device, (lp_cases.SMOKE_SHAPE,), (torch.float32,), lp_cases.variants((eager, compiled)), (smoke_layer,),
            (smoke_layer,), (eager,), enorm_cases.SMALL_NETS,
            tuple(n for n in enorm_cases.CONTENDERS if n not in enorm_cases.TRITON_CONTENDERS),
            bwn_cases.SMALL_WEIGHTS, tuple(n for n in bwn_cases.CONTENDERS if not bwn_cases.is_triton(n)),
            (lp_cases.SMOKE_SHAPE,), (torch.float32,), fused_cases.variants((eager,)), (stack_cases.SMOKE_CASE,),
            stack_cases.QUICK_CONTENDERS,
        )
    shapes = lp_cases.QUICK_SHAPES if quick else lp_cases.SHAPES
    layers = equinorm_cases.QUICK_LAYERS if quick else equinorm_cases.LAYERS
    fused = fused_cases.variants((triton_,) if quick else (triton_, fused_cases.UNFUSED))
    return Plan(
        device, shapes, lp_cases.DTYPES, lp_cases.variants(), layers, layers[:1] if quick else layers,
        (triton_, eager), enorm_cases.STUDY_NETS, enorm_cases.CONTENDERS,
        bwn_cases.QUICK_WEIGHTS if quick else bwn_cases.WEIGHTS, bwn_cases.CONTENDERS,
        shapes, fused_cases.QUICK_DTYPES if quick else lp_cases.DTYPES, fused,
        stack_cases.QUICK_CASES if quick else stack_cases.CASES,
        stack_cases.QUICK_CONTENDERS if quick else tuple(stack_cases.contenders()),
    )


def device_name(device: str) -> str:
    """The CUDA device's name, or "cpu"."""
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def progress_log() -> Callable[[str], None]:
    """A log to stderr, each message after the seconds since this call."""
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    return log


def run(plan: Plan, sections=SECTIONS, peak_gbps: float | None = None, log=None) -> Roofline:
    """Measure ``sections`` (in ``SECTIONS`` order) of ``plan`` and derive the bandwidths and
    ratios, against ``peak_gbps`` (default: from the device name); ``log`` gets one line per
    case (default: ``progress_log()``)."""
    log = log or progress_log()
    sections = [s for s in SECTIONS if s in sections]
    name = device_name(plan.device)
    peak, peak_source = peak_bandwidth(name, peak_gbps)
    meta = {
        "device": name, "peak_gbps": peak, "peak_source": peak_source, "torch": torch.__version__,
        "triton": triton.__version__ if triton else None, "tritonorm": tritonorm.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.date.today().isoformat(), "topk_k": lp_cases.TOPK_K, "sections": sections,
    }
    record, pages, errors = {"meta": meta, **EMPTY_RECORD}, [], []
    for section in sections:
        part, page, section_errors = _MEASURE[section](plan, peak, log)
        record.update(part)
        pages.append(page)
        errors += section_errors
    record["errors"] = errors
    return Roofline(meta, record, report(meta, pages, errors), errors)


def _run_lp(plan: Plan, peak: float, log) -> tuple[dict, list[str], list[str]]:
    return lp_cases.run_section(plan.shapes, plan.dtypes, plan.lp_cases, plan.device, peak, log)


def _run_equinorm(plan: Plan, peak: float, log) -> tuple[dict, list[str], list[str]]:
    return equinorm_cases.run_section(plan.equinorm_layers, plan.equinorm_compiled, plan.dtypes, plan.impls,
                                      plan.device, peak, log)


def _run_enorm(plan: Plan, peak: float, log) -> tuple[dict, list[str], list[str]]:
    return enorm_cases.run_section(plan.enorm_nets, plan.enorm_contenders, plan.device, peak, log)


def _run_bwn(plan: Plan, peak: float, log) -> tuple[dict, list[str], list[str]]:
    return bwn_cases.run_section(plan.bwn_weights, plan.bwn_contenders, plan.device, peak, log)


def _run_fused(plan: Plan, peak: float, log) -> tuple[dict, list[str], list[str]]:
    return fused_cases.run_section(plan.fused_shapes, plan.fused_dtypes, fused_cases.EPILOGUES, plan.fused_cases,
                                   plan.device, peak, log)


def _run_stack(plan: Plan, peak: float, log) -> tuple[dict, list[str], list[str]]:
    return stack_cases.run_section(plan.stack_cases, plan.stack_contenders, plan.device, log)


# Each section's measure-derive-report step: (record entries, markdown lines, errors).
_MEASURE = {"lp": _run_lp, "equinorm": _run_equinorm, "enorm": _run_enorm, "bwn": _run_bwn, "fused": _run_fused,
            "stack": _run_stack}


def write(result: Roofline, out_dir: Path) -> Path:
    """Write ``result``'s page and record to ``out_dir`` (created if missing) as
    ``<stem>.md`` and ``<stem>.json``; return the stem."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = result.meta
    name = re.sub(r"[^a-z0-9]+", "-", meta["device"].lower()).strip("-")
    only = "" if len(meta["sections"]) == len(SECTIONS) else "-" + "-".join(meta["sections"])
    stem = out_dir / f"{name}-{meta['date']}{only}"
    stem.with_suffix(".md").write_text(result.page)
    stem.with_suffix(".json").write_text(json.dumps(result.record, indent=1) + "\n")
    return stem
