"""Memory traffic and launches of any call on the Triton path, counted in Triton's interpreter.

The kernels here are memory-bound: on a GPU their time is about the bytes they move over the
bandwidth, plus a few microseconds per launch.  Both are counted here, on any machine, with
no GPU:

* every Triton launch runs through Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors)
  with its loads, stores and atomics instrumented: per launch the kernel, the grid and the
  bytes read and written by the lanes whose mask is set (a masked lane moves nothing on a
  GPU either), in total and per pointer argument (arguments that overlap in memory share one
  entry, named ``a=b``; an address in none of them counts under ``OUTSIDE``);
* every torch op dispatched outside the kernels, by a TorchDispatchMode that is paused while a
  kernel runs and looks inside tritonorm's custom ops: its name, its kind (``FILL``,
  ``COPY``, ``SYNC`` or ``COMPUTE``), the numel of its largest output and its bytes, which are
  *modelled* from its tensors: a fill writes its output, a copy reads its source and writes
  its destination, anything else reads every tensor argument and writes its outputs.  Views
  and allocations launch nothing on a GPU and are left out.

The launch plans are made for ``sms`` streaming multiprocessors (``H100_SMS`` by default, an
H100 or H200), so the grids are those of a GPU run, not of the interpreter's.

Sampling.  The interpreter runs a few hundred tiles a second, far too few for full-size
activations (an L1 forward at 32x256x56x56 takes minutes).  With ``sampling=Sampling()`` a
launch runs part of its work and predicts the rest:

* programs: along each grid axis the first, the last and ``Sampling.programs`` evenly
  spaced interior ones run (all of them when the axis is that short);
* loops (a ``range`` in the kernel or in a jit function it calls): the traffic of an
  iteration (bytes by argument and kind) is taken to be periodic in the loop value.  A loop
  runs its first ``ends`` iterations and uses a pattern of its line of code that these
  match; without one, a loop of more than ``window + ends`` iterations runs ``window`` and
  learns from them the shortest period that repeats at least twice.  With a pattern the
  middle is predicted and the last ``ends`` run; without, every iteration runs.  A shorter
  loop learns its pattern from the loops of consecutive programs that continue each other:
  while it has none, the next program of the first line of the grid (along its innermost
  axis of more than one program) runs too;
* a program that did not run is predicted from the sampled programs of its class (the same
  position, first, interior or last, along every axis): their bytes outside their pattern
  loops, plus those loops over its own ranges, whose starts must be one affine function of
  the program index over all the sampled programs (``_LaunchCounter.totals``).

A launch is ``counted`` when everything ran, ``predicted`` when these checks held: exact
unless the traffic depends on data, and equal to the full count in tests/test_traffic.py.
It is ``averaged`` when the sampled programs of a class moved different bytes outside
their loops (data-dependent traffic, such as the selected elements that L-inf and Top-k
add in their backward elementwise pass): the programs that did not run take the class's
mean, an approximation whose error the tests bound.  Skipped programs and iterations store
nothing, so values computed from their outputs are not the real ones: in a sampled count
the memory allocated inside starts zeroed, and an access outside the launch's tensor
arguments, which only such values produce, is counted but not made.
"""

from __future__ import annotations

import bisect
import builtins
import contextlib
import inspect
import math
import operator
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from types import FunctionType
from typing import NamedTuple, TypeVar
from unittest import mock

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..kernels import channel_reduce

T = TypeVar("T")

# Streaming multiprocessors of an H100 SXM or H200, the plans' default.
H100_SMS = 132
# Argument name of the bytes a launch moves outside its tensor arguments.
OUTSIDE = "(outside arguments)"
# How a launch's bytes were found (Launch.method), most exact first.
COUNTED, PREDICTED, AVERAGED = "counted", "predicted", "averaged"
METHODS = (COUNTED, PREDICTED, AVERAGED)
# Kinds of the torch ops outside the kernels.
FILL, COPY, SYNC, COMPUTE = "fill", "copy", "sync", "compute"
_FILLS = {"zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "fill", "fill_", "zero_", "new_zeros",
          "new_ones", "new_full", "scalar_tensor"}
_COPIES = {"copy", "copy_", "_to_copy", "clone", "_copy_from", "_copy_from_and_resize"}
_SYNCS = {"_local_scalar_dense"}
# Ops that only allocate or re-describe memory (no launch on a GPU); those that return new memory.
_NEW_MEMORY = {"empty", "empty_like", "empty_strided", "empty_permuted", "new_empty", "new_empty_strided"}
_ALLOCATIONS = _NEW_MEMORY | {"resize_", "set_"}
_READ, _WRITTEN = 0, 1
_ABSENT = object()


@dataclass(frozen=True)
class Sampling:
    """How ``count`` samples a launch (see the module docstring)."""

    programs: int = 2  # interior programs per grid axis
    window: int = 32  # iterations a loop runs to learn its period (periods up to window // 2)
    ends: int = 1  # iterations run at each end of a loop that follows a pattern

    def __post_init__(self):
        for name, low in (("programs", 1), ("window", 2), ("ends", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Sampling.{name} must be an int >= {low}, got {value!r}")


@dataclass(frozen=True)
class Launch:
    """One Triton launch: bytes read and written by unmasked lanes, in total and by pointer
    argument ({name: (read, written)}).  With sampling, ``programs`` of the grid's ran and
    ``iterations_predicted`` loop iterations were predicted instead of run; of the programs
    that did not run, ``programs_averaged`` took the mean of their class (an approximation,
    see ``_LaunchCounter.totals``) and the others were predicted."""

    kernel: str
    grid: tuple[int, int, int]
    read: int
    written: int
    arguments: dict[str, tuple[int, int]]
    programs: int
    iterations_predicted: int = 0
    programs_averaged: int = 0

    @property
    def bytes(self) -> int:
        return self.read + self.written

    @property
    def method(self) -> str:
        """How the bytes were found: COUNTED (every program and iteration ran), PREDICTED
        (the rest predicted) or AVERAGED (some programs took their class mean)."""
        if self.programs_averaged:
            return AVERAGED
        return COUNTED if self.programs == int(np.prod(self.grid)) and not self.iterations_predicted else PREDICTED


@dataclass(frozen=True)
class TorchOp:
    """A torch op dispatched outside the kernels; ``numel``: of its largest output (or the
    tensor it writes in place); ``read`` / ``written``: modelled bytes."""

    name: str
    kind: str
    numel: int
    read: int
    written: int

    @property
    def bytes(self) -> int:
        return self.read + self.written


@dataclass(frozen=True)
class Traffic:
    """What one call moved: its Triton launches, the torch ops around them, and the custom
    ops it went through (containers, not launches)."""

    launches: tuple[Launch, ...]
    torch_ops: tuple[TorchOp, ...]
    custom_ops: tuple[str, ...]

    @property
    def bytes(self) -> int:
        return sum(item.bytes for item in (*self.launches, *self.torch_ops))

    @property
    def launch_count(self) -> int:
        """GPU launches: the Triton ones and one per torch op."""
        return len(self.launches) + len(self.torch_ops)

    @property
    def method(self) -> str:
        """The least exact of its launches' methods (COUNTED when it made none)."""
        return max((launch.method for launch in self.launches), key=METHODS.index, default=COUNTED)

    def passes(self, tensor_bytes: int) -> float:
        """The bytes as passes over a tensor of ``tensor_bytes`` (the activation or weight)."""
        return self.bytes / tensor_bytes


class Step(NamedTuple):
    """The traffic of a training step's forward and of its backward."""

    forward: Traffic
    backward: Traffic


# ----------------------------------------------------------------------------- launches


class _Arguments:
    """The memory extents of a launch's tensor arguments, merged where they overlap, and the
    attribution of addresses to them."""

    def __init__(self, names, values):
        extents = sorted((t.data_ptr(), t.data_ptr() + _span(t), name)
                         for name, t in zip(names, values, strict=True) if isinstance(t, torch.Tensor) and t.numel())
        merged: list[list] = []
        for start, end, name in extents:
            if merged and start < merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
                merged[-1][2] += f"={name}"
            else:
                merged.append([start, end, name])
        self.starts = [start for start, _, _ in merged]
        self.ends = np.array([end for _, end, _ in merged], dtype=np.uint64)
        self.names = [name for _, _, name in merged]

    def attribute(self, addresses: np.ndarray) -> tuple[dict[str, int], np.ndarray | None]:
        """({argument: lanes} of the addresses, which of them lie in some argument; None when all do)."""
        i = bisect.bisect_right(self.starts, int(addresses.min())) - 1
        if i >= 0 and int(addresses.max()) < int(self.ends[i]):
            return {self.names[i]: addresses.size}, None
        index = np.searchsorted(np.array(self.starts, dtype=np.uint64), addresses, side="right").astype(np.int64) - 1
        inside = index >= 0
        inside[inside] = addresses[inside] < self.ends[index[inside]]
        lanes = Counter({self.names[i]: int(n) for i, n in enumerate(np.bincount(index[inside])) if n})
        lanes[OUTSIDE] = int((~inside).sum())
        return +lanes, inside


def _span(t: torch.Tensor) -> int:
    """Bytes from a tensor's first element to the end of its last."""
    return (sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True)) + 1) * t.element_size()


def _axis_samples(size: int, interior: int) -> set[int]:
    """The program indices sampled along a grid axis of ``size``: the first, the last and
    ``interior`` evenly spaced ones between."""
    if size <= interior + 2:
        return set(range(size))
    return {0, size - 1, *(1 + (2 * k + 1) * (size - 2) // (2 * interior) for k in range(interior))}


def _position(index: int, size: int) -> int:
    """0, 1, 2: first, interior, last along a grid axis."""
    return 0 if index == 0 else 2 if index == size - 1 else 1


def _affine(points: list[tuple[tuple[int, ...], int]]) -> Callable[[tuple[int, ...]], int] | None:
    """The affine function of the program index through ``points`` ((index, value) pairs),
    or None when no affine function passes through all of them, or fewer than 3 points (a
    line and one check) give it."""
    if len(points) < 3:
        return None
    a = np.array([(*index, 1) for index, _ in points], dtype=np.float64)
    coefficients = np.linalg.lstsq(a, np.array([value for _, value in points], dtype=np.float64), rcond=None)[0]

    def at(index):
        return round(float(np.dot((*index, 1), coefficients)))

    return at if all(at(index) == value for index, value in points) else None


class _Pattern(NamedTuple):
    """Per-iteration traffic of a loop, periodic in the loop value: the iteration with value
    v moves ``vectors[((v - origin) // step) % len(vectors)]``."""

    origin: int
    step: int
    vectors: tuple[Counter, ...]

    @classmethod
    def learn(cls, seen: list[tuple[int, Counter]], step: int) -> _Pattern | None:
        """The shortest period that repeats at least twice in the iterations ``seen``."""
        vectors = [vector for _, vector in seen]
        for period in range(1, len(vectors) // 2 + 1):
            if all(vectors[i] == vectors[i + period] for i in range(len(vectors) - period)):
                return cls(seen[0][0], step, tuple(vectors[:period]))
        return None

    def _phase(self, value: int) -> int | None:
        offset = value - self.origin
        return None if offset % self.step else (offset // self.step) % len(self.vectors)

    def matches(self, values: range, seen: list[tuple[int, Counter]]) -> bool:
        return values.step == self.step and all(
            (phase := self._phase(value)) is not None and self.vectors[phase] == vector for value, vector in seen)

    def total(self, values: range) -> Counter:
        """The traffic of the iterations ``values`` (a range this pattern matches)."""
        period, first = len(self.vectors), self._phase(values.start)
        cycles, rest = divmod(len(values), period)
        total = Counter()
        for phase, vector in enumerate(self.vectors):
            times = cycles + ((phase - first) % period < rest)
            for key, nbytes in vector.items():
                total[key] += times * nbytes
        return total


class _Loop(NamedTuple):
    """A top-level loop of a sampled program: its ``key`` (line of code, run of that line in
    the program), its ``values``, the (value, bytes) of the iterations that ran, and the
    pattern that predicted the others when every iteration that ran matches it (else None)."""

    key: tuple
    values: range
    seen: tuple[tuple[int, Counter], ...]
    pattern: _Pattern | None


class _Program(NamedTuple):
    """What a sampled program moved: ``bytes`` by (argument, kind), its top-level loops."""

    bytes: Counter
    loops: tuple[_Loop, ...]


def _per_kind(counts: Counter) -> tuple[int, ...]:
    return tuple(sum(n for (_, k), n in counts.items() if k == kind) for kind in (_READ, _WRITTEN))


class _LaunchCounter:
    """The traffic of one launch: runs its programs (with ``sampling``, a sample of them and
    of their loop iterations) and predicts the rest (``totals``)."""

    def __init__(self, kernel, args: tuple, kwargs: dict, sampling: Sampling | None):
        names = kernel.arg_names
        values = [*args, *(kwargs.get(name) for name in names[len(args):])]
        self.kernel = kernel
        self.arguments = _Arguments(names, values)
        self.sampling = sampling
        self.grid: tuple[int, int, int] = (1, 1, 1)
        self.samples: list[set[int]] | None = None
        self.programs: dict[tuple[int, int, int], _Program] = {}
        self.patterns: dict[str, list[_Pattern]] = {}
        self.predicted = 0
        # Short loops learn their pattern from consecutive programs along the innermost axis
        # with more than one program (a "line"): the loops of one line continuing each other
        # (line, line of code) -> iterations; line -> the next program to run for it.
        self.axis = 0
        self.chains: dict[tuple, list[tuple[int, Counter]]] = {}
        self.extend: dict[tuple, int] = {}
        # the running program: its bytes, top-level loops, runs of each line of code, depth
        self.bytes: Counter | None = None
        self.loops: list[_Loop] = []
        self.runs: Counter = Counter()
        self.depth = 0

    # --- memory accesses

    def access(self, ptrs, lanes: np.ndarray, kinds: tuple[int, ...]) -> np.ndarray | None:
        """Count the bytes of the ``lanes`` (a bool array shaped like ``ptrs``) of an access;
        in a sampled launch, the lanes to make it with when some lie outside the arguments."""
        addresses = ptrs.data[lanes]
        if not addresses.size:
            return None
        by_argument, inside = self.arguments.attribute(addresses)
        element = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        for name, n in by_argument.items():
            for kind in kinds:
                self.bytes[name, kind] += n * element
        if inside is None or self.sampling is None:
            return None
        made = np.zeros(lanes.shape, dtype=bool)
        made[lanes] = inside
        return made

    # --- programs

    def wrap(self, fn: Callable) -> Callable:
        """``fn`` as GridExecutor calls it, once per program: the same signature and globals
        (GridExecutor patches the triton.language modules it finds there)."""

        def program(**args):
            return self.run_program(fn, args)

        wrapper = FunctionType(program.__code__, fn.__globals__, fn.__name__, None, program.__closure__)
        wrapper.__annotations__ = fn.__annotations__
        wrapper.__signature__ = inspect.signature(fn)
        return wrapper

    def run_program(self, fn: Callable, args: dict) -> None:
        """Run the current program if it is sampled (or continues a line that is learning a
        loop pattern), and keep what it moved."""
        from triton.runtime.interpreter import interpreter_builder

        if self.samples is None:
            self.grid = tuple(interpreter_builder.grid_dim)
            interior = self.sampling.programs if self.sampling else max(self.grid)
            self.samples = [_axis_samples(size, interior) for size in self.grid]
            self.axis = max((a for a, size in enumerate(self.grid) if size > 1), default=0)
        index = tuple(interpreter_builder.grid_idx)
        line = index[:self.axis] + index[self.axis + 1:]
        sampled = all(i in axis for i, axis in zip(index, self.samples, strict=True))
        if not sampled and self.extend.get(line) != index[self.axis]:
            return
        self.bytes, self.loops, self.runs = Counter(), [], Counter()
        fn(**args)
        self.programs[index] = _Program(self.bytes, tuple(self.loops))
        self.bytes = None
        if self.sampling is not None:
            self._learn_along_line(line, index[self.axis])

    def _learn_along_line(self, line: tuple, position: int) -> None:
        """Add the fully run loops of the program at ``position`` of ``line`` to the line's
        chains, learn the patterns of the chains long enough, and decide whether the next
        program of the line runs to extend the others."""
        window = self.sampling.window
        pending = False
        for loop in self.programs[line[:self.axis] + (position,) + line[self.axis:]].loops:
            site = loop.key[0]
            if loop.pattern is not None or self._pattern_of(loop) is not None:
                continue
            chain = self.chains.get((line, site))
            if chain is None and position:  # learn only from the start of a line
                continue
            if chain and chain[-1][0] + loop.values.step != loop.values.start:
                del self.chains[line, site]  # not a continuation: this line cannot teach it
                continue
            chain = self.chains.setdefault((line, site), [])
            chain += loop.seen
            if len(chain) < window:
                pending = True
                continue
            pattern = _Pattern.learn(chain[:window], loop.values.step)
            if pattern is not None and pattern.matches(loop.values, chain):
                self.patterns.setdefault(site, []).append(pattern)
            del self.chains[line, site]
        if pending and position + 1 < min(self.grid[self.axis], window):
            self.extend[line] = position + 1
        else:
            self.extend.pop(line, None)

    def _pattern_of(self, loop: _Loop) -> _Pattern | None:
        """The pattern of a loop: the one it used, or one its iterations all match."""
        if loop.pattern is not None:
            return loop.pattern
        return next((p for p in self.patterns.get(loop.key[0], ()) if p.matches(loop.values, loop.seen)), None)

    def totals(self) -> tuple[Counter, int]:
        """The launch's bytes by (argument, kind), and how many programs that did not run
        were averaged rather than predicted.

        A class is the programs at the same position (first, interior, last) along every
        axis.  A sampled program's bytes split into its loops with a pattern (the one that
        predicted its middle, or one all its iterations match) and the rest.  A program that
        did not run takes the mean of the rest of its class's sampled programs, and the
        bytes of their loops over its own ranges when the class's programs have the same
        loops (line of code, step, length, pattern) and the start of each is one affine
        function of the program index over every sampled program.  It is predicted, not
        averaged, when besides the rest of its class's programs move the same bytes read and
        written (their split among arguments can differ where addresses come from values
        that programs which did not run never stored)."""
        total: Counter = Counter()
        for program in self.programs.values():
            total.update(program.bytes)
        if len(self.programs) == int(np.prod(self.grid)):
            return total, 0
        classes: dict[tuple, list[tuple[Counter, tuple]]] = {}
        starts: dict[tuple, list] = {}
        for index, program in self.programs.items():
            loops = tuple((loop.key, loop.values, p) for loop in program.loops if (p := self._pattern_of(loop)))
            rest = Counter(program.bytes)
            for key, values, pattern in loops:
                rest.subtract(pattern.total(values))
                starts.setdefault(key, []).append((index, values.start))
            classes.setdefault(self._position(index), []).append((rest, loops))
        start_of = {key: _affine(points) for key, points in starts.items()}

        def signature(loops):
            return [(key, values.step, len(values), id(pattern)) for key, values, pattern in loops]

        averaged = 0
        for index in np.ndindex(*self.grid):
            if index in self.programs:
                continue
            members = classes[self._position(index)]
            rest, loops = members[0]
            own_ranges = all(start_of[key] for key, _, _ in loops) and all(
                signature(ls) == signature(loops) for _, ls in members)
            averaged += not own_ranges or any(_per_kind(r) != _per_kind(rest) for r, _ in members)
            share = Fraction(1, len(members))
            for member_rest, member_loops in members:
                for key, nbytes in member_rest.items():
                    total[key] += share * nbytes
                for _, values, pattern in [] if own_ranges else member_loops:
                    for key, nbytes in pattern.total(values).items():
                        total[key] += share * nbytes
            for key, values, pattern in loops if own_ranges else ():
                first = start_of[key](index)
                total.update(pattern.total(range(first, first + len(values) * values.step, values.step)))
        return total, averaged

    def _position(self, index) -> tuple[int, ...]:
        return tuple(_position(i, size) for i, size in zip(index, self.grid, strict=True))

    # --- loops

    def range(self, *args):
        """``range`` in the kernel's namespaces: sampled inside a sampled program."""
        values = builtins.range(*map(operator.index, args))
        if self.bytes is None:
            return values
        caller = sys._getframe(1)
        return self._loop(caller.f_code.co_filename, caller.f_lineno, values)

    def _loop(self, filename: str, lineno: int, values: range):
        """Run the iterations of ``values``, or some of them, predicting the others (module
        docstring); keep a top-level loop in ``self.loops``."""
        site = f"{filename}:{lineno}"
        key = (site, self.runs[site])
        self.runs[site] += 1
        self.depth += 1
        ends, window, seen = self.sampling.ends, self.sampling.window, []

        def run(j):
            before = self.bytes.copy()
            yield values[j]
            seen.append((values[j], self.bytes - before))

        head = min(ends, len(values))
        for j in range(head):
            yield from run(j)
        pattern = next((p for p in self.patterns.get(site, ()) if p.matches(values, seen)), None)
        start = head
        if pattern is None and len(values) > window + ends:
            for j in range(head, window):
                yield from run(j)
            start, pattern = window, _Pattern.learn(seen, values.step)
            if pattern is not None:
                self.patterns.setdefault(site, []).append(pattern)
        if pattern is None or len(values) - ends <= start:
            for j in range(start, len(values)):
                yield from run(j)
        else:
            middle = values[start:len(values) - ends]
            self.bytes.update(pattern.total(middle))
            self.predicted += len(middle)
            for j in range(len(values) - ends, len(values)):
                yield from run(j)
        self.depth -= 1
        if self.depth == 0:
            if pattern is not None and not pattern.matches(values, seen):
                pattern = None  # an end that breaks the pattern: the loop is part of the rest
            self.loops.append(_Loop(key, values, tuple(seen), pattern))

    @contextlib.contextmanager
    def sampled_loops(self):
        """With sampling, ``range`` replaced by ``self.range`` in the namespaces of the kernel
        and of the jit functions it can reach."""
        if self.sampling is None:
            yield
            return
        from triton.runtime.interpreter import InterpretedFunction

        namespaces, todo = {}, [self.kernel.fn.__globals__]
        while todo:
            namespace = todo.pop()
            if id(namespace) not in namespaces:
                namespaces[id(namespace)] = namespace
                todo += [v.fn.__globals__ for v in namespace.values() if isinstance(v, InterpretedFunction)]
        # Only the one key is set and restored: the interpreter adds names of its own to these
        # namespaces the first time it runs a function, and they must stay.
        saved = [(namespace, namespace.get("range", _ABSENT)) for namespace in namespaces.values()]
        try:
            for namespace, _ in saved:
                namespace["range"] = self.range
            yield
        finally:
            for namespace, value in saved:
                if value is _ABSENT:
                    del namespace["range"]
                else:
                    namespace["range"] = value

    def record(self) -> Launch:
        totals, averaged = self.totals()
        by_argument: dict[str, list[int]] = {}
        for (name, kind), nbytes in totals.items():
            by_argument.setdefault(name, [0, 0])[kind] += nbytes
        fn = self.kernel.fn
        return Launch(
            kernel=f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}", grid=self.grid,
            read=round(sum(r for r, _ in by_argument.values())), written=round(sum(w for _, w in by_argument.values())),
            arguments={name: (round(r), round(w)) for name, (r, w) in by_argument.items()},
            programs=len(self.programs), iterations_predicted=self.predicted, programs_averaged=averaged,
        )


# ----------------------------------------------------------------------------- torch ops


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _nbytes(tensors) -> int:
    """Bytes of the distinct elements: a broadcast (stride-0) dimension is read once."""
    return sum(math.prod(n for n, step in zip(t.shape, t.stride(), strict=True) if step) * t.element_size()
               for t in tensors)


def _torch_op(func, args, kwargs, out) -> TorchOp | None:
    """The record of an aten op, or None for one that launches nothing: a view, an
    allocation, an op on empty tensors."""
    schema, name = func._schema, func._schema.name.split("::")[-1]
    if name in _ALLOCATIONS or (not schema.is_mutable and any(r.alias_info for r in schema.returns)):
        return None
    kind = FILL if name in _FILLS else COPY if name in _COPIES else SYNC if name in _SYNCS else COMPUTE
    read, written = [], []
    for i, argument in enumerate(schema.arguments):
        tensors = list(_tensors(args[i] if i < len(args) else kwargs.get(argument.name)))
        if argument.alias_info is not None and argument.alias_info.is_write:
            written += tensors
            if kind in (FILL, COPY):
                continue
        read += tensors
    outputs = (out,) if len(schema.returns) == 1 else out
    written += [t for r, o in zip(schema.returns, outputs, strict=True) if r.alias_info is None for t in _tensors(o)]
    op = TorchOp(str(func.overloadpacket), kind, max((t.numel() for t in written), default=0), _nbytes(read),
                 _nbytes(written))
    return op if op.bytes or kind == SYNC else None


class _OutsideOps(TorchDispatchMode):
    """Records the torch ops outside the kernels; looks inside custom ops (their impl runs
    with this mode pushed again), pauses while a kernel runs.  With ``zero_allocations``
    the memory allocated inside starts zeroed (unrecorded)."""

    _BELOW_PYTHON = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)

    def __init__(self, zero_allocations: bool):
        super().__init__()
        self.ops: list[TorchOp] = []
        self.custom: list[str] = []
        self.paused = False
        self.zero_allocations = zero_allocations

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        if func.namespace not in ("aten", "prim", "prims"):
            self.custom.append(str(func.overloadpacket))
            with self:
                return func.redispatch(self._BELOW_PYTHON, *args, **kwargs)
        out = func(*args, **kwargs)
        if self.zero_allocations and func._schema.name.split("::")[-1] in _NEW_MEMORY:
            out.zero_()  # this mode is off inside its own dispatch: not recorded
        op = _torch_op(func, args, kwargs, out)
        if op is not None:
            self.ops.append(op)
        return out


# ----------------------------------------------------------------------------- counting


def language_patched_once_per_launch() -> list:
    """The patches (``unittest.mock`` patchers, to start or enter) that make Triton's
    interpreter patch triton.language once per launch.  The interpreter patches it (an
    inspect.getmembers walk of its modules) before a launch and again before every call
    of a jit helper inside it, for every program, and restores it when the launch ends;
    the helpers see the modules the launch has already patched, so within a launch its
    own patch is enough (a third of the interpreter's time otherwise, more with many
    helpers).  Nothing else changes: a helper's call returns nothing from it, and the
    launch restores what it patched.  The counter applies them while it counts; the test
    session, for all of its interpreted launches (the root conftest)."""
    import threading

    import triton.language as tl
    from triton.runtime import interpreter

    patch_lang, launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    state = threading.local()

    def launch_patching_once(self, *args, **kwargs):
        state.patched = set()  # the triton.language modules patched for this launch
        try:
            return launch(self, *args, **kwargs)
        finally:
            state.patched = None

    def patch_lang_once(fn):
        languages = {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}
        patched = getattr(state, "patched", None)
        if patched and languages <= patched:
            return None  # a helper's call: the launch's own call patched these (its scope restores them)
        if patched is not None:
            patched |= languages
        return patch_lang(fn)

    return [mock.patch.object(interpreter.GridExecutor, "__call__", launch_patching_once),
            mock.patch.object(interpreter, "_patch_lang", patch_lang_once)]


class _Session:
    """One ``count``: the launches made so far and the op recorder."""

    def __init__(self, sampling: Sampling | None):
        self.sampling = sampling
        self.launches: list[Launch] = []
        self.outside = _OutsideOps(zero_allocations=sampling is not None)
        self.current: _LaunchCounter | None = None

    def launch(self, kernel, args, kwargs, grid):
        from triton.runtime.interpreter import GridExecutor

        counter = _LaunchCounter(kernel, args, kwargs, self.sampling)
        self.current, self.outside.paused = counter, True
        try:
            # values computed from skipped programs are garbage: no warnings about them
            quiet = np.errstate(all="ignore") if self.sampling else contextlib.nullcontext()
            with counter.sampled_loops(), quiet:
                GridExecutor(counter.wrap(kernel.rewrite()), kernel.arg_names, grid, kernel.pre_run_hooks)(
                    *args, **kwargs)
        finally:
            self.current, self.outside.paused = None, False
        self.launches.append(counter.record())

    def access(self, ptrs, mask, kinds: tuple[int, ...]):
        """Count an access of the current launch; the mask to make it with."""
        from triton.runtime.interpreter import TensorHandle

        if self.current is None:
            return mask
        made = self.current.access(ptrs, np.broadcast_to(mask.data, ptrs.data.shape), kinds)
        return mask if made is None else TensorHandle(made, mask.dtype)

    def patches(self, sms: int):
        """The patches of the interpreter and of the planners that counting needs."""
        from triton.runtime.interpreter import InterpretedFunction, InterpreterBuilder

        session = self
        load, store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store
        rmw, cas = InterpreterBuilder.create_atomic_rmw, InterpreterBuilder.create_atomic_cas

        def run(kernel, *args, grid, warmup, **kwargs):
            if not warmup:
                session.launch(kernel, args, kwargs, grid)

        def masked_load(builder, ptrs, mask, *rest, **kw):
            return load(builder, ptrs, session.access(ptrs, mask, (_READ,)), *rest, **kw)

        def masked_store(builder, ptrs, value, mask, *rest, **kw):
            return store(builder, ptrs, value, session.access(ptrs, mask, (_WRITTEN,)), *rest, **kw)

        def atomic_rmw(builder, op, ptrs, value, mask, *rest, **kw):
            return rmw(builder, op, ptrs, value, session.access(ptrs, mask, (_READ, _WRITTEN)), *rest, **kw)

        def atomic_cas(builder, ptrs, *rest, **kw):  # every lane; a compare-and-swap has no mask
            if session.current is not None:
                session.current.access(ptrs, np.ones(ptrs.data.shape, dtype=bool), (_READ, _WRITTEN))
            return cas(builder, ptrs, *rest, **kw)

        # every reference to the planners' SM count in the package (a kernel module may
        # have imported the function by name)
        planner, package = channel_reduce._num_programs_per_wave, channel_reduce.__name__.split(".")[0] + "."
        holders = [module for name, module in list(sys.modules.items())
                   if name.startswith(package) and getattr(module, "_num_programs_per_wave", None) is planner]
        return [
            *(mock.patch.object(module, "_num_programs_per_wave", lambda device: sms) for module in holders),
            mock.patch.object(InterpretedFunction, "run", run),
            *language_patched_once_per_launch(),
            mock.patch.object(InterpreterBuilder, "create_masked_load", masked_load),
            mock.patch.object(InterpreterBuilder, "create_masked_store", masked_store),
            mock.patch.object(InterpreterBuilder, "create_atomic_rmw", atomic_rmw),
            mock.patch.object(InterpreterBuilder, "create_atomic_cas", atomic_cas),
        ]

    def traffic(self) -> Traffic:
        return Traffic(tuple(self.launches), tuple(self.outside.ops), tuple(self.outside.custom))


_counting = False


def count(fn: Callable[[], T], *, sms: int = H100_SMS, sampling: Sampling | None = None) -> tuple[T, Traffic]:
    """Run ``fn()`` and count what it moves: (its result, its ``Traffic``).

    The Triton launches run in Triton's interpreter (``TRITON_INTERPRET=1`` before tritonorm
    is imported; CPU tensors), planned for ``sms`` SMs; with ``sampling``, each launch runs a
    sample of its programs and loop iterations and predicts the rest (module docstring)."""
    global _counting
    if not channel_reduce.INTERPRETED:
        raise RuntimeError("the traffic counter runs Triton's interpreter: set TRITON_INTERPRET=1 before importing "
                           "tritonorm, and pass CPU tensors")
    if isinstance(sms, bool) or not isinstance(sms, int) or sms < 1:
        raise ValueError(f"sms must be a positive int, got {sms!r}")
    if _counting:
        raise RuntimeError("count() calls do not nest")
    session = _Session(sampling)
    _counting = True
    try:
        with contextlib.ExitStack() as stack:
            for patch in session.patches(sms):
                stack.enter_context(patch)
            with session.outside:
                result = fn()
    finally:
        _counting = False
    return result, session.traffic()


def count_step(forward: Callable[[], torch.Tensor], inputs, grad: torch.Tensor, **options) -> Step:
    """The traffic of ``y = forward()`` and of ``torch.autograd.grad(y, inputs, grad)``, as a
    training step makes them (``options``: those of ``count``)."""
    y, forward_traffic = count(forward, **options)
    _, backward_traffic = count(lambda: torch.autograd.grad(y, tuple(inputs), grad), **options)
    return Step(forward_traffic, backward_traffic)


def describe(counted: Traffic, tensor_bytes: int, arguments: bool = False) -> str:
    """A line per launch (with ``arguments``, and per pointer argument) and per torch op of
    ``counted``: bytes read and written, also in passes over a tensor of ``tensor_bytes``;
    then the totals."""

    def moved(read: int, written: int) -> str:
        return (f"read {read / 1e6:.3f} MB ({read / tensor_bytes:.3f}), "
                f"written {written / 1e6:.3f} MB ({written / tensor_bytes:.3f})")

    lines = []
    for launch in counted.launches:
        lines.append(f"  {launch.kernel}{list(launch.grid)}: {moved(launch.read, launch.written)}, {launch.method}")
        lines += [f"    {name}: {moved(*rw)}" for name, rw in launch.arguments.items()] if arguments else []
    lines += [f"  torch {op.name} ({op.kind}, numel {op.numel}): {moved(op.read, op.written)}"
              for op in counted.torch_ops]
    lines.append(f"  total: {counted.launch_count} launches, {counted.bytes / 1e6:.3f} MB, "
                 f"{counted.passes(tensor_bytes):.3f} passes, {counted.method}")
    return "\n".join(lines)
