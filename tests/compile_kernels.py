"""Compile every listed Triton kernel for an NVIDIA H100 (sm_90) without a GPU.

The interpreter (how CI runs the kernels) accepts code that the compiler rejects, such as
a variable whose shape differs between the branches of a runtime ``if``.  Triton's NVIDIA
backend and ptxas ship in the triton wheel, so the whole pipeline down to a cubin runs on
any Linux machine.  Run as a script, without TRITON_INTERPRET (tests/test_kernels_compile.py
does); exit status 0: all compiled, 1: some failed, 77: this triton cannot compile for CUDA
here (the probe kernel failed), which the test reports as a skip.
"""

import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1: interpreted kernels cannot be compiled")

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tritonorm.kernels import enorm

TARGET = GPUTarget("cuda", 90, 32)


@triton.jit
def _probe(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), 1.0)


def compile_kernel(fn, signature: dict, constexprs: dict):
    """The compiled kernel of ``fn`` for TARGET (signature: argument -> Triton type)."""
    full = {**signature, **{name: "constexpr" for name in constexprs}}
    keyed = {(fn.arg_names.index(name),): value for name, value in constexprs.items()}
    return triton.compile(ASTSource(fn=fn, signature=full, constexprs=keyed), target=TARGET)


def enorm_cases():
    common = {"DTYPE": tl.bfloat16, "ACC": tl.float32, "BLOCK_J": enorm.BLOCK_J, "BLOCK_R": enorm.BLOCK_R}
    norm = {"p": "fp32", "c": "fp32", "eps": "fp32"}
    for kind in ("l1", "l2", "linf", "lp"):
        yield f"enorm._coefficients_kernel[{kind}]", enorm._coefficients_kernel, {
            "entries": "*i64", "pairs": "*i64", "tiles": "*i32", "d_ptr": "*fp32", **norm}, {**common, "NORM": kind}
        yield f"enorm._pair_kernel[{kind}]", enorm._pair_kernel, {
            "entries": "*i64", "pairs": "*i64", "pair": "i32", "first_entry": "i32", "last_entry": "i32",
            "d_ptr": "*fp32", **norm}, {**common, "NORM": kind}
    yield "enorm._rescale_kernel", enorm._rescale_kernel, {"entries": "*i64", "tiles": "*i32", "d_ptr": "*fp32"}, {
        **common, "ROW_CHUNK": enorm.ROW_CHUNK}


CASES = [enorm_cases]


def main() -> int:
    try:
        compile_kernel(_probe, {"x_ptr": "*fp32"}, {"BLOCK": 16})
    except Exception as err:  # no NVIDIA backend, or an ASTSource API this script does not know
        print(f"cannot compile for {TARGET} with triton {triton.__version__}: {type(err).__name__}: {err}")
        return 77
    failed = 0
    for cases in CASES:
        for name, fn, signature, constexprs in cases():
            try:
                compile_kernel(fn, signature, constexprs)
                print(f"ok      {name}")
            except Exception as err:
                failed += 1
                print(f"FAILED  {name}: {type(err).__name__}: {err}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
