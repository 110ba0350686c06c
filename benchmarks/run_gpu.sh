#!/usr/bin/env bash
# The GPU session in one call: environment, the test suite, the benchmark suite and the
# roofline, every log and result under $OUT.  Run from the repository root:
#
#     OUT=/some/dir bash benchmarks/run_gpu.sh [roofline.py options, e.g. --quick]
#
# The options go to the roofline of the single layers (sections lp, equinorm, enorm, bwn).
# The fused-norm and end-to-end sections (fused, stack) run after it, always at their --quick
# sizes (about 4-5 minutes with their torch.compile runs; a full run of them:
# python3 benchmarks/roofline.py --only fused --only stack).  Uses the system python3 with
# PYTHONPATH=. (nothing is installed).  Later steps run even when an earlier one fails; the
# exit status is the tests'.
set -o pipefail
: "${OUT:?set OUT to the directory that receives the results}"
mkdir -p "$OUT"
export PYTHONPATH=.

nvidia-smi
python3 -c 'import sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__,
    "| cuda", torch.version.cuda, "| triton", triton.__version__)'

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, time it, keep its status in $NAME
    local name=$1 start=$SECONDS
    shift
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log"
    printf -v "$name" '%s' "$?"
    echo "=== $name: status ${!name}, $((SECONDS - start)) s"
}

step tests python3 -m pytest -x -q tests
step bench python3 -m pytest benchmarks -q --benchmark-enable --benchmark-json="$OUT/bench.json"
step roofline python3 benchmarks/roofline.py --only lp --only equinorm --only enorm --only bwn --out "$OUT" "$@"
step fused python3 benchmarks/roofline.py --quick --only fused --only stack --out "$OUT"

echo "=== status: tests $tests, bench $bench, roofline $roofline, fused $fused"
exit "$tests"
