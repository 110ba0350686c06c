"""Find the chain of weights ENorm can balance in a model, with torch.fx.

The model must be one path from its input to its output.  Between the first and the last
weight layer every node must commute with a positive per-channel scale (f(d x) = d f(x)
for d > 0), so that scaling a hidden unit's row by d and its column by 1/d keeps the
function; before the first and after the last weight anything goes (ENorm never scales
the first layer's columns nor the last layer's rows).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .nn.equinorm import _EquiNorm
from .nn.lp_batchnorm import _LpBatchNorm

# The weight layers ENorm balances: a chain is a path through them.
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Maps with f(d x) = d f(x) for every d > 0, per channel.
HOMOGENEOUS_MODULES = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
HOMOGENEOUS_FUNCTIONS = {
    F.relu, torch.relu, F.leaky_relu, F.dropout, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d,
    F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, torch.flatten,
}
HOMOGENEOUS_METHODS = {"relu", "relu_", "flatten", "view", "reshape", "contiguous"}
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# What allow_batchnorm lets sit between two weights: torch's batch norms and tritonorm's.
BATCH_NORMS_ANY = (*BATCHNORMS, _LpBatchNorm)
# Nodes that read only a tensor's metadata (x.size(0) in x.view(x.size(0), -1)).
METADATA_METHODS = {"size", "dim"}


def _is_metadata(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in METADATA_METHODS) or (
        node.op == "call_function" and node.target is getattr
    ) or (node.op == "call_function" and node.target is operator.getitem and _is_metadata(node.args[0]))


class Tracer(fx.Tracer):
    """fx's tracer that keeps ``leaves`` (and torch.nn's layers) whole, subclasses defined
    outside torch.nn included: tritonorm's layers trace as one call each, but a search for
    layers needs them as modules."""

    def __init__(self, leaves: tuple[type, ...]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, module_qualified_name)


def describe(node: fx.Node, modules: dict) -> str:
    """A node as an error message names it: "`target` (ModuleClass)" for a module call,
    "`name` (function or method)" for a call, "`name`" otherwise."""
    if node.op == "call_module":
        return f"`{node.target}` ({type(modules[node.target]).__name__})"
    if node.op in ("call_function", "call_method"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        return f"`{node.name}` ({name})"
    return f"`{node.name}`"


def _flatten_keeps_batch(node: fx.Node) -> bool:
    """A reshape that keeps dim 0 and merges the rest, channel-major (x.flatten(1),
    x.view(x.size(0), -1))."""
    args = list(node.args[1:])
    if node.target in (torch.flatten, "flatten"):
        start = node.kwargs.get("start_dim", args[0] if args else 0)
        end = node.kwargs.get("end_dim", args[1] if len(args) > 1 else -1)
        return start == 1 and end == -1
    shape = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
    return len(shape) == 2 and shape[1] == -1


def _trace(model: nn.Module) -> tuple[fx.Graph, dict[str, nn.Module], fx.Node]:
    """``model``'s fx graph (layers and norms kept as leaves), its modules by name and its
    one input node; TypeError / ValueError for what ENorm.from_model cannot read."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    try:
        graph = Tracer((*LAYER_TYPES, *BATCH_NORMS_ANY, _EquiNorm)).trace(model)
    except Exception as err:  # fx raises many types; the message says what to do instead
        raise ValueError(
            f"model: torch.fx could not trace {type(model).__name__} ({type(err).__name__}: {err}); "
            "pass the chain's layers to ENorm(layers) instead"
        ) from err
    modules = dict(model.named_modules())
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise ValueError(
            f"model: ENorm.from_model needs a model with one input, {type(model).__name__} has {len(inputs)}"
        )
    return graph, modules, inputs[0]


def find_chain(model: nn.Module, *, allow_batchnorm: bool = False) -> list[nn.Module]:
    """The Linear / Conv modules of ``model``'s single path, checked (module docstring)."""
    graph, modules, start = _trace(model)

    path, node = [], start
    while node.op != "output":
        users = [u for u in node.users if not _is_metadata(u)]
        if len(users) != 1:
            names = ", ".join(describe(u, modules) for u in users) or "nothing"
            raise ValueError(
                f"model: {describe(node, modules)} feeds {names}: ENorm.from_model needs a single path, without "
                "branches or residual connections (a skip path bypasses the rescaled weights)"
            )
        prev, node = node, users[0]
        others = [a for a in node.all_input_nodes if a is not prev and not _is_metadata(a) and a.op != "get_attr"]
        if others:
            raise ValueError(
                f"model: {describe(node, modules)} also reads {', '.join(describe(a, modules) for a in others)}: "
                "ENorm.from_model needs a single path, without residual adds or merges"
            )
        if node.op != "output":
            path.append(node)

    weights = [i for i, n in enumerate(path) if n.op == "call_module" and isinstance(modules[n.target], LAYER_TYPES)]
    if len(weights) < 2:
        raise ValueError(
            f"model: found {len(weights)} Linear/Conv layer(s) on the path; ENorm needs a chain of at least 2"
        )
    for w0, w1 in zip(weights[:-1], weights[1:], strict=True):
        _check_between(path[w0], path[w1], path[w0 + 1: w1], modules, allow_batchnorm)
    layers = [modules[path[i].target] for i in weights]
    for k, layer in enumerate(layers):
        if any(layer is other for other in layers[:k]):
            raise ValueError(f"model: {describe(path[weights[k]], modules)} is called twice (shared weights)")
    return layers


def _check_between(first: fx.Node, second: fx.Node, nodes: list[fx.Node], modules: dict, allow_batchnorm: bool):
    """The maps between two consecutive weight layers keep the function under ENorm: each
    commutes with a positive per-unit scale, and a flatten sits exactly where the layers'
    (O, I, K) views assume one (one, channel-major, from a convolution to a Linear)."""
    between = f"between {describe(first, modules)} and {describe(second, modules)}"
    flattens = []
    for node in nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, _EquiNorm):
            raise ValueError(
                f"model: EquiNorm layer {describe(node, modules)} sits {between}: it renormalizes its weight from "
                "its input, so a rescaled input changes what it computes; ENorm cannot balance across it"
            )
        if isinstance(module, BATCH_NORMS_ANY):
            if allow_batchnorm:
                continue
            raise ValueError(
                f"model: BatchNorm {describe(node, modules)} sits {between}: ENorm then changes what the network "
                "computes; pass allow_batchnorm=True to balance this chain anyway (the paper's ENorm + BN)"
            )
        homogeneous = (
            isinstance(module, HOMOGENEOUS_MODULES)
            or (node.op == "call_function" and node.target in HOMOGENEOUS_FUNCTIONS)
            or (node.op == "call_method" and node.target in HOMOGENEOUS_METHODS)
        )
        if isinstance(module, nn.Flatten):
            flattens.append(node)
            flat_ok = module.start_dim == 1 and module.end_dim == -1
        elif node.target in ("view", "reshape", "flatten", torch.flatten):
            flattens.append(node)
            flat_ok = _flatten_keeps_batch(node)
        else:
            flat_ok = True
        if not (homogeneous and flat_ok):
            raise ValueError(
                f"model: {describe(node, modules)} {between} is not a positively homogeneous map ENorm knows "
                "(ReLU, LeakyReLU, PReLU, max/avg pooling, dropout, flatten to (N, -1)); rescaling across it would "
                "change the network's function"
            )
    conv_to_linear = not isinstance(modules[first.target], nn.Linear) and isinstance(modules[second.target], nn.Linear)
    if len(flattens) != int(conv_to_linear):
        need = "exactly one flatten to (N, -1)" if conv_to_linear else "no flatten or reshape"
        found = ", ".join(describe(n, modules) for n in flattens) or "none"
        raise ValueError(
            f"model: ENorm needs {need} {between} (found: {found}), so that each hidden unit feeds the inputs "
            "its (O, I, K) view assumes"
        )


def find_chains(model: nn.Module, *, allow_batchnorm: bool = False) -> tuple[list[nn.Module], list[list[nn.Module]]]:
    """The chains of ``model``'s pairs, for a model that may branch and merge (residual
    networks): ``(layers, branches)``.

    A weight layer W and the next one W' form a pair when W's output reaches W' alone, along
    a single path (each node one user, reading nothing else but metadata), checked as in a
    single chain; scaling W's rows and W''s columns then keeps W''s output, whatever the
    rest of the graph does.  A layer whose output (or a map of it) meets a skip connection,
    a merge, a fork or the output is in no pair as the first layer: its output scale is
    kept.  Pairs sharing a layer join into chains; ``layers`` is the chain whose last layer
    reaches the model's output along a single path (empty if none), ``branches`` the others
    (whose last layer's output meets a skip connection, a merge or a fork), in graph order."""
    graph, modules, _ = _trace(model)
    weights = [n for n in graph.nodes if n.op == "call_module" and isinstance(modules[n.target], LAYER_TYPES)]
    following: dict[fx.Node, fx.Node] = {}
    to_output = set()  # the layers whose output reaches the model's output along a single path
    for first in weights:
        node, between = first, []
        while True:
            users = [u for u in node.users if not _is_metadata(u)]
            if len(users) != 1:
                break  # a fork (the identity path of a residual block), or unused
            user = users[0]
            others = [a for a in user.all_input_nodes if a is not node and not _is_metadata(a) and a.op != "get_attr"]
            if others:
                break  # a merge (a residual add)
            if user.op == "output":
                to_output.add(first)
                break
            if user in weights:
                _check_between(first, user, between, modules, allow_batchnorm)
                following[first] = user
                break
            between.append(user)
            node = user
    starts = [w for w in weights if w in following and w not in following.values()]
    if not starts:
        raise ValueError(
            f"model: found no pair of Linear/Conv layers in {type(model).__name__} joined by a single path "
            "(a layer whose output meets a skip connection, a merge or a fork is left alone); ENorm has nothing "
            "to balance"
        )
    chains = []
    for start in starts:
        chain = [start]
        while chain[-1] in following:
            chain.append(following[chain[-1]])
        chains.append(chain)
    for chain in chains:
        for node in chain:
            if sum(w.target == node.target for w in weights) > 1:
                raise ValueError(f"model: {describe(node, modules)} is called twice (shared weights)")
    main = [c for c in chains if c[-1] in to_output]
    branches = [c for c in chains if c[-1] not in to_output]
    return ([modules[n.target] for n in main[0]] if main else [],
            [[modules[n.target] for n in chain] for chain in branches])
