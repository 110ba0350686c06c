"""Compiled-kernel budgets: every Triton kernel the launchers launch compiles for an H100
(sm_90), with or without a GPU here, and at the block configurations the planners choose
for ResNet-50 (and the ENorm study nets) it spills nothing and moves its big tensors in
128-bit accesses.

tests/compile_kernels.py compiles and measures (its docstring says how); this module holds
the budgets.  The table behind a failure:

    python tests/compile_kernels.py --report
"""

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# A subprocess compiling ~370 kernels: about 2 CPU-minutes, seconds once Triton's cache holds them.
pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("compile_kernels.py")

# ----------------------------------------------------------------------------- budgets
#
# They apply to every kernel that a budgeted workload reaches (compile_kernels.resnet50_workloads:
# ResNet-50's activations at N = 32 and 256, NCHW and channels_last, fp32 and bf16, through
# every Lp batch-norm pass, the running statistics and EquiNorm's input sums; its conv and
# fc weights through EquiNorm's weight transform and bounded weight norm; the ENorm study
# nets through both cycles).

# Local (spill) bytes per thread: none, in any kernel.
SPILL_BYTES = 0

# Bytes per thread of every global load and store of a big tensor (one with as many
# elements as the workload's activation or weight) in a kernel's loops: 16, i.e.
# ld/st.global.v4.b32 (4 fp32 or 8 bf16) or .v2.b64.  Every activation and weight above is
# dense, and its contiguous span (a sample's C*H*W in NCHW, the whole tensor in
# channels_last, a weight's O*I*kh*kw) is a multiple of 16 bytes, so aligned or 1-D tiles
# always allow it, even where one row does not: an NCHW 7x7 row is 49 elements, a stem
# conv's weight row 147, yet 32 channels or 4 rows of them are 16-byte multiples.  Outside
# loops a kernel touches a big tensor only a few elements per channel (each channel's x_0,
# the Top-k gradient's scatter), which no tile streams.
VECTOR_BYTES = 16

# The kernels exempt from VECTOR_BYTES:
NARROW_ACCESSES_ALLOWED = {
    # ENorm walks any number of tensors of any shapes and strides through one pointer table
    # (kernels/enorm.py): one compiled kernel serves them all, so nothing about a tensor's
    # alignment or contiguity is known when it compiles.  16-byte accesses need kernels
    # specialized per layout (the static review's issue 10): a change of design, not of tiles.
    "enorm._coefficients_kernel",
    "enorm._pair_kernel",
    "enorm._rescale_kernel",
}
# Configurations of a kernel allowed narrow accesses: kernel -> a pattern its name (with the
# constexprs) matches.
NARROW_CONFIGS_ALLOWED = {
    # Top-k's extremes pass (K > 1) folds each tile into a per-channel top-K state, with
    # reductions along each channel's row.  Rows of 7x7 (and of 14x14 in bf16) are not a
    # multiple of 16 bytes; the grouped view that aligns them for every other pass (L-inf's
    # K = 1 included) puts GROUP channels in a row, which would turn each fold step into GROUP
    # segmented reductions.  Coalescing is unaffected: a warp still reads whole lines.
    "lp_batchnorm._extremes_kernel": r"\bK=(?!1,)\d+,",
    # The on-chip kernels hold whole channels in registers.  Where a row is not a multiple of
    # 16 bytes (7x7, 14x14 in bf16) the grouped view that aligns it holds GROUP channels a
    # program: GROUP times the registers, past the capacity of the backward (x and dy), of
    # Top-k's forward (which ranks one channel a row) and of N=256.  Coalescing is unaffected.
    "lp_batchnorm._resident_forward_kernel": r"\bGROUP=1\b",
    "lp_batchnorm._resident_backward_kernel": r"\bGROUP=1\b",
}


# ----------------------------------------------------------------------------- measurements


@dataclass(repr=False)
class Compiled:
    """compile_kernels.py's exit status, output and measurements (``--json``)."""

    returncode: int
    output: str
    probe: list
    kernels: list

    def budgeted(self) -> list[dict]:
        return [row for row in self.kernels if row["budgeted"] and "error" not in row]

    def __repr__(self):  # what a failing test prints for the fixture
        return f"<{len(self.kernels)} compiled kernels>"


def _compile(out: Path) -> dict:
    """Run compile_kernels.py, its measurements to ``out``; its exit status and output."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parent.parent), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], env=env, capture_output=True,
                            text=True, timeout=1800)
    return {"returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Compiled:
    """The measurements, or a skip where this triton cannot compile for CUDA.

    Under pytest-xdist the module's tests may go to several workers, each with this
    fixture: the first compiles, under a file lock in the run's shared temporary directory
    (the parent of the workers' own), and the others read what it wrote."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        from filelock import FileLock  # a dependency of torch

        shared = tmp_path_factory.getbasetemp().parent / "compiled-kernels"
        shared.mkdir(exist_ok=True)
        out, status = shared / "kernels.json", shared / "status.json"
        with FileLock(str(shared / "lock")):
            if not status.exists():
                status.write_text(json.dumps(_compile(out)))
            run = json.loads(status.read_text())
    else:
        out = tmp_path_factory.mktemp("compiled") / "kernels.json"
        run = _compile(out)
    if run["returncode"] == 77:
        pytest.skip(run["stdout"].strip())
    assert out.exists(), run["stdout"] + run["stderr"]
    return Compiled(run["returncode"], run["stdout"] + run["stderr"], **json.loads(out.read_text()))


def _where(row) -> str:
    more = f", +{len(row['workloads']) - 1} more" if len(row["workloads"]) > 1 else ""
    return f"{row['name']} ({row['workloads'][0]}{more})"


def test_kernels_compile_for_sm90(compiled):
    failed = [f"{_where(row)}: {row['error']}" for row in compiled.kernels if "error" in row]
    assert compiled.returncode == 0 and not failed, "\n".join(failed) or compiled.output


def test_analysis_tells_accesses_apart(compiled):
    """On compile_kernels._probe_kernel: the argument each access comes from, through
    address arithmetic and a pointer table, its width, and whether it is in a loop."""
    accesses = {(a["op"], a["arg"], a["loop"], a["bytes"]) for a in compiled.probe}
    assert accesses == {
        ("ld", "x_ptr", False, 4),  # the gather
        ("ld", "x_ptr", True, 16),  # the aligned stream
        ("ld", "y_ptr", True, 4),  # the stream one element off
        ("ld", "table_ptr", False, 8),  # the int64 address
        ("st", "*table", False, 4),  # the store through it: alignment unknown
    }


def test_no_spills(compiled):
    spilling = [f"{_where(row)}: {row['spill_bytes']} bytes, {row['regs']} registers"
                for row in compiled.budgeted() if row["spill_bytes"] > SPILL_BYTES]
    assert not spilling, f"{len(spilling)} kernels spill:\n" + "\n".join(spilling)


def test_big_tensors_move_in_128_bit_accesses(compiled):
    narrow = []
    for row in compiled.budgeted():
        if row["kernel"] in NARROW_ACCESSES_ALLOWED or _narrow_config_allowed(row):
            continue
        widths = sorted({(a["arg"], a["op"], a["bytes"]) for a in row["big_accesses"] if a["bytes"] < VECTOR_BYTES})
        if widths:
            narrow.append(f"{_where(row)}: " + ", ".join(f"{arg} {op} {nbytes} B" for arg, op, nbytes in widths))
    assert not narrow, f"{len(narrow)} kernels move a big tensor in accesses under {VECTOR_BYTES} bytes:\n" + \
        "\n".join(narrow)


def _narrow_config_allowed(row) -> bool:
    pattern = NARROW_CONFIGS_ALLOWED.get(row["kernel"])
    return pattern is not None and re.search(pattern, row["name"]) is not None


def test_every_exemption_names_a_budgeted_kernel(compiled):
    stale = NARROW_ACCESSES_ALLOWED - {row["kernel"] for row in compiled.budgeted()}
    assert not stale, f"exempt from VECTOR_BYTES but not compiled by any budgeted workload: {sorted(stale)}"
    narrow = {row["kernel"] for row in compiled.budgeted() if _narrow_config_allowed(row)
              and any(a["bytes"] < VECTOR_BYTES for a in row["big_accesses"])}
    stale = set(NARROW_CONFIGS_ALLOWED) - narrow
    assert not stale, f"configurations exempt from VECTOR_BYTES that no longer move narrow accesses: {sorted(stale)}"


def test_every_access_is_traced_to_one_argument(compiled):
    """Each global access's address derives from one pointer argument or the table: an
    access traced to none or to several could be a big tensor's that the width budget
    never sees."""
    untraced = [f"{_where(row)}: {row['untraced']}" for row in compiled.kernels if row.get("untraced")]
    assert not untraced, "\n".join(untraced)
