"""Run a test function in several gloo processes: ``run_distributed(fn, world_size, *args)``.

Each of ``world_size`` spawned processes joins a ``torch.distributed`` process group
(backend gloo, TCP rendezvous on a free localhost port), calls ``fn(rank, world_size,
*args)`` and leaves the group; the parent gets the return values as a list indexed by
rank.  ``fn`` must be picklable, so a module-level function of an importable module (a
test module is one: ``tests/`` is on the children's path through ``PYTHONPATH``).

Startup dominates: each child imports torch and tritonorm, about 3 s on a small machine,
and the children share its cores.  Put every case of a test in ONE call (a loop inside
``fn``, results returned together) rather than one spawn per case.

The children inherit the parent's environment (``TRITON_INTERPRET=1``, which the root
conftest sets before tritonorm is imported, included: the children import tritonorm
afresh and see it), with ``OMP_NUM_THREADS=1`` and one torch thread each.  An exception in
any rank fails the caller with that rank's traceback (with those of the ranks that fail
within FAILURE_GRACE_S of it, in rank order, so the cause is there whichever came
first); a run longer than ``timeout`` seconds kills every child and fails.  No child
outlives the call.  Without torch.distributed or gloo, the test is skipped.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp

__all__ = ["run_distributed"]


# After a rank fails, how long to wait for the others' failures (a peer's error often
# follows from it: a collective reset): all of them are reported, in rank order.
FAILURE_GRACE_S = 5.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, results, fn, args) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
        try:
            value = pickle.dumps(fn(rank, world_size, *args))  # by value: no shared memory to outlive the child
            results.put((rank, True, value))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_distributed(fn, world_size: int, *args, timeout: float = 120) -> list:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, each
    called in its own process of a gloo group of ``world_size``; see the module docstring."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_child, args=(rank, world_size, port, results, fn, args), daemon=True)
        for rank in range(world_size)
    ]
    values, failures = {}, {}
    grace = float("inf")  # set at the first failure
    deadline = time.monotonic() + timeout
    try:
        with mock.patch.dict(os.environ, OMP_NUM_THREADS="1"):  # a spawned child starts with a copy of os.environ
            for p in procs:
                p.start()
        while len(values) + len(failures) < world_size:
            if time.monotonic() >= grace:
                break  # the others wait for the failed rank: they are killed below
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [f"rank {r} exit code {p.exitcode}" for r, p in enumerate(procs)
                        if p.exitcode not in (None, 0) and r not in failures]
                if dead:
                    pytest.fail(f"run_distributed: {fn.__name__} died without a result ({', '.join(dead)})")
                if time.monotonic() >= deadline and not failures:
                    pytest.fail(
                        f"run_distributed: {fn.__name__} did not finish within timeout={timeout} s "
                        f"(ranks done: {sorted(values)} of {world_size}); every rank killed"
                    )
                continue
            if ok:
                values[rank] = pickle.loads(value)
            else:
                if not failures:  # the others may fail because of this one: a moment to hear them
                    grace = time.monotonic() + FAILURE_GRACE_S
                failures[rank] = value
        if failures:
            pytest.fail("\n".join(f"run_distributed: {fn.__name__} raised in rank {rank} of {world_size}:\n{text}"
                                  for rank, text in sorted(failures.items())), pytrace=False)
        return [values[rank] for rank in range(world_size)]
    finally:
        started = [p for p in procs if p.pid is not None]
        for p in started:
            if p.is_alive():
                p.kill()
        for p in started:
            p.join()
        results.close()
