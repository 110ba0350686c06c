"""``tritonorm.fold``: an inference copy of a model with no tritonorm module left, for
deployment (``torch.export``, AOTInductor, ONNX) without tritonorm's ops.

In eval mode each layer is a fixed affine map of its input, which plain torch layers
compute:

- an L1 / L-inf / Top-k BatchNorm computes, per channel c,

      y = act(s_c x + t_c + residual),  s_c = gamma_c / (running_dev_c + eps),
                                         t_c = beta_c - running_mean_c s_c

  (gamma = 1 and beta = 0 without affine).  When its input is the output of an
  nn.Conv1d/2d/3d (or an nn.Linear, below) that feeds nothing else and is called once,
  s and t are absorbed into that layer: W'[c] = s_c W[c], b'_c = s_c b_c + t_c.
  Otherwise it becomes the nn.BatchNorm of its dimension with eps = 0, running_var =
  (running_dev + eps)^2 and the same running_mean, weight and bias: the same map.  A fused
  residual add and activation become an add and the ``torch.nn.functional`` activation.
- an EquiNorm layer becomes the nn.Conv*d / nn.Linear of its ``fold()``;
- a MeanOnlyBatchNorm (x - running_mean + beta in eval) becomes the nn.BatchNorm of its
  dimension with running_var 1, eps 0 and weight 1;
- a bounded-weight-norm weight (and every parametrization stacked with it) is baked into a
  plain parameter, and BoundedWNLinear / BoundedWNConv2d become nn.Linear / nn.Conv2d.
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from .convert import _trace
from .nn.bounded_weight_norm import BoundedWeightNorm, BoundedWNConv2d, BoundedWNLinear
from .nn.equinorm import _EquiNorm
from .nn.lp_batchnorm import _LpBatchNorm
from .nn.mean_only_batchnorm import _MeanOnlyBatchNorm
from .reference.activation import functional_form
from .sync_batchnorm import copy_model

__all__ = ["fold"]

# The convolution and the BatchNorm of each Lp layer's input rank.
_CONVS = {(2, 3): nn.Conv1d, (4,): nn.Conv2d, (5,): nn.Conv3d}
_BATCHNORMS = {(2, 3): nn.BatchNorm1d, (4,): nn.BatchNorm2d, (5,): nn.BatchNorm3d}


def fold(model: nn.Module, example_inputs: tuple | None = None) -> nn.Module:
    """An inference copy of ``model`` in eval mode in which no tritonorm module is left
    (module docstring: what each layer becomes); ``model`` itself is left as it is.

    Args:
        model: any nn.Module.  If it holds L1 / L-inf / Top-k BatchNorms it must be
            traceable by torch.fx (tritonorm's layers trace as single calls), and the
            result is a ``torch.fx.GraphModule`` running its traced forward (a model that
            is one such layer gives a traced nn.Sequential of it); otherwise the result is
            a copy of its own type with modules replaced.  A forward that calls
            ``tritonorm.functional`` itself (not through a layer) is a ValueError where fx
            traces it.
        example_inputs: optional positional inputs of one forward call.  The copy runs
            them once in eval mode (running statistics untouched) to learn each layer's
            input shape: an EquiNorm convolution whose eval weight depends on its input
            size gets it, and an nn.Linear absorbs the Lp BatchNorm1d after it only when
            the shapes show (N, C) input (a BatchNorm1d over (N, C, L) normalizes another
            dim than the Linear's features, so without the shapes it becomes an
            nn.BatchNorm1d instead); a synchronized Lp layer (any input dimensions) not
            absorbed becomes the nn.BatchNorm of its input's dimensions, or without the
            shapes an nn.SyncBatchNorm (in eval, F.batch_norm: no communication).

    Eval outputs equal the model's in eval mode to rounding (the folded weights are
    computed in float64).  Errors (ValueError, naming the module): an Lp BatchNorm without
    running statistics (track_running_stats=False: its eval output depends on the batch),
    an EquiNorm layer that needs an input size ``example_inputs`` did not give, a model
    fx cannot trace.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), tritonorm.L1BatchNorm2d(8, activation="relu"))
        >>> deployable = tritonorm.fold(model)        # Conv2d (the BatchNorm absorbed), relu
        >>> program = torch.export.export(deployable, (torch.randn(1, 3, 8, 8),))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tuple of the model's positional inputs, got "
                        f"{type(example_inputs).__name__}")
    folded = copy_model(model).eval()
    shapes = _input_shapes(folded, example_inputs) if example_inputs is not None else {}
    folded = _replace_modules(folded, _bake_bounded_weight)
    folded = _replace_modules(folded, _mean_only_batchnorm)
    folded = _replace_modules(folded, lambda name, module: _fold_equinorm(name, module, shapes))
    if isinstance(folded, _LpBatchNorm):  # traced as a call of its forward, not as a module call
        folded = nn.Sequential(folded)
    if any(isinstance(m, _LpBatchNorm) for m in folded.modules()):
        folded = _fold_lp_batchnorms(folded, shapes)
    left = [f"model.{name or '<root>'} ({type(m).__name__})" for name, m in folded.named_modules()
            if type(m).__module__.startswith(__package__)]
    assert not left, f"tritonorm.fold left {', '.join(left)}"  # every tritonorm module has a rule above
    return folded


def _input_shapes(model: nn.Module, example_inputs: tuple) -> dict[int, torch.Size | None]:
    """The shape of the first input of each module over one eval forward, by module id
    (None for a module called with several shapes)."""
    shapes: dict[int, torch.Size | None] = {}

    def record(module, args):
        if args and isinstance(args[0], torch.Tensor):
            shape = args[0].shape
            shapes[id(module)] = shape if shapes.get(id(module), shape) == shape else None

    handles = [m.register_forward_pre_hook(record) for m in model.modules()]
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _replace_modules(model: nn.Module, make) -> nn.Module:
    """``model`` with each module m for which ``make(name, m)`` is not None replaced by
    that (every path to a shared module by one replacement); the root may be replaced."""
    replaced: dict[int, nn.Module | None] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) not in replaced:
            replaced[id(module)] = make(name, module)
        new = replaced[id(module)]
        if new is None:
            continue
        if not name:
            return new
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


@torch.no_grad()
def _mean_only_batchnorm(name: str, module: nn.Module) -> nn.Module | None:
    """A MeanOnlyBatchNorm computes x - running_mean + beta in eval: the nn.BatchNorm of its
    dimension with running_var 1, eps 0 and weight 1 computes the same; None for any other
    module."""
    if not isinstance(module, _MeanOnlyBatchNorm):
        return None
    if not module.track_running_stats:
        raise ValueError(f"model.{name or '<root>'} ({type(module).__name__}): track_running_stats=False subtracts "
                         "each batch's mean in eval too, so no fixed layer computes it")
    factory = {"device": module.running_mean.device, "dtype": module.running_mean.dtype}
    bn = _BATCHNORMS[module._ndims](module.num_features, eps=0.0, affine=module.affine, **factory)
    bn.running_mean.copy_(module.running_mean)
    bn.running_var.fill_(1)
    bn.num_batches_tracked.copy_(module.num_batches_tracked)
    if module.affine:
        bn.weight.fill_(1)
        bn.bias.copy_(module.bias)
    return bn.eval()


def _bake_bounded_weight(name: str, module: nn.Module) -> nn.Module | None:
    """Bake, in place, every parametrized tensor of ``module`` that has a bounded weight
    norm; the plain nn layer for BoundedWNLinear / BoundedWNConv2d; None when nothing is
    left to replace."""
    ours = [tensor for tensor, chain in getattr(module, "parametrizations", {}).items()
            if any(isinstance(p, BoundedWeightNorm) for p in chain)]
    if ours:
        # A deep copy shares the original's generated Parametrized<...> class, from which
        # removing a parametrization deletes the property: give the copy a class of its own.
        cls = type(module)
        module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
        for tensor in ours:
            parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
    if not isinstance(module, (BoundedWNLinear, BoundedWNConv2d)) or parametrize.is_parametrized(module):
        return None  # a layer with other parametrizations stays what it is, as torch would leave it
    factory = {"device": module.weight.device, "dtype": module.weight.dtype}
    if isinstance(module, BoundedWNLinear):
        plain = nn.Linear(module.in_features, module.out_features, module.bias is not None, **factory)
    else:
        plain = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                          module.dilation, module.groups, module.bias is not None, module.padding_mode, **factory)
    plain.load_state_dict(module.state_dict())
    return plain.train(module.training)


def _fold_equinorm(name: str, module: nn.Module, shapes: dict) -> nn.Module | None:
    if not isinstance(module, _EquiNorm):
        return None
    shape = shapes.get(id(module))
    spatial = getattr(module, "_nd", 0)
    try:
        return module.fold(tuple(shape[-spatial:]) if shape is not None and spatial else None).eval()
    except ValueError as err:
        raise ValueError(f"model.{name or '<root>'} ({type(module).__name__}): {err}; or pass example_inputs to "
                         "tritonorm.fold, which finds it") from None


def _fold_lp_batchnorms(model: nn.Module, shapes: dict) -> fx.GraphModule:
    """The traced ``model`` with each Lp BatchNorm call absorbed into the layer feeding it
    or replaced by its nn.BatchNorm, its residual add and activation made explicit."""
    graph_module = _trace(model, "(tritonorm.fold needs the graph to find the layer feeding each BatchNorm)", "fold")
    graph = graph_module.graph
    modules = dict(graph_module.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    batchnorms: dict[str, nn.Module] = {}
    for node in list(graph.nodes):
        layer = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(layer, _LpBatchNorm):
            continue
        if not layer.track_running_stats:
            raise ValueError(
                f"model.{node.target} ({type(layer).__name__}): track_running_stats=False normalizes by each "
                "batch's statistics in eval too, so no fixed layer computes it"
            )
        # forward(input, residual=None): the arguments by name or position
        arguments = {**dict(zip(("input", "residual"), node.args, strict=False)), **node.kwargs}
        x, residual = arguments["input"], arguments.get("residual")
        scale, shift = _eval_affine(layer)
        absorbed = _absorbs(x, node, layer, modules, calls, shapes)
        if absorbed:
            _absorb(modules[x.target], scale, shift)
        elif node.target not in batchnorms:
            batchnorms[node.target] = _batchnorm(layer, shapes.get(id(layer)))
            parent, _, child = node.target.rpartition(".")
            setattr(graph_module.get_submodule(parent), child, batchnorms[node.target])
        node.args, node.kwargs = (x,), {}
        out, created = (x if absorbed else node), set()
        steps = [(operator.add, (residual,), {})] if residual is not None else []
        if layer.activation is not None:
            function, function_kwargs = functional_form(layer.activation, layer.negative_slope)
            steps.append((function, (), function_kwargs))
        anchor = node  # after the residual's node too, which may follow x's
        for function, args, function_kwargs in steps:
            with graph.inserting_after(anchor):
                out = anchor = graph.call_function(function, (out, *args), function_kwargs)
            created.add(out)
        if out is not node:
            node.replace_all_uses_with(out, delete_user_cb=lambda user, new=created: user not in new)
        if absorbed:
            graph.erase_node(node)
    calls_left = [n for n in graph.nodes if n.op == "call_function"
                  and getattr(n.target, "__module__", "").startswith(__package__)]
    if calls_left:
        raise ValueError(
            f"model: its forward calls {', '.join(f'{n.target.__name__} (`{n.name}`)' for n in calls_left)}; "
            "tritonorm.fold folds tritonorm's modules, not calls of tritonorm.functional: use the layers"
        )
    graph_module.delete_all_unused_submodules()
    graph.lint()
    graph_module.recompile()
    return graph_module


@torch.no_grad()
def _eval_affine(layer: _LpBatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) in float64: the layer's eval output is s x + t per channel."""
    scale = 1 / (layer.running_dev.double() + layer.eps)
    if layer.affine:
        scale = scale * layer.weight.double()
    shift = -layer.running_mean.double() * scale
    return scale, shift + layer.bias.double() if layer.affine else shift


def _absorbs(x: fx.Node, node: fx.Node, layer: _LpBatchNorm, modules: dict, calls: Counter, shapes: dict) -> bool:
    """Whether the Lp call ``node`` can be absorbed into the layer whose output ``x`` is."""
    source = modules.get(x.target) if x.op == "call_module" else None
    if source is None or calls[node.target] != 1 or calls[x.target] != 1 or len(x.users) != 1:
        return False
    shape = shapes.get(id(layer))
    if type(source) in (_CONVS[dims] for dims in _CONVS if set(dims) & set(_input_dims(layer, shape))):
        return source.out_channels == layer.num_features
    return type(source) is nn.Linear and source.out_features == layer.num_features and shape is not None \
        and len(shape) == 2


@torch.no_grad()
def _absorb(source: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """W[c] *= s_c and b_c = s_c b_c + t_c, in float64, in ``source``'s dtype."""
    weight = source.weight
    view = (-1,) + (1,) * (weight.dim() - 1)
    weight.copy_(weight.double() * scale.to(weight.device).view(view))
    bias = shift.to(weight.device) if source.bias is None else source.bias.double() * scale + shift
    source.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=weight.requires_grad)


def _input_dims(layer: _LpBatchNorm, shape: torch.Size | None) -> tuple[int, ...]:
    """The dimensions of the layer's input: its class's; a synchronized layer's (any of 2
    to 5) narrowed to its input's where the example inputs show it."""
    if layer._synchronized and shape is not None:
        return next(dims for dims in _BATCHNORMS if len(shape) in dims)
    return layer._ndims


@torch.no_grad()
def _batchnorm(layer: _LpBatchNorm, shape: torch.Size | None) -> nn.Module:
    """The eval-mode nn.BatchNorm computing s x + t: eps 0, running_var (running_dev + eps)^2;
    for a synchronized layer of unknown input dimensions, nn.SyncBatchNorm, which takes any
    (and in eval is F.batch_norm: no communication)."""
    factory = {"device": layer.running_mean.device, "dtype": layer.running_mean.dtype}
    batchnorm = _BATCHNORMS.get(_input_dims(layer, shape), nn.SyncBatchNorm)
    bn = batchnorm(layer.num_features, eps=0.0, affine=layer.affine, **factory)
    bn.running_mean.copy_(layer.running_mean)
    bn.running_var.copy_((layer.running_dev.double() + layer.eps).square())
    bn.num_batches_tracked.copy_(layer.num_batches_tracked)
    if layer.affine:
        bn.weight.copy_(layer.weight)
        bn.bias.copy_(layer.bias)
    return bn.eval()
