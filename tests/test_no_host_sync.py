"""No host synchronization in a training forward or backward, nor in an eval forward or an
ENorm step, on either path, so that CUDA graphs (``torch.compile(mode="reduce-overhead")``,
``torch.cuda.graph``) can capture them.

``NoHostSync``, a ``TorchDispatchMode``, raises on every aten op that makes the host wait
for a CUDA device.  The list follows what ``torch.cuda.set_sync_debug_mode("error")``
reports (its synchronizing calls: a device-to-host read of a value or a count, a blocking
copy) and torch's own op tags:

* ``aten._local_scalar_dense`` and ``aten.item`` (the ``data_dependent_output`` tag): a
  tensor's value read on the host; ``.item()``, ``bool()``, ``int()``, ``float()``, ``if t``,
  ``t.is_nonzero()`` and ``one_hot`` without ``num_classes`` all reach the mode as this op.
* ``aten.equal`` and ``aten.allclose``: they return a Python bool, read inside the op (its
  ``.item()`` runs with the mode popped, so the op itself is the rule).
* the ``dynamic_output_shape`` tag: ops whose output size is a count of the data, read
  back before the output can be allocated: ``nonzero`` (also ``argwhere`` and one-argument
  ``torch.where``), ``masked_select``, ``_unique``, ``_unique2``, ``unique_dim``,
  ``unique_consecutive``, ``bincount``, ``one_hot``; and ``index.Tensor`` and
  ``repeat_interleave.Tensor`` only when they need that count: ``x[mask]`` with a boolean
  mask (an integer index has the index's size), ``repeat_interleave`` without
  ``output_size``.  ``index_put_`` (``x[mask] = v``), untagged, turns a boolean mask into
  indices with ``nonzero`` inside the op: the same rule as ``index``.
* ``aten._to_copy`` and ``aten.copy_`` between the host and a device, either way
  (``.cpu()``, ``.to("cpu")``, ``.tolist()`` of a CUDA tensor): a blocking copy
  synchronizes the stream, and a CUDA graph cannot capture a copy to or from pageable
  memory; a forward has no use for a pinned non-blocking one either, so every copy
  between the host and a device is refused.  Without a GPU the self-test exercises the
  rule through the meta device.  Not seen: ``torch.tensor(data, device="cuda")`` copies
  below the dispatcher, and ``.tolist()`` / ``.numpy()`` of a CPU tensor read its memory
  directly (the library calls none of them in these paths).

Not on the list: ``aten._assert_async`` (both overloads) is a device-side assert on CUDA,
no host wait (and tritonorm does not use it: a failed device assert poisons the CUDA
context); ``nonzero_static`` and ``repeat_interleave`` with ``output_size`` have sizes
known on the host.

The mode also looks inside tritonorm's custom ops (their launchers run with the mode
pushed again), so the host code of the Triton path is checked, not only the ops around
it.  Triton's interpreter, which runs the kernels on CPU tensors here, moves a kernel's
arguments with ``new_empty``, ``set_`` and a host-to-host ``copy_``, none on the list, and
reads memory through numpy, below the dispatcher: nothing of it needs excluding.

The calls run on CPU tensors here (the Triton path through the interpreter) and on CUDA
when there is one: no op on the list is a sync on the CPU, but the library must not call
them on any device, so the mode refuses them whatever the device.  The layers are built,
and ENorm takes its first step (which builds the Triton path's tables: a host-to-device
copy), outside the mode.  ``test_self_*`` proves that the mode catches each rule and lets
the lookalikes that do not sync pass.
"""

from __future__ import annotations

import pytest
import torch
from enorm_utils import cnn, mlp
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import tritonorm
from conftest import DEVICE
from tritonorm import functional as F
from tritonorm._dispatch import TRITON_AVAILABLE

aten = torch.ops.aten

READS = {aten._local_scalar_dense.default, aten.item.default, aten.equal.default, aten.allclose.default}
MASK_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
LOOK_INSIDE = ("tritonorm", "tritonorm_test")  # the namespaces of tritonorm's custom ops and of the self-test's
_BELOW_PYTHON = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.Python)


class HostSyncError(AssertionError):
    """An op that would make the host wait for the device."""


def _is_mask(index) -> bool:
    return isinstance(index, Tensor) and index.dtype in (torch.bool, torch.uint8)


def sync_reason(func, args, kwargs) -> str | None:
    """Why ``func(*args, **kwargs)`` makes the host wait for a CUDA device, or None."""
    if func in READS:
        return "reads a tensor's value on the host"
    if func in MASK_INDEXED:
        return "indexes with a boolean mask (its count sizes the result)" if any(map(_is_mask, args[1])) else None
    if func is aten.repeat_interleave.Tensor:
        return None if kwargs.get("output_size") is not None else "repeat_interleave without output_size"
    if torch.Tag.dynamic_output_shape in func.tags:
        return "its output size is read back from the device"
    if func is aten._to_copy.default:  # _to_copy(self, *, device=None, ...)
        source, destination = args[0].device.type, torch.device(kwargs.get("device") or args[0].device).type
    elif func is aten.copy_.default:  # copy_(self, src)
        source, destination = args[1].device.type, args[0].device.type
    else:
        return None
    if source != destination and "cpu" in (source, destination):
        return f"copies from {source} to {destination}"
    return None


class NoHostSync(TorchDispatchMode):
    """Raises ``HostSyncError`` on every op of ``sync_reason``; looks inside custom ops."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = sync_reason(func, args, kwargs)
        if reason is not None:
            raise HostSyncError(f"{func}: {reason}")
        if func.namespace in LOOK_INSIDE:
            # Run the op's implementation (its launcher) with this mode pushed again; from
            # below the Python key, so that the op itself does not come back here.
            tensor = next(t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor))
            with self:
                return func.redispatch(torch._C._dispatch_keys(tensor) & _BELOW_PYTHON, *args, **kwargs)
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------- the mode itself


@torch.library.custom_op("tritonorm_test::reads_its_input", mutates_args=())
def _reads_its_input(x: Tensor) -> Tensor:
    return x * x.sum().item()


class _ReadsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * grad.sum().item()


SYNCING = {
    "item": lambda s, x, m: s.item(),
    "bool": lambda s, x, m: bool(s),
    "if": lambda s, x, m: 1 if s else 0,
    "int": lambda s, x, m: int(s),
    "float": lambda s, x, m: float(s),
    "is_nonzero": lambda s, x, m: s.is_nonzero(),
    "equal": lambda s, x, m: torch.equal(x, x),
    "allclose": lambda s, x, m: torch.allclose(x, x),
    "nonzero": lambda s, x, m: x.nonzero(),
    "argwhere": lambda s, x, m: torch.argwhere(x),
    "where": lambda s, x, m: torch.where(m),
    "masked_select": lambda s, x, m: torch.masked_select(x, m),
    "mask-index": lambda s, x, m: x[m],
    "mask-assign": lambda s, x, m: x.clone().__setitem__(m, 0.0),
    "unique": lambda s, x, m: x.unique(),
    "unique_consecutive": lambda s, x, m: x.unique_consecutive(),
    "repeat_interleave": lambda s, x, m: torch.repeat_interleave(m.long()),
    "bincount": lambda s, x, m: torch.bincount(m.long()),
    "one_hot": lambda s, x, m: nn.functional.one_hot(m.long()),
    "to-host": lambda s, x, m: torch.empty(3, device="meta").cpu(),
    "to-device": lambda s, x, m: x.to("meta"),
    "copy-to-host": lambda s, x, m: x.clone().copy_(torch.empty(x.shape, device="meta")),
    "custom-op": lambda s, x, m: _reads_its_input(x),
    "backward": lambda s, x, m: _ReadsInBackward.apply(x.requires_grad_()).sum().backward(),
}

NOT_SYNCING = {
    "int-index": lambda s, x, m: x[torch.tensor([0, 2])],
    "int-assign": lambda s, x, m: x.clone().index_put_((torch.tensor([0, 2]),), s),
    "masked_fill": lambda s, x, m: x.masked_fill(m, 0.0),
    "where-3": lambda s, x, m: torch.where(m, x, s),
    "nonzero_static": lambda s, x, m: torch.nonzero_static(x, size=4),
    "repeat_interleave-sized": lambda s, x, m: x.repeat_interleave(torch.ones(4, dtype=torch.long), output_size=4),
    "host-copy": lambda s, x, m: x.clone().copy_(x),
}


def _operands():
    x = torch.tensor([1.0, -2.0, 0.0, 3.0])
    return torch.tensor(1.0), x, x > 0


@pytest.mark.parametrize("name", SYNCING)
def test_self_catches(name):
    with NoHostSync(), pytest.raises(HostSyncError):
        SYNCING[name](*_operands())


@pytest.mark.parametrize("name", NOT_SYNCING)
def test_self_lets_pass(name):
    with NoHostSync():
        NOT_SYNCING[name](*_operands())


# ----------------------------------------------------------------------------- the library

NO_TRITON = pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton is not installed")
BACKENDS = ["torch", pytest.param("triton", marks=NO_TRITON)]
# The Lp batch norms' Triton path has two sets of launchers: channels held on chip, or split.
LP_PATHS = [("torch", "auto"), *(pytest.param("triton", path, marks=NO_TRITON) for path in ("onchip", "split"))]


def _tensor(*shape, positive=False, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(shape, generator=g) + 0.1 if positive else torch.randn(shape, generator=g)
    return t.to(DEVICE).requires_grad_(grad)


def _train_and_eval(module: nn.Module, *inputs: Tensor, **kwargs) -> None:
    """A training forward and backward, then an eval forward, each under ``NoHostSync``."""
    module.to(DEVICE).train()
    with NoHostSync():
        out = module(*inputs, **kwargs)
        torch.autograd.backward(out, torch.randn_like(out))
    module.eval()
    with NoHostSync():
        module(*inputs, **kwargs)


LP_LAYERS = {
    "l1": (tritonorm.L1BatchNorm1d, tritonorm.L1BatchNorm2d, tritonorm.L1BatchNorm3d),
    "linf": (tritonorm.LinfBatchNorm1d, tritonorm.LinfBatchNorm2d, tritonorm.LinfBatchNorm3d),
    "topk": (tritonorm.TopkBatchNorm1d, tritonorm.TopkBatchNorm2d, tritonorm.TopkBatchNorm3d),
}
LP_SHAPES = ((6, 3), (2, 3, 2, 2), (2, 3, 2, 1, 2))


def _lp_layer(norm, nd, backend, **kwargs):
    extra = {"k": 2} if norm == "topk" else {}
    return LP_LAYERS[norm][nd - 1](3, backend=backend, **extra, **kwargs)


@pytest.mark.parametrize("backend, path", LP_PATHS)
@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("norm", LP_LAYERS)
def test_lp_batch_norm(norm, nd, backend, path, monkeypatch):
    monkeypatch.setenv("TRITONORM_LP_PATH", path)
    _train_and_eval(_lp_layer(norm, nd, backend), _tensor(*LP_SHAPES[nd - 1], grad=True))


@pytest.mark.parametrize("backend, path", LP_PATHS)
@pytest.mark.parametrize("norm", LP_LAYERS)
def test_lp_batch_norm_fused(norm, backend, path, monkeypatch):
    monkeypatch.setenv("TRITONORM_LP_PATH", path)
    x, residual = _tensor(2, 3, 2, 2, grad=True), _tensor(2, 3, 2, 2, grad=True, seed=1)
    _train_and_eval(_lp_layer(norm, 2, backend, activation="relu"), x, residual=residual)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{"momentum": None}, {"track_running_stats": False}, {"affine": False}],
                         ids=["cumulative", "no-running-stats", "no-affine"])
def test_lp_batch_norm_options(options, backend):
    _train_and_eval(tritonorm.L1BatchNorm2d(3, backend=backend, **options), _tensor(2, 3, 2, 2, grad=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{}, {"momentum": None}], ids=["momentum", "cumulative"])
def test_mean_only_batch_norm(options, backend):
    _train_and_eval(tritonorm.MeanOnlyBatchNorm2d(3, backend=backend, **options), _tensor(2, 3, 2, 2, grad=True))


EQUINORM = {
    "conv1d": (lambda **kw: tritonorm.EquiNormConv1d(3, 4, 3, padding=1, **kw), (2, 3, 5)),
    "conv2d": (lambda **kw: tritonorm.EquiNormConv2d(3, 4, 3, padding=1, padding_mode="circular", **kw), (2, 3, 4, 4)),
    "conv3d": (lambda **kw: tritonorm.EquiNormConv3d(3, 4, 2, stride=2, **kw), (2, 3, 2, 2, 2)),
    "linear": (lambda **kw: tritonorm.EquiNormLinear(5, 4, **kw), (4, 5)),
}


EQUINORM_CASES = {
    **{layer: (layer, {}) for layer in EQUINORM},
    **{f"{layer}-exact": (layer, {"single_pass": False}) for layer in ("conv2d", "linear")},
    **{f"{layer}-stats-fraction": (layer, {"stats_fraction": 0.5}) for layer in ("conv2d", "linear")},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", EQUINORM_CASES)
def test_equinorm(case, backend):
    layer, options = EQUINORM_CASES[case]
    make, shape = EQUINORM[layer]
    _train_and_eval(make(backend=backend, **options), _tensor(*shape, positive=True, grad=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_equinorm_float16(backend):
    """The float16 input scaling (``functional._input_scale``) stays on the device."""
    layer = tritonorm.EquiNormConv2d(3, 4, 3, padding=1, backend=backend).to(torch.float16)
    _train_and_eval(layer, _tensor(2, 3, 4, 4, positive=True, grad=True).to(torch.float16))


BOUNDED = {
    "linear": (lambda **kw: tritonorm.BoundedWNLinear(5, 4, **kw), (2, 5)),
    "conv2d": (lambda **kw: tritonorm.BoundedWNConv2d(3, 4, 3, **kw), (2, 3, 4, 4)),
    "any-module": (lambda **kw: tritonorm.bounded_weight_norm(nn.Conv1d(3, 4, 2), dim=1, **kw), (2, 3, 4)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{}, {"rho": 1.5}, {"learnable_gain": True}],
                         ids=["rho-init", "rho", "learnable-gain"])
@pytest.mark.parametrize("layer", BOUNDED)
def test_bounded_weight_norm(layer, options, backend):
    make, shape = BOUNDED[layer]
    _train_and_eval(make(backend=backend, **options), _tensor(*shape, grad=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
@pytest.mark.parametrize("kind", ["fc", "conv"])
def test_enorm_training_step(kind, mode, backend):
    """Forward, backward, SGD's step and ENorm's, twice under the mode, after one step
    outside it (a CUDA graph's warm-up): that step makes the momentum buffers, and ENorm's
    Triton path builds its tables over them."""
    torch.manual_seed(0)
    model = (mlp((6, 5, 5, 3), bias=True) if kind == "fc" else cnn((3, 4, 4), bias=True, in_size=4)).to(DEVICE)
    x = _tensor(*((4, 6) if kind == "fc" else (2, 3, 4, 4)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    enorm = tritonorm.ENorm.from_model(model, optimizer, c=1.2, mode=mode, backend=backend)

    def step():
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        enorm.step()

    step()
    with NoHostSync():
        step()
        step()


# ----------------------------------------------------------------------------- the functional forms


def _functional_lp(norm, backend, **fused):
    x = _tensor(2, 3, 2, 2, grad=True)
    weight, bias = _tensor(3, grad=True, seed=1), _tensor(3, grad=True, seed=2)
    running_mean, running_dev = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    count = torch.ones((), dtype=torch.long, device=DEVICE)  # momentum=None: the caller counts the batch first
    extra = {"k": 2} if norm == "topk" else {}
    if fused:
        fused = {"residual": _tensor(2, 3, 2, 2, grad=True, seed=3), "activation": "leaky_relu", "negative_slope": 0.2}
    function = {"l1": F.l1_batch_norm, "linf": F.linf_batch_norm, "topk": F.topk_batch_norm}[norm]
    args = (x, running_mean, running_dev, weight, bias)
    with NoHostSync():
        y = function(*args, training=True, momentum=None, num_batches_tracked=count, backend=backend, **extra, **fused)
        torch.autograd.backward(y, torch.randn_like(y))
        function(*args, training=False, backend=backend, **extra, **fused)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("norm", LP_LAYERS)
def test_functional_lp_batch_norm(norm, fused, backend):
    _functional_lp(norm, backend, fused=fused)


FUNCTIONAL_EQUINORM = {
    "conv1d": (F.equinorm_conv1d, (2, 3, 5), (4, 3, 3), {"padding": 1}),
    "conv2d": (F.equinorm_conv2d, (2, 3, 4, 4), (4, 3, 3, 3), {"padding": 1}),
    "conv3d": (F.equinorm_conv3d, (2, 4, 2, 2, 2), (4, 2, 2, 2, 2), {"groups": 2}),
    "linear": (F.equinorm_linear, (4, 5), (4, 5), {}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FUNCTIONAL_EQUINORM)
def test_functional_equinorm(name, backend):
    function, x_shape, w_shape, geometry = FUNCTIONAL_EQUINORM[name]
    x, weight = _tensor(*x_shape, positive=True, grad=True), _tensor(*w_shape, grad=True, seed=1)
    gain, bias = _tensor(4, grad=True, seed=2), _tensor(4, grad=True, seed=3)
    running_mean = torch.ones(x_shape[-1 if name == "linear" else 1], device=DEVICE)
    with NoHostSync():
        y = function(x, weight, gain, bias, running_mean, True, stats_fraction=0.5, backend=backend, **geometry)
        torch.autograd.backward(y, torch.randn_like(y))
        function(x, weight, gain, bias, running_mean, False, backend=backend, **geometry)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("single_pass", [True, False])
def test_functional_equinorm_weight(single_pass, backend):
    weight, gain = _tensor(4, 3, 3, grad=True), _tensor(4, grad=True)
    mass = _tensor(3, positive=True, grad=True, seed=1)
    with NoHostSync():
        w = F.equinorm_weight(weight, mass, gain, single_pass=single_pass, backend=backend)
        torch.autograd.backward(w, torch.randn_like(w))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rho", ["number", "scalar-tensor", "per-slice"])
def test_functional_bounded_weight(rho, backend):
    v = _tensor(4, 3, 2, grad=True)
    rho = {"number": 1.5, "scalar-tensor": _tensor(grad=True).abs(), "per-slice": _tensor(3, grad=True, seed=1)}[rho]
    with NoHostSync():
        w = F.bounded_weight(v, rho, dim=1, backend=backend)
        torch.autograd.backward(w, torch.randn_like(w))
