"""``tritonorm.convert``: a copy of a torch model with its normalization swapped.

Like ``nn.SyncBatchNorm.convert_sync_batchnorm``, but the model it is given is never
changed: the conversion works on a deep copy and returns it.
"""

from __future__ import annotations

import inspect
import operator
import warnings
from collections import Counter, OrderedDict

import torch
import torch.distributed as dist
from torch import fx, nn

from . import functional as F
from ._chain import BATCHNORMS, Tracer, describe
from ._checks import check_bool, is_number
from ._dispatch import check_backend
from .nn.bounded_weight_norm import bounded_weight_norm
from .nn.equinorm import EquiNormConv1d, EquiNormConv2d, EquiNormConv3d, EquiNormLinear, _EquiNorm
from .nn.lp_batchnorm import (
    SYNC_CLASSES,
    L1BatchNorm1d,
    L1BatchNorm2d,
    L1BatchNorm3d,
    LinfBatchNorm1d,
    LinfBatchNorm2d,
    LinfBatchNorm3d,
    TopkBatchNorm1d,
    TopkBatchNorm2d,
    TopkBatchNorm3d,
    _LpBatchNorm,
    running_dev_from_var,
)
from .nn.mean_only_batchnorm import MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d, MeanOnlyBatchNorm3d
from .reference.activation import ACTIVATIONS, NEGATIVE_SLOPE, activation_of
from .sync_batchnorm import copy_model

__all__ = ["convert"]

_LP_CLASSES = {
    "l1": (L1BatchNorm1d, L1BatchNorm2d, L1BatchNorm3d),
    "linf": (LinfBatchNorm1d, LinfBatchNorm2d, LinfBatchNorm3d),
    "topk": (TopkBatchNorm1d, TopkBatchNorm2d, TopkBatchNorm3d),
}
# The layers EquiNorm takes in front of each BatchNorm, and the layer that replaces the pair.
_EQUINORM_PAIRS = {
    nn.BatchNorm1d: ((nn.Linear, EquiNormLinear), (nn.Conv1d, EquiNormConv1d)),
    nn.BatchNorm2d: ((nn.Conv2d, EquiNormConv2d),),
    nn.BatchNorm3d: ((nn.Conv3d, EquiNormConv3d),),
}
_WEIGHT_DIMS = {
    nn.Linear: 0, nn.Conv1d: 0, nn.Conv2d: 0, nn.Conv3d: 0,
    nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 1, nn.ConvTranspose3d: 1,
}
_BN_NAMES = "nn.BatchNorm1d/2d/3d"
# What the Lp conversions replace: the BatchNorms, and nn.SyncBatchNorm by the synchronized
# Lp layer of the same norm.
_CONVERTIBLE = (*BATCHNORMS, nn.SyncBatchNorm)


def convert(model: nn.Module, norm: str, **options) -> nn.Module:
    """A converted deep copy of ``model``; ``model`` itself is left exactly as it was
    (parameters, buffers, modules, training flags).

    norm "l1", "linf", "topk": every nn.BatchNorm1d/2d/3d (subclasses included) becomes
        the L1 / Linf / Topk BatchNorm of the same dimension, and every nn.SyncBatchNorm
        the SyncL1 / SyncLinf / SyncTopkBatchNorm over the same process group; with the
        same num_features,
        eps, momentum, affine, track_running_stats, device, dtype and training flag;
        weight, bias, running_mean and num_batches_tracked are copied, and

            running_dev = sqrt(running_var + eps) - eps

        (``tritonorm.nn.lp_batchnorm.running_dev_from_var``, the map the layers use to load
        an nn.BatchNorm state_dict too).  The Lp dispersions are scaled to estimate the
        standard deviation of Gaussian data, so sqrt(running_var) is their consistent
        estimate, and the "- eps" makes the eval output gamma (x - mu) / (running_dev + eps)
        + beta the BatchNorm's gamma (x - mu) / sqrt(running_var + eps) + beta (to
        rounding).  Options: ``backend``;
        ``k`` for "topk" (10 by default, as TopkBatchNorm: training needs k values or more
        per channel); ``fuse`` (below).  Modules keep their names and the model its
        type (a model that is itself a BatchNorm gives the Lp layer); a BatchNorm used at
        several places becomes one Lp layer used at the same places.  A subclass of nn.BatchNorm
        converts like it when it adds nothing.  A timm BatchNormAct-style subclass (its own
        forward computing act(drop(bn(x))), with ``act`` and ``drop`` submodules) gives the
        Lp layer with ``activation`` set to act's when drop is nn.Identity (or absent) and
        act is nn.ReLU, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish or nn.Identity;
        otherwise ``nn.Sequential(norm=<Lp layer>, drop=drop, act=act)`` with the same
        drop and act modules (the Identity ones left out).  Any other subclass with its
        own forward or submodules is a ValueError naming it (an Lp layer in its place
        would silently change the function).

        ``fuse=True`` also moves what follows each BatchNorm into its Lp layer: the model
        is traced with torch.fx (BatchNorms as leaves), so the result is a
        ``torch.fx.GraphModule`` running the traced forward, and a model fx cannot trace
        is a ValueError.  A BatchNorm whose output goes only to a supported activation
        (nn.ReLU, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, F.relu / torch.relu /
        x.relu(), F.leaky_relu, F.silu, F.gelu, F.hardswish) becomes
        ``layer(x)`` with ``activation`` set; one whose output goes only to an add
        (``+``, torch.add, x.add, ``+=``; either operand order) whose output goes only to
        such an activation becomes ``layer(x, residual=other)``; the activation and add
        nodes are removed.  Left as they are (converted, unfused): a BatchNorm called at
        several places (one layer cannot hold one activation per call), a BatchNorm output
        or add output that feeds anything else too, an add with a scalar, with alpha != 1
        or writing into the other operand, activations not in the list (or non-constant
        arguments), a BatchNormAct-style layer (it has its activation already).  The
        other operand of a fused add must have the BatchNorm output's shape, dtype and
        device (a broadcasting add would fail at the call).  The eval output is the
        unfused conversion's, and so are the training forward and backward.

    norm "equinorm": each nn.Conv1d/2d/3d (nn.Linear) whose output goes only to an
        nn.BatchNorm of its dimension (BatchNorm1d for Linear) and its number of channels
        is replaced, with that BatchNorm, by EquiNormConv1d/2d/3d (EquiNormLinear) under
        the convolution's name.  The pairs are found with torch.fx, so the result is a
        ``torch.fx.GraphModule`` running the traced forward (methods and attributes that
        forward does not use are not kept), and a model fx cannot trace is a ValueError.
        The convolution's hyper-parameters (stride, padding, dilation, groups,
        padding_mode) and weight are copied as they are (signs not rebalanced: a row
        whose weights share one sign is degenerate, see ``balance_signs_``); the
        BatchNorm's weight and bias become EquiNorm's gain and bias (affine=False stays
        without them), its momentum the momentum of EquiNorm's running input mean.  The
        convolution's own bias is dropped: the BatchNorm cancelled it with the batch mean,
        and EquiNorm's weight shift keeps the output at mean zero the same way (exactly
        under the paper's assumptions).  Running statistics do not carry over (BatchNorm
        tracks its output, EquiNorm its input: ``running_mean`` starts at ones), so train,
        or run a few batches in training mode, before eval.
        Options: ``single_pass``, ``stats_fraction``, ``backend`` (see EquiNormConv2d).
        Every BatchNorm it cannot convert (input not such a layer, a layer that feeds
        anything else, a layer or BatchNorm called more than once, track_running_stats
        False, a layer EquiNorm refuses) is left alone and reported in one UserWarning,
        with its qualified name and the reason.

    norm "bounded_wn": ``bounded_weight_norm`` on the weight of every nn.Linear and
        nn.Conv1d/2d/3d (slices along dim 0, the output channels) and nn.ConvTranspose1d/
        2d/3d (dim 1: the output channels when groups=1); BatchNorms are kept, or with
        ``mean_only=True`` each nn.BatchNorm1d/2d/3d becomes the MeanOnlyBatchNorm of the
        same dimension (the pairing of "Norm matters": momentum, track_running_stats,
        beta and running_mean carried over; gamma and running_var dropped, the weight
        norm's gain sets the scale; nn.SyncBatchNorm and BatchNorm subclasses that change
        the function are a ValueError).  Options: ``rho``, ``learnable_gain``,
        ``mean_only``, ``backend``.

    Errors: TypeError for a model that is not an nn.Module or an option the norm does not
    take; ValueError for an unknown norm, a bad backend, or a model with nothing to convert.

    Args:
        model: the nn.Module to convert (left unchanged).
        norm: "l1", "linf", "topk" (the batch norms of "Norm matters", Hoffer et al. 2018),
            "equinorm" ("Controlling Covariate Shift using Equilibrium Normalization of
            Weights", Defazio & Bottou 2019) or "bounded_wn" (bounded weight norm, "Norm
            matters").
        **options: the norm's options, above: ``backend`` for every norm; ``fuse`` ("l1",
            "linf", "topk"); ``k`` ("topk"); ``single_pass``, ``stats_fraction``
            ("equinorm"); ``rho``, ``learnable_gain``, ``mean_only`` ("bounded_wn").

    Example::

        >>> model = torchvision.models.resnet18()
        >>> l1 = tritonorm.convert(model, "l1", fuse=True)     # BatchNorm(+add)+ReLU -> one L1 layer
        >>> equi = tritonorm.convert(model, "equinorm")        # each conv + BatchNorm -> EquiNormConv2d
        >>> bounded = tritonorm.convert(model, "bounded_wn", learnable_gain=True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(norm, str) or norm not in _CONVERTERS:
        raise ValueError(f"norm must be one of {', '.join(map(repr, _CONVERTERS))}, got {norm!r}")
    converter = _CONVERTERS[norm]
    accepted = [p.name for p in inspect.signature(converter).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"options: convert(..., {norm!r}) got unknown option(s) {', '.join(map(repr, unknown))}; "
            f"it takes {', '.join(map(repr, accepted))}"
        )
    check_backend(options.get("backend", "auto"))
    return converter(copy_model(model), **options)


# --- l1 / linf / topk ---------------------------------------------------------------
# Each converter takes the deep copy; its keyword-only parameters are the options that
# convert accepts for its norm.


def _l1(model: nn.Module, *, backend: str = "auto", fuse: bool = False) -> nn.Module:
    return _lp_model(model, "l1", {"backend": backend}, fuse)


def _linf(model: nn.Module, *, backend: str = "auto", fuse: bool = False) -> nn.Module:
    return _lp_model(model, "linf", {"backend": backend}, fuse)


def _topk(model: nn.Module, *, k: int = 10, backend: str = "auto", fuse: bool = False) -> nn.Module:
    return _lp_model(model, "topk", {"k": k, "backend": backend}, fuse)


def _lp_model(model: nn.Module, norm: str, options: dict, fuse: bool) -> nn.Module:
    """Every BatchNorm swapped for its Lp layer; with ``fuse``, in the traced model, each
    activation (and residual add before it) that follows one moved into its layer."""
    check_bool("fuse", fuse)
    if not fuse or isinstance(model, _CONVERTIBLE):  # a model that is one BatchNorm has nothing to fuse
        return _swap_batchnorms(model, norm, options)
    graph_module = _trace(model, "or convert without fuse=True")
    targets = {n.target for n in graph_module.graph.nodes
               if n.op == "call_module" and isinstance(graph_module.get_submodule(n.target), _CONVERTIBLE)}
    _swap_batchnorms(graph_module, norm, options)
    _fuse_activations(graph_module, targets)
    graph_module.delete_all_unused_submodules()
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module


def _swap_batchnorms(model: nn.Module, norm: str, options: dict) -> nn.Module:
    """Replace, in place, every BatchNorm of ``model`` (every path to it, a shared one by
    one shared layer) with its Lp counterpart; the root itself may be one."""
    replaced: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, _CONVERTIBLE):
            continue
        if id(module) not in replaced:
            try:
                replaced[id(module)] = _lp_layer(module, norm, options)
            except (TypeError, ValueError) as err:
                raise type(err)(f"model.{name or '<root>'} ({type(module).__name__}): {err}") from None
        if not name:
            model = replaced[id(module)]
            break
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, replaced[id(module)])
    if not replaced:
        raise ValueError(f"model: found no {_BN_NAMES} or nn.SyncBatchNorm to convert to {norm!r}")
    return model


@torch.no_grad()
def _lp_layer(bn: nn.Module, norm: str, options: dict) -> nn.Module:
    """The Lp BatchNorm with ``bn``'s settings, parameters and eval-mode output (followed
    by the drop and act of a BatchNormAct-style layer that it cannot fuse)."""
    tensors = [t for t in (bn.weight, bn.running_mean) if t is not None]
    factory = {"device": tensors[0].device, "dtype": tensors[0].dtype} if tensors else {}
    activation, tail = _bn_activation(bn)
    settings = (bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if isinstance(bn, nn.SyncBatchNorm):
        layer = SYNC_CLASSES[norm](*settings, bn.process_group, **activation, **options, **factory)
    else:
        dim = next(d for d, cls in enumerate(BATCHNORMS) if isinstance(bn, cls))
        layer = _LP_CLASSES[norm][dim](*settings, **activation, **options, **factory)
    if bn.affine:
        layer.weight.copy_(bn.weight)
        layer.bias.copy_(bn.bias)
    if layer.track_running_stats and bn.running_var is not None:
        layer.running_mean.copy_(bn.running_mean)
        layer.running_dev.copy_(running_dev_from_var(bn.running_var, bn.eps))
        layer.num_batches_tracked.copy_(bn.num_batches_tracked)
    layer.train(bn.training)
    return nn.Sequential(OrderedDict(norm=layer, **tail)) if tail else layer


# The forwards that compute a batch norm and nothing else.
_BATCHNORM_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


def _changes_function(bn: nn.Module) -> str | None:
    """What a BatchNorm subclass adds to nn.BatchNorm's function (an own forward, its
    submodules), or None for a subclass that only renames it."""
    children = [name for name, _ in bn.named_children()]
    what = []
    if type(bn).forward not in _BATCHNORM_FORWARDS:
        what.append("overrides forward")
    if children:
        what.append(f"owns submodules ({', '.join(children)})")
    return " and ".join(what) or None


def _bn_activation(bn: nn.Module) -> tuple[dict, dict]:
    """The Lp layer's activation arguments for ``bn`` and the modules that must follow the
    layer: none for nn.BatchNorm (or a subclass that adds nothing).  For a timm
    BatchNormAct-style subclass, an own forward computing act(drop(bn(x))) with ``act``
    (and ``drop``) submodules: act fused when drop is nn.Identity and act is one the layers
    take, else drop and act after the layer (Identity ones left out).  Anything else a
    ValueError: a bare Lp layer would silently drop what the subclass adds."""
    changes = _changes_function(bn)
    if changes is None:
        return {}, {}
    children = dict(bn.named_children())
    if type(bn).forward in _BATCHNORM_FORWARDS or "act" not in children or not set(children) <= {"act", "drop"}:
        raise ValueError(
            f"a BatchNorm subclass that {changes}: an Lp layer in its place would not compute what it does (only "
            "the act / drop submodules of a BatchNormAct-style layer are understood); convert it by hand"
        )
    tail = {name: children[name] for name in ("drop", "act")
            if name in children and type(children[name]) is not nn.Identity}
    found = activation_of(tail["act"]) if set(tail) == {"act"} else None
    if found is not None:
        return {"activation": found[0], "negative_slope": found[1]}, {}
    return {}, tail


# --- fuse=True: activations and residual adds into the Lp layers -------------------

_ADDS = {operator.add, torch.add}
_IN_PLACE_ADDS = {operator.iadd}
# The parameters of the activation functions fx may record, in order.
_ACTIVATION_PARAMETERS = {
    nn.functional.relu: ("input", "inplace"),
    torch.relu: ("input",),
    nn.functional.leaky_relu: ("input", "negative_slope", "inplace"),
    nn.functional.silu: ("input", "inplace"),
    nn.functional.gelu: ("input", "approximate"),
    nn.functional.hardswish: ("input", "inplace"),
}


def _fuse_activations(graph_module: fx.GraphModule, targets: set[str]) -> None:
    """For each call of an Lp layer in ``targets`` (the converted BatchNorms) whose layer
    is called once and has no activation yet: bn -> act becomes bn(activation=act), and
    bn -> add(other) -> act becomes bn(x, residual=other)(activation=act), when each node
    on the way has that one user."""
    graph = graph_module.graph
    modules = dict(graph_module.named_modules())
    calls = Counter(id(modules[n.target]) for n in graph.nodes if n.op == "call_module")
    for bn_node in list(graph.nodes):
        if bn_node.op != "call_module" or bn_node.target not in targets:
            continue
        layer = modules[bn_node.target]
        if not isinstance(layer, _LpBatchNorm) or calls[id(layer)] != 1 or layer.activation is not None \
                or len(bn_node.args) != 1 or bn_node.kwargs:
            continue
        found = _match(bn_node, modules)
        if found is None:
            continue
        act_node, activation, add_node, residual = found
        layer.activation, layer.negative_slope = activation
        if add_node is None:
            act_node.replace_all_uses_with(bn_node)
            graph.erase_node(act_node)
            continue
        act_node.replace_all_uses_with(bn_node)
        graph.erase_node(act_node)
        add_node.prepend(bn_node)  # moved after the residual's node, which may follow it (its name kept)
        bn_node.kwargs = {"residual": residual}
        graph.erase_node(add_node)


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _match(bn_node: fx.Node, modules: dict):
    """(activation node, (name, negative_slope), add node or None, residual node or None)
    of the pattern that follows ``bn_node``, or None."""
    user = _only_user(bn_node)
    if user is None:
        return None
    activation = _activation(user, bn_node, modules)
    if activation is not None:
        return user, activation, None, None
    residual = _residual(user, bn_node)
    act_node = _only_user(user) if residual is not None else None
    activation = None if act_node is None else _activation(act_node, user, modules)
    return None if activation is None else (act_node, activation, user, residual)


def _activation(node: fx.Node, source: fx.Node, modules: dict) -> tuple[str, float] | None:
    """(name, negative_slope) if ``node`` applies a supported activation to ``source``
    and nothing else (constant arguments only), else None."""
    if node.op == "call_module":
        found = activation_of(modules[node.target])
        return found if node.args == (source,) and not node.kwargs else None
    if node.op == "call_method":
        return ("relu", NEGATIVE_SLOPE) if node.target in ("relu", "relu_") and node.args == (source,) \
            and not node.kwargs else None
    if node.op != "call_function" or activation_of(node.target) is None:
        return None
    names = _ACTIVATION_PARAMETERS[node.target]
    if len(node.args) > len(names) or set(node.kwargs) - set(names[len(node.args):]):
        return None
    bound = {**dict(zip(names[:len(node.args)], node.args, strict=True)), **node.kwargs}
    if bound.get("input") is not source or any(isinstance(v, fx.Node) for k, v in bound.items() if k != "input"):
        return None
    name = activation_of(node.target)[0]
    if name == "gelu":
        name = {"none": "gelu", "tanh": "gelu_tanh"}.get(bound.get("approximate", "none"))
    slope = bound.get("negative_slope", NEGATIVE_SLOPE)
    return None if name not in ACTIVATIONS or not is_number(slope) else (name, float(slope))


def _residual(node: fx.Node, source: fx.Node) -> fx.Node | None:
    """The other operand if ``node`` is source + other (either order; an in-place add
    only with source first, the tensor it writes), else None."""
    in_place = (node.op == "call_function" and node.target in _IN_PLACE_ADDS) or (
        node.op == "call_method" and node.target == "add_")
    plain = (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method" and node.target == "add")
    if not (in_place or plain) or len(node.args) != 2 or set(node.kwargs) - {"alpha"} \
            or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args
    other = b if a is source else a if b is source and not in_place else None
    return other if isinstance(other, fx.Node) and other is not source else None


# --- equinorm -----------------------------------------------------------------------


# The modules the EquiNorm conversion's trace keeps whole.
_LEAVES = (*_CONVERTIBLE, *_WEIGHT_DIMS, _LpBatchNorm, _EquiNorm)


def _equinorm_model(model: nn.Module, *, single_pass: bool = True, stats_fraction: float = 1.0,
                    backend: str = "auto") -> fx.GraphModule:
    """Trace ``model``, fuse every conv / linear + BatchNorm pair it can into EquiNorm and
    warn once about the BatchNorms it leaves alone; raise if it fuses none."""
    if not isinstance(single_pass, bool):
        raise TypeError(f"single_pass must be a bool, got {single_pass!r}")
    F._check_stats_fraction(stats_fraction)
    options = {"single_pass": single_pass, "stats_fraction": stats_fraction, "backend": backend}
    graph_module = _trace(model)
    modules = dict(graph_module.named_modules())
    pairs, left_alone = [], []
    for bn_node in graph_module.graph.nodes:
        if bn_node.op != "call_module" or not isinstance(modules[bn_node.target], _CONVERTIBLE):
            continue
        try:
            pairs.append((bn_node, _equinorm_layer(graph_module, bn_node, modules, options)))
        except _LeftAlone as reason:
            left_alone.append(f"{_describe(bn_node, modules)}: {reason}")
    report = "".join(f"\n  {line}" for line in left_alone)
    if not left_alone and not pairs:
        raise ValueError(f"model: found no {_BN_NAMES} to convert to 'equinorm'")
    if not pairs:
        raise ValueError(
            "model: found no nn.Conv1d/2d/3d or nn.Linear followed by a BatchNorm to convert to 'equinorm'; every "
            f"BatchNorm is left alone:{report}"
        )
    for bn_node, layer in pairs:
        _fuse(graph_module, bn_node, layer)
    graph_module.delete_all_unused_submodules()
    graph_module.graph.lint()
    graph_module.recompile()
    if left_alone:
        warnings.warn(
            f"tritonorm.convert(model, 'equinorm') left {len(left_alone)} BatchNorm layer(s) alone:{report}",
            UserWarning, stacklevel=3,
        )
    return graph_module


def _trace(model: nn.Module, alternative: str = "", verb: str = "convert") -> fx.GraphModule:
    """``model`` as a GraphModule over its own submodules, every module's training flag kept."""
    try:
        graph = Tracer(_LEAVES).trace(model)
    except Exception as err:  # fx raises many types; the message says what to do instead
        raise ValueError(
            f"model: torch.fx could not trace {type(model).__name__} ({type(err).__name__}: {err}); {verb} its "
            f"traceable submodules one by one instead{' ' + alternative if alternative else ''}"
        ) from err
    graph_module = fx.GraphModule(model, graph, type(model).__name__)
    for name, module in graph_module.named_modules():  # fx's new containers start in training mode
        module.training = model.get_submodule(name).training
    return graph_module


class _LeftAlone(Exception):
    """Why a BatchNorm is not converted to EquiNorm."""


def _equinorm_layer(graph_module: fx.GraphModule, bn_node: fx.Node, modules: dict, options: dict) -> nn.Module:
    """The EquiNorm layer that replaces ``bn_node`` and the layer feeding it; raises
    _LeftAlone with the reason where there is none."""
    bn = modules[bn_node.target]
    changes = _changes_function(bn)
    if changes is not None:
        raise _LeftAlone(f"a BatchNorm subclass that {changes}: EquiNorm would drop what it adds")
    if isinstance(bn, nn.SyncBatchNorm):  # EquiNorm's input mass summed over the same group
        group = bn.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        if group is None:
            raise _LeftAlone("an nn.SyncBatchNorm over the default process group, which does not exist before "
                             "torch.distributed.init_process_group: convert after it (EquiNorm takes the group itself)")
        options = {**options, "process_group": group}
        candidates = [pair for pairs in _EQUINORM_PAIRS.values() for pair in pairs]
    else:
        candidates = next(pairs for cls, pairs in _EQUINORM_PAIRS.items() if isinstance(bn, cls))
    src = bn_node.all_input_nodes[0]
    layer = modules.get(src.target) if src.op == "call_module" else None
    equinorm_class = next((eq for cls, eq in candidates if isinstance(layer, cls)), None)
    if equinorm_class is None:
        expected = " or ".join(f"nn.{cls.__name__}" for cls, _ in candidates)
        raise _LeftAlone(f"its input is {_describe(src, modules)}, not the output of an {expected}")
    others = [u for u in src.users if u is not bn_node]
    if others:
        raise _LeftAlone(f"{_describe(src, modules)} also feeds {', '.join(_describe(u, modules) for u in others)}")
    for node in (src, bn_node):
        calls = sum(n.op == "call_module" and n.target == node.target for n in graph_module.graph.nodes)
        if calls > 1:
            raise _LeftAlone(f"{_describe(node, modules)} is called {calls} times (shared weights)")
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out != bn.num_features:
        raise _LeftAlone(f"{_describe(src, modules)} has {out} output channels, the BatchNorm {bn.num_features}")
    if not bn.track_running_stats:
        raise _LeftAlone("track_running_stats=False: EquiNorm's eval mode always uses its running input mean")
    try:
        return _equinorm_from(layer, bn, equinorm_class, options)
    except ValueError as err:
        raise _LeftAlone(f"EquiNorm refuses {_describe(src, modules)}: {err}") from None


def _describe(node: fx.Node, modules: dict) -> str:
    return f"the model input `{node.name}`" if node.op == "placeholder" else describe(node, modules)


@torch.no_grad()
def _equinorm_from(layer: nn.Module, bn: nn.Module, equinorm_class: type, options: dict) -> nn.Module:
    """EquiNorm with ``layer``'s geometry and weight and ``bn``'s affine and momentum."""
    factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    common = {"affine": bn.affine, "momentum": bn.momentum, **options, **factory}
    if isinstance(layer, nn.Linear):
        new = equinorm_class(layer.in_features, layer.out_features, **common)
    else:
        new = equinorm_class(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
            layer.groups, padding_mode=layer.padding_mode, **common,
        )
    new.weight.copy_(layer.weight)
    if bn.affine:
        new.gain.copy_(bn.weight)
        new.bias.copy_(bn.bias)
    return new.train(bn.training)


def _fuse(graph_module: fx.GraphModule, bn_node: fx.Node, layer: nn.Module) -> None:
    """Put ``layer`` in place of the module feeding ``bn_node`` and drop the BatchNorm."""
    src = bn_node.all_input_nodes[0]
    parent, _, child = src.target.rpartition(".")
    setattr(graph_module.get_submodule(parent), child, layer)
    bn_node.replace_all_uses_with(src)
    graph_module.graph.erase_node(bn_node)


# --- bounded_wn ---------------------------------------------------------------------


def _bounded_wn(model: nn.Module, *, rho: float | None = None, learnable_gain: bool = False,
                mean_only: bool = False, backend: str = "auto") -> nn.Module:
    """``bounded_weight_norm`` on every Linear / Conv / ConvTranspose weight, in place, and
    with ``mean_only`` every BatchNorm swapped for its MeanOnlyBatchNorm; an error names the
    layer."""
    check_bool("mean_only", mean_only)
    found = False
    for name, module in list(model.named_modules()):
        dim = next((d for cls, d in _WEIGHT_DIMS.items() if isinstance(module, cls)), None)
        if dim is None:
            continue
        found = True
        try:
            bounded_weight_norm(module, rho=rho, learnable_gain=learnable_gain, dim=dim, backend=backend)
        except (TypeError, ValueError) as err:
            raise type(err)(f"model.{name or '<root>'}: {err}") from None
    if not found:
        raise ValueError(
            "model: found no nn.Linear, nn.Conv1d/2d/3d or nn.ConvTranspose1d/2d/3d to convert to 'bounded_wn'"
        )
    if mean_only:
        model = _swap_mean_only(model, backend)
    return model


_MEAN_ONLY_CLASSES = (MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d, MeanOnlyBatchNorm3d)


def _swap_mean_only(model: nn.Module, backend: str) -> nn.Module:
    """Every nn.BatchNorm1d/2d/3d replaced, in place, by the MeanOnlyBatchNorm of its
    dimension (one shared layer for a shared BatchNorm)."""
    replaced: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        where = f"model.{name or '<root>'} ({type(module).__name__})"
        if isinstance(module, nn.SyncBatchNorm):
            raise ValueError(f"{where}: mean_only=True has no synchronized mean-only layer; convert it by hand")
        if not isinstance(module, BATCHNORMS):
            continue
        if id(module) not in replaced:
            changes = _changes_function(module)
            if changes is not None:
                raise ValueError(f"{where}: a BatchNorm subclass that {changes}: a MeanOnlyBatchNorm in its place "
                                 "would not compute what it does; convert it by hand")
            replaced[id(module)] = _mean_only_layer(module, backend)
        if not name:
            return replaced[id(module)]
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, replaced[id(module)])
    if not replaced:
        raise ValueError(f"model: mean_only=True found no {_BN_NAMES} to convert to MeanOnlyBatchNorm")
    return model


@torch.no_grad()
def _mean_only_layer(bn: nn.Module, backend: str) -> nn.Module:
    tensors = [t for t in (bn.bias, bn.running_mean) if t is not None]
    factory = {"device": tensors[0].device, "dtype": tensors[0].dtype} if tensors else {}
    dim = next(d for d, cls in enumerate(BATCHNORMS) if isinstance(bn, cls))
    layer = _MEAN_ONLY_CLASSES[dim](bn.num_features, bn.momentum, bn.affine, bn.track_running_stats,
                                    backend=backend, **factory)
    if bn.affine:
        layer.bias.copy_(bn.bias)
    if layer.track_running_stats and bn.running_mean is not None:
        layer.running_mean.copy_(bn.running_mean)
        layer.num_batches_tracked.copy_(bn.num_batches_tracked)
    layer.train(bn.training)
    return layer


_CONVERTERS = {"l1": _l1, "linf": _linf, "topk": _topk, "equinorm": _equinorm_model, "bounded_wn": _bounded_wn}
