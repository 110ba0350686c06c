"""Compile every listed Triton kernel for an NVIDIA H100 (sm_90) without a GPU.

The interpreter (how CI runs the kernels) accepts code that the compiler rejects, such as
a variable whose shape differs between the branches of a runtime ``if``.  Triton's NVIDIA
backend and ptxas ship in the triton wheel, so the whole pipeline down to a cubin runs on
any Linux machine.  Run as a script, without TRITON_INTERPRET (tests/test_kernels_compile.py
does); exit status 0: all compiled, 1: some failed, 77: this triton cannot compile for CUDA
here (the probe kernel failed), which the test reports as a skip.
"""

import contextlib
import os
import sys
from unittest import mock

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1: interpreted kernels cannot be compiled")

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from tritonorm.kernels import bounded_weight_norm, channel_reduce, enorm, equinorm, lp_batchnorm, running_stats

TARGET = GPUTarget("cuda", 90, 32)
H100_SMS = 132


@triton.jit
def _probe(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), 1.0)


def compile_kernel(fn, signature: dict, constexprs: dict, attrs=None, options=None):
    """The compiled kernel of ``fn`` for TARGET (signature: argument -> Triton type,
    constexprs: argument -> value)."""
    full = {**signature, **{name: "constexpr" for name in constexprs}}
    src = ASTSource(fn=fn, signature=full, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options=options)


@contextlib.contextmanager
def launches():
    """Collect the cases of the kernel launches made inside, launching nothing.

    A launch is bound and specialized as ``JITFunction.run`` does it (None -> a constexpr
    None, an int equal to 1 -> a constexpr 1, alignment attributes), from the launchers'
    own arguments on CPU tensors, with their plans made for an H100's SM count."""
    backend, cases = make_backend(TARGET), []

    def record(fn, *args, grid, warmup, **kwargs):
        bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(
            *args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        constexprs = {fn.arg_names[path[0]]: value for path, value in constexprs.items()}
        cases.append((fn, signature, constexprs, attrs, options.__dict__))

    with mock.patch.object(JITFunction, "run", record), \
            mock.patch.object(channel_reduce, "_num_programs_per_wave", lambda device: H100_SMS):
        yield cases


def named(cases):
    """(name, *case), the name showing the first argument's type and the constexprs."""
    for fn, signature, constexprs, *rest in cases:
        first = signature[fn.arg_names[0]]
        values = ", ".join(f"{k}={v.value if isinstance(v, tl.constexpr) else v}" for k, v in constexprs.items())
        yield (f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}[{first}; {values}]", fn, signature, constexprs, *rest)


def enorm_cases():
    """Every norm's kernels on bf16 weights; the l2 ones and the rescale on fp32 and fp64
    weights (norms and coefficients are fp64 for all); the fp32 ones as an MLP's (LINEAR)."""
    norm = {"p": "fp32", "c": "fp32", "eps": "fp32"}
    for dtype, kinds in ((tl.bfloat16, ("l1", "l2", "linf", "lp")), (tl.float32, ("l2",)), (tl.float64, ("l2",))):
        common = {"DTYPE": dtype, "LINEAR": dtype == tl.float32, "BLOCK_J": enorm.BLOCK_J, "BLOCK_R": enorm.BLOCK_R}
        for kind in kinds:
            yield f"enorm._coefficients_kernel[{dtype}, {kind}]", enorm._coefficients_kernel, {
                "entries": "*i64", "pairs": "*i64", "tiles": "*i32", "d_ptr": "*fp64", **norm}, {**common, "NORM": kind}
            yield f"enorm._pair_kernel[{dtype}, {kind}]", enorm._pair_kernel, {
                "entries": "*i64", "pairs": "*i64", "pair": "i32", "first_entry": "i32", "last_entry": "i32",
                "d_ptr": "*fp64", **norm}, {**common, "NORM": kind, "BLOCK_J": enorm.PAIR_BLOCK_J}
        yield f"enorm._rescale_kernel[{dtype}]", enorm._rescale_kernel, {
            "entries": "*i64", "tiles": "*i32", "d_ptr": "*fp64"}, {**common, "ROW_CHUNK": enorm.ROW_CHUNK}


# (N, C, *) activations as the launchers see them: fp32 NCS (contiguous NCHW), bf16 NSC
# (channels_last), fp64 NSC (2-d (N, C)); large enough that a program walks several tiles
# (torch.empty: nothing is written).
ACTIVATIONS = [((32, 64, 56, 56), torch.float32, torch.contiguous_format),
               ((32, 64, 56, 56), torch.bfloat16, torch.channels_last),
               ((65536, 96), torch.float64, torch.contiguous_format)]


def activation(shape, dtype, memory_format):
    return torch.empty(shape, dtype=dtype, memory_format=memory_format)


def channel_reduce_cases():
    """Each quantity of the per-channel partial sums, over each activation."""
    with launches() as cases:
        for spec in ACTIVATIONS:
            view = channel_reduce.channel_view(activation(*spec))
            sums, _ = channel_reduce.partial_sums(view, "sum")
            channel_reduce.partial_sums(view, "abs_dev", center=sums, center_scale=1.0 / view.numel_per_channel)
            channel_reduce.partial_sums(view, "grad", other=view, center=torch.empty(view.c, dtype=sums.dtype))
    yield from named(cases)


def lp_batchnorm_cases():
    """Forward and backward of each norm (Top-k at k = 3 and MAX_K) in training; in fp32
    also without affine parameters and in eval, with and without them."""
    eps, normalized = 1e-5, True
    with launches() as cases:
        for i, spec in enumerate(ACTIVATIONS):
            x = activation(*spec)
            weight, bias, running_mean, running_dev = (torch.empty(x.shape[1], dtype=x.dtype) for _ in range(4))
            modes = [(True, True), (True, False), (False, True), (False, False)] if i == 0 else [(True, True)]
            for norm, k in (("l1", 1), ("linf", 1), ("topk", 3), ("topk", lp_batchnorm.MAX_K)):
                for batch_stats, affine in modes:
                    w, b = (weight, bias) if affine else (None, None)
                    running = (None, None) if batch_stats else (running_mean, running_dev)
                    y, *saved = lp_batchnorm.lp_batch_norm_forward(
                        x, w, b, *running, batch_stats, eps, norm, k, normalized)
                    lp_batchnorm.lp_batch_norm_backward(
                        y, x, w, *saved, batch_stats, affine, eps, norm, k, normalized)
    yield from named(cases)


def running_stats_cases():
    """Both buffers with a momentum, one buffer with a cumulative average; fp32, bf16 and
    fp64 buffers (the batch statistics in the accumulator dtype)."""
    num_batches_tracked = torch.ones((), dtype=torch.int64)
    with launches() as cases:
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            running = torch.empty(64, dtype=dtype)
            batch = torch.empty(64, dtype=channel_reduce.accumulator_dtype(dtype))
            running_stats.update_running([(running, batch)] * 2, num_batches_tracked, 0.1)
            running_stats.update_running([(running, batch)], num_batches_tracked, None)
    yield from named(cases)


def equinorm_cases():
    """Input sums of each activation; the weight transform and its backward, single-pass
    and exact: a grouped 3x3 conv weight with a gain in each dtype, a linear one without."""
    with launches() as cases:
        for spec in ACTIVATIONS:
            equinorm.input_sums(activation(*spec))
        weights = [((64, 32, 3, 3), 2, dtype, True) for dtype in (torch.float32, torch.bfloat16, torch.float64)]
        for shape, groups, dtype, has_gain in weights + [((128, 256), 1, torch.float32, False)]:
            weight = torch.empty(shape, dtype=dtype)
            mass = torch.empty(shape[1] * groups, dtype=channel_reduce.accumulator_dtype(dtype))
            gain = torch.empty(shape[0], dtype=dtype) if has_gain else None
            for single_pass in (True, False):
                out, s, b = equinorm.weight_forward(weight, mass, gain, groups, single_pass)
                equinorm.weight_backward(out, weight, mass, gain, s, b, groups, single_pass)
    yield from named(cases)


def bounded_weight_norm_cases():
    """Forward and backward: a 3x3 conv weight cut along dim 0 (rows) in each dtype with one
    rho, a linear weight cut along its last dim (contiguous slices) with per-slice rho."""
    with launches() as cases:
        specs = [((512, 512, 3, 3), 0, dtype, ()) for dtype in (torch.float32, torch.bfloat16, torch.float64)]
        for shape, dim, dtype, rho_shape in specs + [((4096, 1000), 1, torch.float32, (1000,))]:
            v = torch.empty(shape, dtype=dtype)
            rho = torch.empty(rho_shape, dtype=dtype)
            w, norm = bounded_weight_norm.forward(v, rho, dim, 1e-12)
            bounded_weight_norm.backward(w, v, rho, norm, dim, 1e-12)
    yield from named(cases)


CASES = [enorm_cases, channel_reduce_cases, lp_batchnorm_cases, running_stats_cases, equinorm_cases,
         bounded_weight_norm_cases]


def main() -> int:
    try:
        compile_kernel(_probe, {"x_ptr": "*fp32"}, {"BLOCK": 16})
    except Exception as err:  # no NVIDIA backend, or an ASTSource API this script does not know
        print(f"cannot compile for {TARGET} with triton {triton.__version__}: {type(err).__name__}: {err}")
        return 77
    failed, seen = 0, set()
    for cases in CASES:
        for name, fn, signature, constexprs, *rest in cases():
            key = (fn, repr(signature), repr(constexprs))
            if key in seen:  # the same kernel reached from another launch
                continue
            seen.add(key)
            try:
                compile_kernel(fn, signature, constexprs, *rest)
                print(f"ok      {name}")
            except Exception as err:
                failed += 1
                print(f"FAILED  {name}: {type(err).__name__}: {err}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
