"""Benchmark of one synchronized training step: a small CNN (conv-norm-ReLU x 3, a linear
head) under DistributedDataParallel in 2 gloo processes on this machine's CPU, forward +
backward + SGD step, with each norm side by side in the same two processes:

* ``nn.SyncBatchNorm``: nn.SyncBatchNorm's algorithm and collectives (one all_gather of
  W x (2C + 1) values forward, one all_reduce of 2C backward, as torch's
  ``nn.modules._functions.SyncBatchNorm``) in PyTorch ops, because nn.SyncBatchNorm itself
  refuses CPU input (and the ``torch.batch_norm_stats`` family it calls has no CPU kernel);
  the baseline of the ratios;
* ``SyncL1BatchNorm``, ``SyncLinfBatchNorm``, ``SyncTopkBatchNorm`` (k=10): tritonorm's
  synchronized layers (``tritonorm.convert_sync_batchnorm``), on the PyTorch path;
* ``L1BatchNorm2d`` and ``nn.BatchNorm2d``: the unsynchronized layers, each process on its
  own batch: what the same step costs without the norms' communication.

Each process runs one thread (``OMP_NUM_THREADS=1``).  A step's time is rank 0's, from a
barrier to the end of the SGD step; the rounds interleave the variants, so that a shared
machine's load spreads over all of them.  The collectives of the norms are counted in one
step by wrapping ``torch.distributed.all_gather``, ``all_gather_into_tensor`` and
``all_reduce`` (DDP's gradient all-reduce runs in its C++ reducer and is not counted):
their number and bytes (all_gather: the gathered W x input; all_reduce: the tensor).

    python benchmarks/bench_sync.py [--rounds 15] [--steps 4] [--json FILE]
    pytest benchmarks/bench_sync.py --benchmark-enable

Under pytest (``--benchmark-disable`` in the default options) the test starts the two
processes once and runs each variant for one step, checking that the synchronized
layers' running statistics agree on both ranks; with ``--benchmark-enable``
pytest-benchmark times the parent's round trip (a command to both processes, one step in
each, both answers), which adds the queues' latency to the step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import socket
import statistics
import time
import traceback
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD_SIZE = 2
BATCH, CHANNELS, RESOLUTION = 8, (16, 32, 32), 32  # per process: (8, 3, 32, 32) input
BASELINE = "nn.SyncBatchNorm"
VARIANTS = (BASELINE, "SyncL1BatchNorm", "SyncLinfBatchNorm", "SyncTopkBatchNorm", "L1BatchNorm2d",
            "nn.BatchNorm2d")
COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce")


# ---- nn.SyncBatchNorm's algorithm on CPU ---------------------------------------------------

class _SyncBatchNormFunction(torch.autograd.Function):
    """torch's ``nn.modules._functions.SyncBatchNorm`` in PyTorch ops: the same statistics,
    gradients and collectives."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        count = x.numel() // c
        if count:
            var, mean = torch.var_mean(x, dims, correction=0)
            combined = torch.cat([mean, (var + eps).rsqrt(), x.new_full((1,), count)])
        else:
            combined = x.new_zeros(2 * c + 1)
        parts = [torch.empty_like(combined) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, combined, group=group)  # gloo: no all_gather_into_tensor
        gathered = torch.stack(parts)
        means, invstds, counts = gathered[:, :c], gathered[:, c:2 * c], gathered[:, 2 * c:]
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        variances = torch.where(counts > 0, invstds.pow(-2) - eps, 0.0)
        var = (counts * (variances + (means - mean) ** 2)).sum(0) / n
        invstd = (var + eps).rsqrt()
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(var * n / (n - 1), alpha=momentum)
        shape = (1, c, *(1,) * (x.dim() - 2))
        out = (x - mean.view(shape)) * (invstd * weight).view(shape) + bias.view(shape)
        ctx.save_for_backward(x, weight, mean, invstd, n)
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd, n = ctx.saved_tensors
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = (1, c, *(1,) * (x.dim() - 2))
        xmu = x - mean.view(shape)
        sum_dy, sum_dy_xmu = grad_out.sum(dims), (grad_out * xmu).sum(dims)
        grad_weight, grad_bias = sum_dy_xmu * invstd, sum_dy.clone()  # this process's, as torch's
        combined = torch.cat([sum_dy, sum_dy_xmu])
        dist.all_reduce(combined, group=ctx.group)
        mean_dy, mean_dy_xmu = (combined / n).split(c)
        dx = (grad_out - mean_dy.view(shape) - xmu * (invstd.pow(2) * mean_dy_xmu).view(shape)) * (
            invstd * weight).view(shape)
        return dx, grad_weight, grad_bias, None, None, None, None, None


class SyncBatchNormCPU(nn.BatchNorm2d):
    """nn.SyncBatchNorm's training step for CPU tensors (affine, tracked statistics, a
    fixed momentum: what the benchmark model uses)."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
                                            self.momentum, dist.group.WORLD)


# ---- the model -------------------------------------------------------------------------------

def build_model(variant: str) -> nn.Module:
    """The CNN with ``variant``'s norm, the same initial weights for every variant."""
    import tritonorm

    torch.manual_seed(0)
    norm = SyncBatchNormCPU if variant == BASELINE else nn.BatchNorm2d
    layers, c_in = [], 3
    for c in CHANNELS:
        layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), norm(c), nn.ReLU()]
        c_in = c
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10))
    if variant in (BASELINE, "nn.BatchNorm2d"):
        return model
    lp = {"L1": "l1", "Linf": "linf", "Topk": "topk"}[variant.removeprefix("Sync").removesuffix("BatchNorm2d")
                                                      .removesuffix("BatchNorm")]
    model = tritonorm.convert(model, lp, backend="torch", **({"k": 10} if lp == "topk" else {}))
    return tritonorm.convert_sync_batchnorm(model) if variant.startswith("Sync") else model


def running_stats(model: nn.Module) -> torch.Tensor:
    return torch.cat([b.flatten().double() for name, b in model.named_buffers()
                      if name.endswith(("running_mean", "running_var", "running_dev"))])


@contextlib.contextmanager
def counting_collectives(counts: dict):
    """Count the calls and bytes of torch.distributed's all_gather, all_gather_into_tensor
    and all_reduce made inside the block into ``counts`` ({name: [calls, bytes]})."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def wrap(name):
        def counted(*args, **kwargs):
            tensor = args[1] if name.startswith("all_gather") else args[0]
            size = tensor.numel() * tensor.element_size()
            if name.startswith("all_gather"):
                size *= dist.get_world_size(kwargs.get("group"))
            entry = counts.setdefault(name, [0, 0])
            entry[0] += 1
            entry[1] += size
            return originals[name](*args, **kwargs)
        return counted

    for name in COLLECTIVES:
        setattr(dist, name, wrap(name))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


# ---- the worker processes ---------------------------------------------------------------------

def _worker(rank: int, world_size: int, port: int, commands, results) -> None:
    """A loop over commands: ("steps", variant, n) runs n training steps of variant and
    answers rank 0's step times, the collectives of the first step and the running
    statistics of both ranks; ("stop",) leaves."""
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        setups = {}
        generator = torch.Generator().manual_seed(rank)
        while True:
            command = commands[rank].get()
            if command[0] == "stop":
                break
            _, variant, n = command
            if variant not in setups:
                model = build_model(variant)
                ddp = nn.parallel.DistributedDataParallel(model)
                ddp.broadcast_buffers = False  # no copy of rank 0's buffers: each rank keeps its own
                setups[variant] = model, ddp, torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
            model, ddp, optimizer = setups[variant]
            times, counts = [], {}
            for i in range(n):
                x = torch.randn(BATCH, 3, RESOLUTION, RESOLUTION, generator=generator)
                y = torch.randint(0, 10, (BATCH,), generator=generator)
                dist.barrier()
                start = time.perf_counter()
                with counting_collectives(counts) if i == 0 else contextlib.nullcontext():
                    loss = nn.functional.cross_entropy(ddp(x), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                times.append(time.perf_counter() - start)
            stats = running_stats(model)
            gathered = [torch.empty_like(stats) for _ in range(world_size)]
            dist.all_gather(gathered, stats)
            results.put((rank, True, (times, counts, [g.tolist() for g in gathered])))
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


class Workers:
    """Two gloo processes that run the variants' steps on command (a context manager)."""

    def __init__(self, world_size: int = WORLD_SIZE, timeout: float = 300):
        self.world_size, self.timeout = world_size, timeout
        ctx = mp.get_context("spawn")
        self.commands = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.procs = [ctx.Process(target=_worker, args=(r, world_size, port, self.commands, self.results),
                                  daemon=True) for r in range(world_size)]
        with mock.patch.dict(os.environ, OMP_NUM_THREADS="1"):  # the children start with a copy of os.environ
            for p in self.procs:
                p.start()

    def steps(self, variant: str, n: int):
        """(rank 0's step times, the first step's collectives {name: [calls, bytes]}, the
        running statistics of every rank)."""
        for q in self.commands:
            q.put(("steps", variant, n))
        answers = {}
        deadline = time.monotonic() + self.timeout
        while len(answers) < self.world_size:
            try:
                rank, ok, value = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if p.exitcode is not None]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"bench_sync: worker(s) {dead or 'all'} stopped answering") from None
                continue
            if not ok:
                raise RuntimeError(f"bench_sync: rank {rank} failed:\n{value}")
            answers[rank] = value
        return answers[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for q in self.commands:
            q.put(("stop",))
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


def describe(counts: dict) -> tuple[int, int, str]:
    """(collectives, bytes, "2 all_gather + 1 all_reduce") of one step's counts."""
    calls = sum(c for c, _ in counts.values())
    nbytes = sum(b for _, b in counts.values())
    text = " + ".join(f"{c} {name}" for name, (c, _) in counts.items()) or "none"
    return calls, nbytes, text


def measure(rounds: int, steps: int) -> dict:
    """Every variant, ``rounds`` rounds of ``steps`` steps, interleaved; medians in ms."""
    times = {v: [] for v in VARIANTS}
    collectives = {}
    with Workers() as workers:
        for v in VARIANTS:  # warm-up: build, first steps
            _, counts, _ = workers.steps(v, 2)
            collectives[v] = counts
        for _ in range(rounds):
            for v in VARIANTS:
                times[v] += workers.steps(v, steps)[0]
    base = statistics.median(times[BASELINE])
    rows = []
    for v in VARIANTS:
        median = statistics.median(times[v])
        calls, nbytes, text = describe(collectives[v])
        rows.append(dict(variant=v, median_ms=round(median * 1e3, 2), ratio=round(median / base, 2),
                         collectives=calls, collective_bytes=nbytes, which=text, steps=len(times[v])))
    return dict(
        date=time.strftime("%Y-%m-%d"), torch=torch.__version__, triton=_triton_version(),
        machine=f"{WORLD_SIZE} gloo processes, 1 thread each, on a CPU machine ({os.cpu_count()} cores, shared); "
                "not a GPU measurement",
        model=f"conv3x3-norm-ReLU x 3 (channels {CHANNELS}), avgpool, linear; per-process input "
              f"({BATCH}, 3, {RESOLUTION}, {RESOLUTION}) fp32; DDP, SGD momentum 0.9; Top-k k=10",
        rows=rows,
    )


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "not installed"


def table(result: dict) -> str:
    lines = ["| norm | median step (ms) | vs nn.SyncBatchNorm | norm collectives per step | bytes |",
             "| --- | ---: | ---: | --- | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['median_ms']:.1f} | {r['ratio']:.2f} | {r['which']} "
                     f"| {r['collective_bytes']:,} |")
    return "\n".join(lines)


# ---- pytest ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workers():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    with Workers() as w:
        yield w


@pytest.mark.parametrize("variant", VARIANTS)
def test_sync_step(benchmark, workers, variant):
    _, counts, stats = workers.steps(variant, 1)  # warm-up, and the checks
    calls, nbytes, text = describe(counts)
    synchronized = variant == BASELINE or variant.startswith("Sync")
    assert (calls > 0) == synchronized, text
    if synchronized:
        assert stats[0] == stats[1], "the running statistics differ between the ranks"
    benchmark.group = f"sync training step, {WORLD_SIZE} gloo processes, cpu"
    benchmark.extra_info.update(collectives=calls, collective_bytes=nbytes, which=text)
    benchmark(workers.steps, variant, 1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="rounds over the variants (default 15)")
    parser.add_argument("--steps", type=int, default=4, help="steps per variant and round (default 4)")
    parser.add_argument("--json", help="also write the result as JSON to this file")
    args = parser.parse_args(argv)
    result = measure(args.rounds, args.steps)
    print(f"{result['date']}, torch {result['torch']}, triton {result['triton']}: {result['machine']}")
    print(result["model"])
    print(table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
