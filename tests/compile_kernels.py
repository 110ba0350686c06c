"""Compile every Triton kernel the launchers launch for an NVIDIA H100 (sm_90), without a
GPU, and measure what decides a memory-bound kernel's speed: registers, spills and the width
of its global loads and stores.

Why compile at all: the interpreter (how CI runs the kernels) accepts code the compiler
rejects, such as a variable whose shape differs between the branches of a runtime ``if``,
and only compiled code shows spills or scalar loads.  Triton's NVIDIA backend, ptxas and
cuobjdump ship in the triton wheel, so the pipeline down to a cubin runs on any Linux machine.

What is compiled: the launches the launchers themselves make (``launches``: each is bound
and specialized as ``JITFunction.run`` would, then not run) on lazily allocated CPU tensors
(torch.empty: nothing is written), with the plans made for an H100's 132 SMs:

* ``resnet50_workloads`` (budgeted): ResNet-50's activations at N = 32 and 256, NCHW and
  channels_last, fp32 and bf16, through L1 / L-inf / Top-k (k=10) batch norm (forward and
  backward, training and eval, the running statistics) and EquiNorm's input sums; its conv
  and fc weights through EquiNorm's weight transform and bounded weight norm (forward and
  backward); the ENorm study nets through both cycles;
* ``coverage_workloads`` (compile only): the other variants (fp64, a 2-d input, Top-k at
  k = 3 and MAX_K, no affine parameters, exact EquiNorm, a per-slice rho, every ENorm norm).

The synchronized batch norms' stages (``kernels/sync_lp_batchnorm.py``) are in both, with
the collectives' results stood in for by tensors of their shapes.

A compile key (kernel, signature, constexprs, specialization, options) is compiled once, in
a pool of processes; Triton's cache keeps the results for the next run.  Per key:

* registers and spill bytes: ``cuobjdump --dump-resource-usage`` on the cubin (STACK + LOCAL,
  the local memory a thread uses, which is ptxas's stack frame; on a GPU Triton reports it
  as ``kernel.n_spills`` 4-byte words);
* every ``ld.global`` / ``st.global`` of the PTX (``global_accesses``): its bytes per thread,
  the argument its address comes from and whether it is in a loop.  The *big-tensor
  accesses* are those in a loop to an argument with as many elements as the workload's
  activation or weight (ENorm's: through its pointer table, ``*table``).

tests/test_kernels_compile.py holds the budgets.  Run without TRITON_INTERPRET:

    python tests/compile_kernels.py             # exit 0, 1 (some kernel failed to compile) or
                                                # 77 (this triton cannot compile for CUDA here)
    python tests/compile_kernels.py --report    # and print kernel x config: regs, spills, widths
    python tests/compile_kernels.py --json FILE # and write the measurements (the test reads them)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from unittest import mock

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1: interpreted kernels cannot be compiled")

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from tritonorm.bench.enorm_cases import STUDY_NETS, build
from tritonorm.kernels import (
    bounded_weight_norm,
    channel_reduce,
    channel_resident,
    enorm,
    equinorm,
    lp_batchnorm,
    mean_only_batchnorm,
    running_stats,
    sync_lp_batchnorm,
)

TARGET = GPUTarget("cuda", 90, 32)
H100_SMS = 132
# The pseudo-argument of an access whose address comes from a pointer loaded from memory.
TABLE = "*table"


def compile_kernel(fn, signature: dict, constexprs: dict, attrs=None, options=None):
    """The compiled kernel of ``fn`` for TARGET (signature: argument -> Triton type,
    constexprs: argument -> value)."""
    full = {**signature, **{name: "constexpr" for name in constexprs}}
    src = ASTSource(fn=fn, signature=full, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options=options)


# ----------------------------------------------------------------------------- recording launches


@dataclass
class Launch:
    """One launch as the compiler sees it, and the elements of each tensor argument."""

    fn: JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    numels: dict

    @property
    def key(self) -> str:
        """What decides the compiled code (the launch's grid and scalar values aside)."""
        return repr((self.fn.__module__, self.fn.__name__, self.signature, self.constexprs, self.attrs,
                     sorted(self.options.items())))

    @property
    def kernel(self) -> str:
        """module.kernel"""
        return f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}"

    @property
    def name(self) -> str:
        """module.kernel[constexprs]"""
        values = ", ".join(f"{k}={v.value if isinstance(v, tl.constexpr) else v}" for k, v in self.constexprs.items())
        return f"{self.kernel}[{values}]"


@contextlib.contextmanager
def launches():
    """Collect the Launches made inside, launching nothing.

    A launch is bound and specialized as ``JITFunction.run`` does it (None -> a constexpr
    None, an int equal to 1 -> a constexpr 1, alignment attributes), from the launchers'
    own arguments on CPU tensors, with their plans made for an H100's SM count."""
    backend, recorded = make_backend(TARGET), []

    def record(fn, *args, grid, warmup, **kwargs):
        bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(
            *args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        constexprs = {fn.arg_names[path[0]]: value for path, value in constexprs.items()}
        numels = {name: value.numel() for name, value in bound.items() if isinstance(value, torch.Tensor)}
        recorded.append(Launch(fn, signature, constexprs, attrs, options.__dict__, numels))

    with mock.patch.object(JITFunction, "run", record), \
            mock.patch.object(channel_reduce, "_num_programs_per_wave", lambda device: H100_SMS):
        yield recorded


# ----------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """Launchers run on one activation or weight: ``run()`` makes the launches; ``subject``
    is its number of elements, which makes an argument a big tensor (None: the tensors
    behind ENorm's pointer table are); ``budgeted``: tests/test_kernels_compile.py's budgets
    apply to the kernels it reaches."""

    label: str
    run: Callable[[], object]
    subject: int | None
    budgeted: bool = True


DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64"}
LAYOUTS = {torch.contiguous_format: "nchw", torch.channels_last: "nhwc"}
# (C, H, W) of ResNet-50's batch-normalized activations (conv1 and the four stages; C=64 at
# 56x56 is layer1's bottleneck width).
RESNET50_ACTIVATIONS = [(64, 112, 112), (64, 56, 56), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
RESNET50_BATCHES = (32, 256)
TOPK = 10
# (batch_stats, param_grads) of a training step and of an eval forward with a backward.
TRAIN_AND_EVAL = ((True, True), (False, True))


def resnet50_weights() -> list[tuple[int, ...]]:
    """The distinct conv weight shapes of ResNet-50 (stem, then per stage the bottleneck's
    1x1 in (first block / the others), 3x3, 1x1 out and the downsample), and the fc's."""
    shapes, c_in = {(64, 3, 7, 7)}, 64
    for width in (64, 128, 256, 512):
        shapes |= {(width, c_in, 1, 1), (width, 4 * width, 1, 1), (width, width, 3, 3), (4 * width, width, 1, 1),
                   (4 * width, c_in, 1, 1)}
        c_in = 4 * width
    return sorted(shapes) + [(1000, 2048)]


def _lp_batch_norm(x: torch.Tensor, *, norm: str, k: int, affine: bool = True, modes=TRAIN_AND_EVAL,
                   activation: str = "none", residual: bool = False, path: str = "auto"):
    """Forward and backward of one norm for each (batch_stats, param_grads) of ``modes``,
    and the running statistics' update after a training forward; ``activation`` and
    ``residual``: the fused epilogue; ``path``: TRITONORM_LP_PATH (on chip where it fits)."""
    c = x.shape[1]
    weight, bias = (torch.empty(c, dtype=x.dtype) if affine else None for _ in range(2))
    running_mean, running_dev = torch.empty(c, dtype=x.dtype), torch.empty(c, dtype=x.dtype)
    dy = torch.empty_like(x)
    common = dict(eps=1e-5, norm=norm, k=k, normalized=True, residual=torch.empty_like(x) if residual else None,
                  activation=activation, activation_param=0.01)
    for batch_stats, param_grads in modes:
        with mock.patch.dict(os.environ, {channel_resident.PATH_VARIABLE: path}):
            y, mean, dev, wbar, sel_i, sel_sign, affine_coefs = lp_batchnorm.lp_batch_norm_forward(
                x, weight=weight, bias=bias, running_mean=running_mean, running_dev=running_dev,
                batch_stats=batch_stats, **common)
            lp_batchnorm.lp_batch_norm_backward(
                dy, x=x, weight=weight, mean=mean, dev=dev, wbar=wbar, sel_i=sel_i, sel_sign=sel_sign,
                affine=affine_coefs, batch_stats=batch_stats, param_grads=param_grads, residual_grad=residual,
                **common)
        if batch_stats:
            running_stats.update_running([(running_mean, mean), (running_dev, dev)], num_batches_tracked=None,
                                         momentum=0.1)


def _sync_lp_batch_norm(x: torch.Tensor, *, norm: str, k: int, world: int = 2, activation: str = "none"):
    """A synchronized training step's stages on one process (the collectives' results
    stood in for by empty tensors of their shapes, ``world`` processes)."""
    c, acc = x.shape[1], channel_reduce.accumulator_dtype(x.dtype)
    weight, bias, dy = torch.empty(c, dtype=x.dtype), torch.empty(c, dtype=x.dtype), torch.empty_like(x)
    act = None if activation == "none" else activation
    options = dict(norm=norm, k=k, normalized=True)
    if norm == "l1":
        mean, n = sync_lp_batchnorm.combine_moments(sync_lp_batchnorm.pack_moments(x).expand(world, -1), acc)
        sums = sync_lp_batchnorm.abs_dev_sums(x, mean)
        dev, wbar, affine = sync_lp_batchnorm.l1_statistics(sums, mean, n, weight, bias, 1e-5, True)
        sel_i, sel_sign = torch.empty((c, 0), dtype=torch.int64), torch.empty((c, 0), dtype=acc)
    else:
        packed = sync_lp_batchnorm.pack_candidates(x, 1 if norm == "linf" else k).expand(world, -1)
        mean, dev, wbar, affine, sel_i, sel_sign, n = sync_lp_batchnorm.select(packed, 0, norm, k, weight, bias, 1e-5,
                                                                              True, acc)
    sync_lp_batchnorm.normalize(x, mean, affine, None, act, 0.01)
    sums, _, _, _ = sync_lp_batchnorm.grad_sums(dy, x, mean, affine, None, act, 0.01, dev, 1e-5)
    coefs = sync_lp_batchnorm.grad_coefficients(sums, dev, wbar, weight, n, eps=1e-5, **options)
    sync_lp_batchnorm.grad_input(dy, None, x, mean, affine, coefs, norm, sel_i, sel_sign, None, act, 0.01, False)


def _mean_only_batch_norm(x: torch.Tensor):
    """Mean-only batch norm: training and eval forward, their backwards."""
    bias, running_mean = torch.empty(x.shape[1], dtype=x.dtype), torch.empty(x.shape[1], dtype=x.dtype)
    for batch_stats in (True, False):
        mean_only_batchnorm.mean_only_batch_norm_forward(x, bias, running_mean, batch_stats)
        mean_only_batchnorm.mean_only_batch_norm_backward(torch.empty_like(x), batch_stats, True)


def _equinorm_input(x: torch.Tensor):
    """The input sums of a training forward, and the running mean's update."""
    mean = equinorm.input_sums(x)
    running_stats.update_running([(torch.empty(x.shape[1], dtype=x.dtype), mean)], num_batches_tracked=None,
                                 momentum=0.1)


def _equinorm_weight(weight: torch.Tensor, *, single_pass: bool, groups: int = 1, has_gain: bool = True):
    """The weight transform, forward and backward."""
    mass = torch.empty(weight.shape[1] * groups, dtype=channel_reduce.accumulator_dtype(weight.dtype))
    gain = torch.empty(weight.shape[0], dtype=weight.dtype) if has_gain else None
    out, s, b = equinorm.weight_forward(weight, mass=mass, gain=gain, groups=groups, single_pass=single_pass)
    equinorm.weight_backward(out, weight=weight, mass=mass, gain=gain, s=s, b=b, groups=groups,
                             single_pass=single_pass)


def _bounded_weight_norm(v: torch.Tensor, *, per_slice_rho: bool = False, dim: int = 0, p: float = 2.0):
    """Forward and backward, with one fixed rho or one per slice (the learnable gain's), of
    the norm order p."""
    rho = torch.empty(v.shape[dim] if per_slice_rho else (), dtype=v.dtype)
    w, norm = bounded_weight_norm.forward(v, rho=rho, dim=dim, eps=1e-12, p=p)
    bounded_weight_norm.backward(w, v=v, rho=rho, norm=norm, dim=dim, eps=1e-12, p=p)


def _cumulative_average(running: torch.Tensor):
    """The running statistics' update with momentum=None, of one buffer and of two."""
    batch = torch.empty_like(running, dtype=channel_reduce.accumulator_dtype(running.dtype))
    num_batches_tracked = torch.ones((), dtype=torch.int64)
    for pairs in ([(running, batch)], [(running, batch)] * 2):
        running_stats.update_running(pairs, num_batches_tracked=num_batches_tracked, momentum=None)


def _enorm_cycles(layers: list[tuple[int, int, int]], *, dtype: torch.dtype, norms=(2.0,)):
    """Both ENorm cycles over a bias-free chain of (O, I, K) weights, each with an SGD
    momentum buffer (power -1), every pair balanced but the last."""
    tensors = [[(torch.empty(shape, dtype=dtype), 1), (torch.empty(shape, dtype=dtype), -1)] for shape in layers]
    plan = enorm.Plan(tensors, [False] * (len(layers) - 2))
    for p in norms:
        for sequential in (False, True):
            enorm.cycle(plan, c=1.2, p=p, eps=1e-12, sequential=sequential)


def _on(label: str, fn, shape: tuple[int, ...], dtype: torch.dtype, memory_format=None, budgeted: bool = True,
        **kwargs) -> Workload:
    """``fn(x, **kwargs)`` on an empty x (allocated when the workload runs), the subject."""
    layout = f" {LAYOUTS[memory_format]}" if memory_format is not None else ""

    def run():
        fn(torch.empty(shape, dtype=dtype, memory_format=memory_format or torch.contiguous_format), **kwargs)

    return Workload(f"{label} {'x'.join(map(str, shape))}{layout} {DTYPES[dtype]}", run, math.prod(shape), budgeted)


def resnet50_workloads():
    """The budgeted workloads: ResNet-50's activations and weights, the ENorm study nets."""
    for n in RESNET50_BATCHES:
        for chw in RESNET50_ACTIVATIONS:
            for memory_format in LAYOUTS:
                for dtype in (torch.float32, torch.bfloat16):
                    x = dict(shape=(n, *chw), dtype=dtype, memory_format=memory_format)
                    for norm, k in (("l1", 1), ("linf", 1), ("topk", TOPK)):
                        yield _on(norm, _lp_batch_norm, **x, norm=norm, k=k)
                        # the split kernels where the on-chip path takes the layer
                        yield _on(f"{norm} split", _lp_batch_norm, **x, norm=norm, k=k, path="split")
                        yield _on(f"{norm} + residual + relu", _lp_batch_norm, **x, norm=norm, k=k,
                                  activation="relu", residual=True, modes=((True, True),))
                        yield _on(f"{norm} synchronized", _sync_lp_batch_norm, **x, norm=norm, k=k)
                    yield _on("mean-only", _mean_only_batch_norm, **x)
                    yield _on("equinorm input", _equinorm_input, **x)
    for shape in resnet50_weights():
        for dtype in (torch.float32, torch.bfloat16):
            yield _on("bwn", _bounded_weight_norm, shape, dtype)
            if len(shape) == 4:
                yield _on("equinorm weight", _equinorm_weight, shape, dtype, single_pass=True)
    for net in STUDY_NETS:
        layers = [(w.shape[0], w.shape[1], w[0, 0].numel()) for w in (m.weight for m in build(net, "meta").layers)]
        yield Workload(f"enorm {net.name} fp32", partial(_enorm_cycles, layers, dtype=torch.float32), None)


def coverage_workloads():
    """Variants that must compile but carry no budget: fp64, a 2-d (N, C) input, Top-k at
    k = 3 and MAX_K, every (batch_stats, param_grads) without affine parameters, the
    cumulative average, exact and grouped EquiNorm, a linear one without gain, bounded
    weight norm in fp64, with a per-slice rho (also along the last dim) and with p = 1 and
    inf (rows, grouped rows, the last dim), every ENorm norm on bf16 and l2 on fp64."""
    every_mode = ((True, True), (True, False), (False, True), (False, False))
    for shape, dtype, memory_format in (((32, 64, 56, 56), torch.float32, torch.contiguous_format),
                                        ((32, 64, 56, 56), torch.bfloat16, torch.channels_last),
                                        ((65536, 96), torch.float64, torch.contiguous_format)):
        x = dict(shape=shape, dtype=dtype, memory_format=memory_format, budgeted=False)
        for norm, k in (("l1", 1), ("linf", 1), ("topk", 3), ("topk", lp_batchnorm.MAX_K)):
            yield _on(f"{norm} k={k}", _lp_batch_norm, **x, norm=norm, k=k)
            yield _on(f"{norm} k={k} synchronized, 8 processes", _sync_lp_batch_norm, **x, norm=norm, k=k, world=8)
            if dtype == torch.float32:
                yield _on(f"{norm} k={k} no affine", _lp_batch_norm, **x, norm=norm, k=k, affine=False,
                          modes=every_mode)
        yield _on("equinorm input", _equinorm_input, **x)
    for shape in ((32, 64, 56, 56), (32, 512, 7, 7)):
        for activation in ("leaky_relu", "silu", "gelu", "gelu_tanh", "hardswish"):
            yield _on(f"l1 {activation}", _lp_batch_norm, shape, torch.bfloat16, budgeted=False, norm="l1", k=1,
                      activation=activation)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        common = dict(dtype=dtype, budgeted=False)
        yield _on("cumulative average", _cumulative_average, (64,), **common)
        yield _on("equinorm weight exact groups=2", _equinorm_weight, (64, 32, 3, 3), **common, single_pass=False,
                  groups=2)
        yield _on("equinorm weight exact", _equinorm_weight, (256, 64, 1, 1), **common, single_pass=False)
        for shape in ((512, 512, 3, 3), (64, 3, 7, 7)):
            for per_slice_rho in (False, True):
                yield _on(f"bwn per_slice_rho={per_slice_rho}", _bounded_weight_norm, shape, **common,
                          per_slice_rho=per_slice_rho)
    common = dict(dtype=torch.float32, budgeted=False)
    yield _on("equinorm weight groups=2", _equinorm_weight, (64, 32, 3, 3), torch.float64, budgeted=False,
              single_pass=True, groups=2)
    for single_pass in (True, False):
        yield _on(f"equinorm weight linear, no gain, single_pass={single_pass}", _equinorm_weight, (128, 256),
                  **common, single_pass=single_pass, has_gain=False)
    yield _on("bwn per-slice rho dim=1", _bounded_weight_norm, (4096, 1000), **common, per_slice_rho=True, dim=1)
    for p in (1.0, float("inf")):
        for dtype in (torch.float32, torch.bfloat16):
            for shape in ((512, 512, 3, 3), (64, 3, 7, 7)):
                yield _on(f"bwn p={p}", _bounded_weight_norm, shape, dtype, budgeted=False, p=p)
        yield _on(f"bwn p={p} dim=1", _bounded_weight_norm, (4096, 1000), **common, dim=1, p=p)
    for dtype, norms in ((torch.bfloat16, (1.0, 2.0, float("inf"), 3.0)), (torch.float64, (2.0,))):
        yield Workload(f"enorm mlp 48-16-16-10 {DTYPES[dtype]}",
                       partial(_enorm_cycles, [(16, 48, 1), (16, 16, 1), (10, 16, 1)], dtype=dtype, norms=norms),
                       None, False)


# ----------------------------------------------------------------------------- analysis

_REGISTER = re.compile(r"%[a-z]+\d+")
_INSTRUCTION = re.compile(r"^(?:@!?%\w+\s+)?([a-z][\w.:]*)\s*(.*);$")
_PARAM = re.compile(r"\[\w+_param_(\d+)\]")
_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+)")


def _operands(text: str) -> list[str]:
    """The comma-separated operands of an instruction, braces and brackets kept whole."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    return out + [text[start:]]


def global_accesses(ptx: str, params: list[str]) -> list[dict]:
    """Every ld.global / st.global of ``ptx``: {"op": "ld" | "st", "bytes", "arg", "loop"}.

    ``arg``: the pointer argument (``params``: the kernel's parameter names in PTX order,
    None for a non-pointer one) the address is computed from, by a backward slice over the
    registers: TABLE when the address derives only from values loaded from memory, the
    names joined by "|" when it derives from several pointers.  ``loop``: the access lies
    between a label and a later branch back to it."""
    lines = [line.split("//", 1)[0].strip() for line in ptx.splitlines()]
    labels, loops, instructions = {}, [], []
    for i, line in enumerate(lines):
        if label := _LABEL.match(line):
            labels[label.group(1)] = i
        elif (branch := _BRANCH.search(line)) and branch.group(1) in labels:
            loops.append((labels[branch.group(1)], i))
        elif (match := _INSTRUCTION.match(line)) and not line.startswith("."):
            instructions.append((i, match.group(1), _operands(match.group(2))))
    origin = defaultdict(set)  # register -> parameter indices (and "mem") its value derives from
    flows = []  # (destinations, sources, seed)
    for _, opcode, ops in instructions:
        if opcode.startswith(("st.", "red.", "bra", "ret", "bar", "fence", "membar", "exit", "trap")):
            continue
        dests = _REGISTER.findall(ops[0])
        if opcode.startswith("ld.param"):
            flows.append((dests, [], {int(_PARAM.search(ops[1]).group(1))}))
        elif opcode.startswith(("ld.", "atom.", "shfl.")):  # a value from memory or another thread
            flows.append((dests, [], {"mem"}))
        else:
            flows.append((dests, [r for op in ops[1:] for r in _REGISTER.findall(op)], set()))
    changed = True
    while changed:
        changed = False
        for dests, sources, seed in flows:
            value = seed.union(*(origin[r] for r in sources))
            for d in dests:
                if not value <= origin[d]:
                    origin[d] |= value
                    changed = True
    accesses = []
    for i, opcode, ops in instructions:
        if not opcode.startswith(("ld.global", "st.global")):
            continue
        address = next(op for op in ops if "[" in op)
        sources = set().union(*(origin[r] for r in _REGISTER.findall(address)))
        pointers = sorted(params[p] for p in sources - {"mem"} if p < len(params) and params[p])
        vector = re.search(r"\.v(\d)\b", opcode)
        bits = int(re.search(r"(\d+)$", opcode).group(1))
        accesses.append(dict(
            op=opcode[:2], bytes=(int(vector.group(1)) if vector else 1) * bits // 8,
            arg="|".join(pointers) or (TABLE if "mem" in sources else "?"),
            loop=any(start <= i <= end for start, end in loops)))
    return accesses


def resource_usage(cubin: bytes) -> dict:
    """Registers and local (spill) bytes per thread of the one kernel in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", out))
    return dict(regs=int(usage["REG"]), spill_bytes=int(usage["STACK"]) + int(usage["LOCAL"]))


def measure(launch: Launch) -> dict:
    """Compile ``launch`` and measure it; {"error": ...} when it does not compile."""
    try:
        kernel = compile_kernel(launch.fn, launch.signature, launch.constexprs, launch.attrs, launch.options)
    except Exception as err:
        return dict(error=f"{type(err).__name__}: {err}")
    params = [name if kind.startswith("*") else None for name, kind in launch.signature.items() if kind != "constexpr"]
    return dict(resource_usage(kernel.asm["cubin"]), accesses=global_accesses(kernel.asm["ptx"], params))


@triton.jit
def _probe_kernel(x_ptr, y_ptr, table_ptr, n, BLOCK: tl.constexpr):
    """What ``global_accesses`` must tell apart: a gather of x outside any loop, a stream
    over x in a loop (16-byte accesses: x and n are multiples of 16 bytes), the same stream
    over y one element off (4-byte accesses), and a store through a pointer read from a
    table.  Compiled first: a triton that cannot compile it cannot compile for CUDA here."""
    offs = tl.arange(0, BLOCK)
    acc = tl.load(x_ptr + offs * 3)
    for start in range(0, n, BLOCK):
        acc += tl.load(x_ptr + start + offs) + tl.load(y_ptr + 1 + start + offs)
    out = tl.load(table_ptr).to(tl.pointer_type(tl.float32))
    tl.store(out + offs, acc)


def probe_launch() -> Launch:
    """The launch of _probe_kernel, recorded as the launchers' are."""
    with launches() as recorded:
        _probe_kernel[(1,)](torch.empty(1536), torch.empty(1025), torch.empty(1, dtype=torch.int64), 1024, BLOCK=512)
    return recorded[0]


_LAUNCHES: list[Launch] = []  # what the pool's (forked) workers compile, by index


def _measure_index(i: int) -> dict:
    return measure(_LAUNCHES[i])


@dataclass
class Kernel:
    """One compile key, the workloads that reach it, and its measurements."""

    launch: Launch
    workloads: list[str] = field(default_factory=list)
    big: set = field(default_factory=set)  # arguments that are big tensors in some workload
    budgeted: bool = False
    result: dict = field(default_factory=dict)

    def row(self) -> dict:
        """What the report and the test read: the measurements, the big-tensor accesses
        (in loops), and the accesses not traced to one argument or the table."""
        accesses = self.result.get("accesses", [])
        return dict(kernel=self.launch.kernel, name=self.launch.name, workloads=self.workloads,
                    budgeted=self.budgeted, big=sorted(self.big),
                    big_accesses=big_accesses(self.launch.kernel, accesses, self.big),
                    untraced=[a for a in accesses if a["arg"] == "?" or "|" in a["arg"]],
                    **{k: v for k, v in self.result.items() if k != "accesses"})


# Kernels that hold their tile in registers (kernels/channel_resident.py): no loop streams it.
RESIDENT_KERNELS = {"lp_batchnorm._resident_forward_kernel", "lp_batchnorm._resident_backward_kernel"}


def big_accesses(kernel: str, accesses: list[dict], big: set) -> list[dict]:
    """The accesses that move a big tensor: those to a big argument in the kernel's loops,
    which stream tiles; in an on-chip kernel (RESIDENT_KERNELS), each big argument's widest
    stores, or loads if it is only read: its tile's (the narrower ones are per-channel
    gathers, such as x_0, and the Top-k gradient's scatter into dx)."""
    to_big = [a for a in accesses if a["arg"] in big]
    if kernel not in RESIDENT_KERNELS:
        return [a for a in to_big if a["loop"]]
    stored = {a["arg"] for a in to_big if a["op"] == "st"}
    tile = [a for a in to_big if a["op"] == ("st" if a["arg"] in stored else "ld")]
    widest = defaultdict(int)
    for a in tile:
        widest[a["arg"]] = max(widest[a["arg"]], a["bytes"])
    return [a for a in tile if a["bytes"] == widest[a["arg"]]]


def collect(workloads) -> list[Kernel]:
    """The distinct compile keys of the workloads' launches, in first-seen order."""
    kernels: dict[str, Kernel] = {}
    for workload in workloads:
        with launches() as recorded:
            workload.run()
        for launch in recorded:
            kernel = kernels.setdefault(launch.key, Kernel(launch))
            if workload.label not in kernel.workloads:
                kernel.workloads.append(workload.label)
            if workload.subject is None:
                kernel.big.add(TABLE)
            else:
                kernel.big |= {name for name, numel in launch.numels.items() if numel == workload.subject}
            kernel.budgeted |= workload.budgeted
    return list(kernels.values())


def measure_all(launches_: list[Launch], jobs: int) -> list[dict]:
    """``measure`` of each launch, in ``jobs`` forked processes (this one compiles nothing:
    a thread pool of MLIR or LLVM would not survive a fork)."""
    _LAUNCHES[:] = launches_
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_measure_index, range(len(launches_)), chunksize=1)


# ----------------------------------------------------------------------------- report


def widths(accesses: list[dict]) -> str:
    """e.g. "out_ptr st 4x16, x_ptr ld 16x4": per argument and op, bytes x count."""
    counts = defaultdict(int)
    for a in accesses:
        counts[(a["arg"], a["op"], a["bytes"])] += 1
    return ", ".join(f"{arg} {op} {nbytes}x{n}" for (arg, op, nbytes), n in sorted(counts.items()))


def report(rows: list[dict]) -> str:
    """One line per kernel and measurement: registers, spill bytes, the narrowest big-tensor
    access in bytes (its widths per argument at the end), the kernel with its constexprs,
    the first workload that reaches it and how many more do.  Compile keys that differ
    only in the specialization of integers and measure the same share a line."""
    merged = {}
    for row in rows:
        measured = row.get("error") or (row["regs"], row["spill_bytes"], widths(row["big_accesses"]))
        line = merged.setdefault((row["name"], measured), dict(row, workloads=[]))
        line["workloads"] += [w for w in row["workloads"] if w not in line["workloads"]]
        line["budgeted"] |= row["budgeted"]
    lines = [f"{'regs':>4} {'spill':>5} {'vec':>3}  kernel[constexprs]  <- first workload (+ more) | "
             "big-tensor accesses in loops: argument op bytes x count"]
    for (name, measured), line in merged.items():
        more = f" (+{len(line['workloads']) - 1})" if len(line["workloads"]) > 1 else ""
        where = f"<- {line['workloads'][0]}{more}{'' if line['budgeted'] else ' [compile only]'}"
        if "error" in line:
            lines.append(f"{'FAILED':>14}  {name}  {where} | {measured}")
            continue
        regs, spills, accesses = measured
        vec = min((a["bytes"] for a in line["big_accesses"]), default="-")
        lines.append(f"{regs:>4} {spills:>5} {vec:>3}  {name}  {where}" + (f" | {accesses}" if accesses else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", action="store_true", help="print kernel x config: regs, spills, widths")
    parser.add_argument("--json", metavar="FILE", help="write the measurements to FILE")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compile processes (default: all CPUs)")
    args = parser.parse_args(argv)
    try:
        triton.knobs.nvidia.cuobjdump.path  # noqa: B018 (raises where the wheel has no cuobjdump)
        (checked,) = measure_all([probe_launch()], jobs=1)
    except Exception as err:  # no NVIDIA backend or tools, or a triton API this script does not know
        checked = dict(error=f"{type(err).__name__}: {err}")
    if "error" in checked:
        print(f"cannot compile for {TARGET} with triton {triton.__version__}: {checked['error']}")
        return 77
    workloads = list(resnet50_workloads()) + list(coverage_workloads())
    kernels = collect(workloads)
    for kernel, result in zip(kernels, measure_all([k.launch for k in kernels], args.jobs), strict=True):
        kernel.result = result
    rows = [k.row() for k in kernels]
    if args.report:
        print(report(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(probe=checked["accesses"], kernels=rows), f, indent=1)
    failed = [row for row in rows if "error" in row]
    for row in failed:
        print(f"FAILED  {row['name']} ({row['workloads'][0]}): {row['error']}")
    print(f"{len(rows)} kernels compiled for {TARGET.backend} sm_{TARGET.arch} from {len(workloads)} workloads, "
          f"{len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
