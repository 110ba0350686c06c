"""``tritonorm info``: versions, the device, and which backend "auto" picks and why.

Prints the tritonorm, torch (and its CUDA build), triton and Python versions; the device
(the current CUDA device's name, compute capability, memory and SM count, or the CPU);
TRITON_INTERPRET and TRITONORM_BACKEND; the backend ``backend="auto"`` resolves to for a CPU
tensor and for a CUDA tensor (when there is a CUDA device), with the reason
(``tritonorm._dispatch.describe``), or the error it raises; and whether the optional
extras (scikit-learn, matplotlib, tqdm) are importable, with their versions.  ``--json``
prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform

import torch

import tritonorm
from tritonorm._dispatch import ENV_VAR, describe, resolve_backend

try:
    import triton
except ImportError:  # no triton on this platform: the PyTorch path still works
    triton = None

# (distribution, module) of the optional extras.
EXTRAS = (("scikit-learn", "sklearn"), ("matplotlib", "matplotlib"), ("tqdm", "tqdm"))
INTERPRET_VAR = "TRITON_INTERPRET"


def add_parser(subparsers) -> None:
    """Register ``info`` and its options."""
    parser = subparsers.add_parser("info", help="versions, device, and what backend \"auto\" picks and why",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the report as text or JSON; exit status 0."""
    report = collect()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def collect() -> dict:
    """The report as a JSON-ready dict (see the module docstring)."""
    return {
        "versions": {
            "tritonorm": tritonorm.__version__, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "triton": triton.__version__ if triton else None, "python": platform.python_version(),
        },
        "device": device(),
        "environment": {name: os.environ.get(name) for name in (INTERPRET_VAR, ENV_VAR)},
        "backend": {"auto": auto_backends(), "why": describe()},
        "extras": {dist: _extra(dist, module) for dist, module in EXTRAS},
    }


def device() -> dict:
    """The current CUDA device (name, capability, memory, SMs, how many devices), or the CPU
    (platform, machine, cores)."""
    if not torch.cuda.is_available():
        return {"type": "cpu", "platform": platform.platform(), "machine": platform.machine(),
                "cores": os.cpu_count()}
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {
        "type": "cuda", "index": index, "count": torch.cuda.device_count(), "name": props.name,
        "capability": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / 2**30, 1),
        "sm_count": props.multi_processor_count,
    }


def auto_backends() -> dict:
    """{tensor device type: what ``backend="auto"`` runs it on}, for "cpu" and, with a CUDA
    device, "cuda"; the error's message in place of a backend when resolving fails."""
    types = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    return {kind: _resolve(torch.empty(0, device=kind)) for kind in types}


def _resolve(x: torch.Tensor) -> str:
    try:
        return resolve_backend("auto", x)
    except (ValueError, RuntimeError) as e:
        return f"error: {e}"


def _extra(dist: str, module: str) -> dict:
    if importlib.util.find_spec(module) is None:
        return {"importable": False, "version": None}
    return {"importable": True, "version": importlib.metadata.version(dist)}


def render(report: dict) -> str:
    """The report as aligned text, one topic a line."""
    versions, env = report["versions"], report["environment"]
    auto = ", ".join(f"{kind} tensors -> {backend}" for kind, backend in report["backend"]["auto"].items())
    lines = [
        ("tritonorm", versions["tritonorm"]),
        ("torch", f"{versions['torch']} (CUDA build: {versions['torch_cuda'] or 'none'})"),
        ("triton", versions["triton"] or "not installed"),
        ("python", versions["python"]),
        ("device", _device_line(report["device"])),
        ("environment", ", ".join(f"{name}={'unset' if value is None else value}" for name, value in env.items())),
        ("backend auto", auto),
        ("why", report["backend"]["why"]),
        ("extras", ", ".join(f"{dist} {extra['version']}" if extra["importable"] else f"{dist} not installed"
                             for dist, extra in report["extras"].items())),
    ]
    width = max(len(key) for key, _ in lines)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in lines)


def _device_line(dev: dict) -> str:
    if dev["type"] == "cpu":
        return f"cpu ({dev['machine']}, {dev['cores']} cores, {dev['platform']}); no CUDA device"
    return (f"cuda:{dev['index']} {dev['name']}, compute capability {dev['capability']}, {dev['memory_gib']} GiB, "
            f"{dev['sm_count']} SMs ({dev['count']} CUDA device{'s' if dev['count'] > 1 else ''})")
