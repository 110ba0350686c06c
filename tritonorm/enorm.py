"""ENorm: the equi-normalization cycle ("Equi-normalization of neural networks", Stock et
al. 2019), an optimizer companion.

    optimizer.step()
    enorm.step()        # rescale the chain's weights, biases and optimizer state in place

or, once, ``enorm.attach()``: the cycle then follows every step the optimizer really takes.

The math is in ``tritonorm.reference.enorm``; the Triton cycle in ``tritonorm.kernels.enorm``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._chain import LAYER_TYPES, find_chain, find_chains
from ._checks import check_bool, check_choice, check_eps, check_int, check_number
from ._dispatch import check_backend, resolve_backend
from .reference import enorm as _ref

MODES = ("parallel", "sequential")

# How each optimizer's per-parameter state moves when a parameter entry is multiplied by
# d: the power of d (reference.enorm).  Tensors that accumulate the gradient scale like it
# (1/d), those that accumulate its square or magnitude like that, and RMSprop's momentum,
# which accumulates grad / sqrt(square average), does not move.
OPTIMIZER_STATE = {
    torch.optim.SGD: {"momentum_buffer": -1},
    torch.optim.Adam: {"exp_avg": -1, "exp_avg_sq": -2, "max_exp_avg_sq": -2},
    torch.optim.AdamW: {"exp_avg": -1, "exp_avg_sq": -2, "max_exp_avg_sq": -2},
    torch.optim.NAdam: {"exp_avg": -1, "exp_avg_sq": -2},
    torch.optim.RAdam: {"exp_avg": -1, "exp_avg_sq": -2},
    torch.optim.Adamax: {"exp_avg": -1, "exp_inf": -1},
    torch.optim.Adagrad: {"sum": -2},
    torch.optim.RMSprop: {"square_avg": -2, "grad_avg": -1, "momentum_buffer": 0},
}

_SETTINGS = ("c", "p", "mode", "balance_last", "scale_biases", "balance_biases", "eps", "backend")


def _state_powers(optimizer) -> dict[str, int] | None:
    if optimizer is None:
        return None
    for cls in type(optimizer).__mro__:
        if cls in OPTIMIZER_STATE:
            return OPTIMIZER_STATE[cls]
    names = ", ".join(cls.__name__ for cls in OPTIMIZER_STATE)
    raise TypeError(
        f"optimizer: ENorm does not know how the state of {type(optimizer).__name__} moves when weights are "
        f"rescaled; supported: {names} (or pass optimizer=None for an optimizer without per-parameter state)"
    )


def _check_optimizer_holds(optimizer, layers: list[nn.Module], *, scale_biases: bool, name: str = "layers") -> None:
    """Every parameter the cycle rescales (the layers' weights, their biases with
    ``scale_biases``) is in the optimizer's param_groups, or frozen (requires_grad=False: no
    state to keep in step); else a ValueError naming the first one missing."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for k, layer in enumerate(layers):
        for param_name in ("weight", "bias") if scale_biases else ("weight",):
            param = getattr(layer, param_name)
            if param is not None and param.requires_grad and id(param) not in held:
                raise ValueError(
                    f"optimizer: {name}[{k}].{param_name} is not among the optimizer's parameters, but the cycle "
                    "rescales it and would leave its optimizer state behind; pass the optimizer of the chain's "
                    "parameters (a frozen parameter, requires_grad=False, may be left out)"
                )


def _column_block(prev: nn.Module, layer: nn.Module, index: int, name: str = "layers") -> int:
    """K of the layer's (O, I, K) view: inputs per hidden unit of the previous layer."""
    hidden = prev.out_features if isinstance(prev, nn.Linear) else prev.out_channels
    if isinstance(layer, nn.Linear):
        if layer.in_features % hidden:
            raise ValueError(
                f"{name}[{index}]: Linear with in_features={layer.in_features} cannot follow a layer with "
                f"{hidden} outputs (in_features must be a multiple: one block of features per channel after a "
                "flatten)"
            )
        return layer.in_features // hidden
    if isinstance(prev, nn.Linear):
        raise ValueError(f"{name}[{index}]: a convolution after a Linear layer is not a chain ENorm balances")
    if layer.in_channels != hidden:
        raise ValueError(
            f"{name}[{index}]: {type(layer).__name__} with in_channels={layer.in_channels} cannot follow a layer "
            f"with {hidden} output channels"
        )
    return math.prod(layer.kernel_size)


def _check_layers(layers, name: str = "layers") -> tuple[list[nn.Module], list[tuple[int, int, int]]]:
    layers = list(layers)
    shapes = []
    for k, layer in enumerate(layers):
        if not isinstance(layer, LAYER_TYPES):
            raise TypeError(
                f"{name}[{k}]: expected nn.Linear or nn.Conv1d/2d/3d, got {type(layer).__name__}"
            )
        if not isinstance(layer, nn.Linear) and layer.groups != 1:
            raise ValueError(f"{name}[{k}]: grouped convolutions (groups={layer.groups}) are not supported")
        if any(layer is other for other in layers[:k]):
            raise ValueError(f"{name}[{k}]: the same module appears twice in the chain")
        w = layer.weight
        if not w.is_floating_point():
            raise TypeError(f"{name}[{k}].weight: expected a floating-point tensor, got {w.dtype}")
        if w.device != layers[0].weight.device:
            raise ValueError(f"{name}[{k}].weight is on {w.device}, {name}[0].weight on {layers[0].weight.device}")
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"{name}[{k}].weight has non-finite entries")
        block = _column_block(layers[k - 1], layer, k, name) if k else math.prod(w.shape[2:])
        shapes.append((w.shape[0], w[0].numel() // block, block))
    return layers, shapes


class ENorm:
    r"""The ENorm cycle ("Equi-normalization of neural networks", Stock et al. 2019) over a
    chain of Linear / Conv layers joined by ReLU-like maps: an optimizer companion that
    rebalances the weights after each step without changing what the network computes.

    For hidden unit j between consecutive weights W_q and W_{q+1}, one cycle computes

    .. math:: d_j = \sqrt{\max(\|W_{q+1}[:, j]\|_p, \epsilon) / (c \max(\|W_q[j, :]\|_p, \epsilon))}

    and multiplies row j of W_q (and its bias) by d_j and column j of W_{q+1} by 1/d_j: a
    ReLU network then computes the same function with a smaller sum_k c^(-p k) ||W_k||_p^p.
    Norms and coefficients are float64 on both paths.  A unit whose coefficient is not
    finite (not a finite number > 0: a NaN or inf in its row or column, an overflow) is left
    alone, d_j = 1, so a non-finite entry never spreads; step() does not check weights for
    non-finite values, which would cost a host sync on CUDA.

    Args:
        layers: the chain's nn.Linear / nn.Conv1d/2d/3d modules, input to output, joined by
            positively homogeneous maps (ReLU, LeakyReLU, max/avg pooling, flatten).  A Linear
            after a convolution of C channels reads a flatten: in_features = C * S, channel c
            feeding features c*S .. c*S+S-1.  ``ENorm.from_model`` finds and checks the chain.
        optimizer: the optimizer of these parameters, whose per-parameter state is rescaled
            with them (``OPTIMIZER_STATE`` lists the supported ones), or None.  It must hold
            every parameter the cycle rescales (each touched layer's weight, and its bias with
            scale_biases) unless the parameter is frozen (requires_grad=False): ValueError
            otherwise, at construction and when a setting changes the touched set.
        c: the depth penalty (a finite number > 0); c > 1 moves norm towards later layers
            (the paper: 1.2 for deep MLPs).
        p: the norm (> 0, ``math.inf`` allowed).
        mode: "parallel" (every coefficient from the weights at the start of the cycle, as
            the authors' code; two Triton launches) or "sequential" (the paper's algorithm:
            each pair sees the previous pair's result; one launch per pair).
        balance_last: also balance the last pair (the authors leave the last weight alone).
        scale_biases: scale each bias with its row, which keeps the function (the authors'
            code does not).
        balance_biases: count each bias in its row's norm (needs scale_biases).
        eps: norms below eps count as eps, so zero rows and columns stay finite (a finite
            number > 0).
        backend: "auto" (Triton for CUDA weights), "triton" or "torch".
        branches: further chains (each a sequence of at least 2 layers, disjoint from
            ``layers`` and each other) whose last layer's output meets a skip connection or a
            merge: every pair of a branch is balanced whatever ``balance_last`` says (its last
            layer's columns are scaled, its rows never), so a residual branch keeps its output.
            With branches, ``layers`` may be shorter than a pair (even empty).
            ``ENorm.from_model(model, residual=True)`` finds them.

    The settings are checked here and when assigned (``tritonorm._checks``): a bad number or
    choice is a ValueError (a bool is not a number), a flag that is not True or False (1, 0,
    None) a TypeError.

    Example::

        >>> model = nn.Sequential(nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 500), nn.ReLU(),
        ...                       nn.Linear(500, 10))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> enorm = tritonorm.ENorm.from_model(model, optimizer, c=1.2)
        >>> for x, y in loader:
        ...     optimizer.zero_grad()
        ...     nn.functional.cross_entropy(model(x), y).backward()
        ...     optimizer.step()
        ...     enorm.step()                  # or, once before the loop: enorm.attach()
    """

    # The settings (``_SETTINGS``): set by ``_configure``, checked again when assigned.
    c: float
    p: float
    mode: str
    balance_last: bool
    scale_biases: bool
    balance_biases: bool
    eps: float
    backend: str

    def __init__(self, layers, optimizer=None, *, c: float = 1.0, p: float = 2.0, mode: str = "parallel",
                 balance_last: bool = False, scale_biases: bool = True, balance_biases: bool = False,
                 eps: float = 1e-8, backend: str = "auto", branches=()):
        self.layers, self._shapes = _check_layers(layers)
        self.branches: list[list[nn.Module]] = []
        self._branch_shapes = []
        for i, branch in enumerate(branches):
            name = f"branches[{i}]"
            checked, shapes = _check_layers(branch, name)
            if len(checked) < 2:
                raise ValueError(f"{name}: a branch needs at least 2 layers (got {len(checked)}): there is no pair "
                                 "to balance")
            self.branches.append(checked)
            self._branch_shapes.append(shapes)
        everything = [layer for chain in (self.layers, *self.branches) for layer in chain]
        for k, layer in enumerate(everything):
            if any(layer is other for other in everything[:k]):
                raise ValueError("branches: a module appears in two chains (layers and branches must be disjoint)")
            if layer.weight.device != everything[0].weight.device:
                raise ValueError(f"branches: weights on {layer.weight.device} and {everything[0].weight.device}; "
                                 "every chain must be on one device")
        self.optimizer = optimizer
        self._powers = _state_powers(optimizer)
        self._optimizer_steps = 0  # the optimizer steps that attach's hook has counted
        self._attachment = None
        self._plans: list | None = None
        self._configure(dict(c=c, p=p, mode=mode, balance_last=balance_last, scale_biases=scale_biases,
                             balance_biases=balance_biases, eps=eps, backend=backend))

    def _configure(self, settings: dict) -> None:
        check_number("c", settings["c"], low=0, low_open=True)
        check_number("p", settings["p"], low=0, low_open=True, high_open=False)
        check_eps(settings["eps"])
        check_choice("mode", settings["mode"], MODES)
        check_backend(settings["backend"])
        for flag in ("balance_last", "scale_biases", "balance_biases"):
            check_bool(flag, settings[flag])
        if settings["balance_biases"] and not settings["scale_biases"]:
            raise ValueError("balance_biases=True needs scale_biases=True (a bias in the norm must be scaled)")
        needed = 2 if settings["balance_last"] else 3
        if not self.branches and len(self.layers) < needed:
            raise ValueError(
                f"layers: ENorm needs at least {needed} layers with balance_last={settings['balance_last']} "
                f"(got {len(self.layers)}): there is no pair to balance"
            )
        if self.optimizer is not None:
            for name, layers, _, pairs in self._chains(settings["balance_last"]):
                _check_optimizer_holds(self.optimizer, layers[: pairs + 1], scale_biases=settings["scale_biases"],
                                       name=name)
        # Through object.__setattr__: this class's __setattr__ sends a setting back here.
        assign = super().__setattr__
        assign("c", settings["c"])
        assign("p", settings["p"])
        assign("mode", settings["mode"])
        assign("balance_last", settings["balance_last"])
        assign("scale_biases", settings["scale_biases"])
        assign("balance_biases", settings["balance_biases"])
        assign("eps", settings["eps"])
        assign("backend", settings["backend"])
        self._cache_key = None

    def __setattr__(self, name, value):
        """A setting assigned directly is checked, and drops the cached views and tables."""
        if name in _SETTINGS:
            self._configure({**{n: getattr(self, n) for n in _SETTINGS}, name: value})
        else:
            super().__setattr__(name, value)

    @classmethod
    def from_model(cls, model: nn.Module, optimizer=None, *, allow_batchnorm: bool = False, residual: bool = False,
                   **kwargs) -> ENorm:
        """ENorm over the chain of ``model``, found by tracing it with torch.fx.

        Refuses, naming the node, what it cannot prove keeps the function: a branch or
        residual add, a map between two weights that is not positively homogeneous, and a
        BatchNorm between two weights unless ``allow_batchnorm=True`` (the paper's ENorm + BN:
        the cycle then changes what the network computes); a model that is not an nn.Module
        is a TypeError.  Keyword arguments go to ENorm.

        With ``residual=True`` the model may branch and merge (residual networks): every pair
        of weight layers joined by a single path of such maps is balanced, and a layer whose
        output meets a skip connection, a merge or a fork keeps its output scale (it can
        still be the second layer of a pair).  The chain whose last layer reaches the output
        along a single path becomes ``layers`` (``balance_last`` applies to it); every other
        chain becomes one of ``branches``, balanced through its last pair."""
        check_bool("residual", residual)
        if residual:
            layers, branches = find_chains(model, allow_batchnorm=allow_batchnorm)
            return cls(layers, optimizer, branches=branches, **kwargs)
        return cls(find_chain(model, allow_batchnorm=allow_batchnorm), optimizer, **kwargs)

    def _chains(self, balance_last: bool | None = None) -> list[tuple[str, list[nn.Module], list, int]]:
        """Per chain (``layers``, then each of ``branches``): its name in messages, its
        layers, their (O, I, K) shapes and its number of balanced pairs."""
        last = self.balance_last if balance_last is None else balance_last
        main = ("layers", self.layers, self._shapes, max(0, len(self.layers) - (1 if last else 2)))
        return [main, *((f"branches[{i}]", b, s, len(b) - 1)
                         for i, (b, s) in enumerate(zip(self.branches, self._branch_shapes, strict=True)))]

    @property
    def pairs(self) -> int:
        """The number of balanced pairs (hidden layers) of one cycle, over every chain."""
        return sum(pairs for *_, pairs in self._chains())

    def _tensors(self) -> list[tuple[list[nn.Module], list[list[tuple[torch.Tensor, int]]]]]:
        """Per chain with a pair to balance, its layers up to the last one the cycle touches
        and, per layer, its (tensor view, power) list: the weight first, then the bias if it
        is scaled, then their optimizer state."""
        chains = []
        for name, layers, shapes, pairs in self._chains():
            if not pairs:
                continue
            out = []
            for k, layer in enumerate(layers[: pairs + 1]):
                params = [(layer.weight, shapes[k])]
                if layer.bias is not None and self.scale_biases:
                    params.append((layer.bias, (layer.bias.shape[0],)))
                items = [(_view(t, shape, f"{name}[{k}]"), 1) for t, shape in params]
                if self._powers is not None:
                    for t, shape in params:
                        items += self._state(t, shape, k, name)
                out.append(items)
            chains.append((layers[: pairs + 1], out))
        return chains

    def _state(self, param: torch.Tensor, shape, k: int, name: str = "layers") -> list[tuple[torch.Tensor, int]]:
        items = []
        for key, value in self.optimizer.state.get(param, {}).items():
            if not isinstance(value, torch.Tensor) or value.shape != param.shape:
                continue  # step counters and other scalars
            if key not in self._powers:
                raise TypeError(
                    f"optimizer: unknown state {key!r} of {name}[{k}] in {type(self.optimizer).__name__}; "
                    f"ENorm knows {sorted(self._powers)}"
                )
            if self._powers[key]:
                items.append((_view(value, shape, f"optimizer state {key!r} of {name}[{k}]"), self._powers[key]))
        return items

    def _key(self) -> tuple[int, ...]:
        """The addresses of every tensor the cycle may touch: while they are the same, the
        views, dtypes and Triton tables of the last cycle still hold (the cached views keep
        the old tensors alive, so a new tensor cannot reuse an old address)."""
        state = self.optimizer.state if self.optimizer is not None else {}
        ptrs = []
        for layer in (layer for _, layers, _, pairs in self._chains() for layer in layers[: pairs + 1]):
            for param in (layer.weight, layer.bias):
                if param is not None:
                    ptrs.append(param.data_ptr())
                    ptrs += [v.data_ptr() for v in state.get(param, {}).values() if isinstance(v, torch.Tensor)]
        return tuple(ptrs)

    @torch.no_grad()
    def step(self) -> None:
        """One cycle: rescale the chain's weights, biases and optimizer state in place."""
        key = self._key()
        if key != self._cache_key:
            self._layers = self._tensors()
            self._dtypes = {t.dtype for _, chain in self._layers for items in chain for t, _ in items}
            self._plans, self._cache_key = None, key
        backend = resolve_backend(self.backend, (self.layers or self.branches[0])[0].weight)
        if backend == "triton" and len(self._dtypes) > 1:
            if self.backend == "triton":
                raise TypeError(
                    f"backend='triton' needs one dtype across the chain's weights, biases and optimizer state, "
                    f"got {sorted(map(str, self._dtypes))}"
                )
            backend = "torch"
        if backend == "triton":
            self._triton_cycle()
        else:
            self._torch_cycle()

    def attach(self, optimizer=None, *, every: int = 1, cycles: int = 1) -> AttachHandle:
        r"""Run the cycle from the optimizer's own steps: ``cycles`` cycles after every
        ``every``-th step that ``optimizer`` really takes.

        Registers a step post-hook on the optimizer (``Optimizer.register_step_post_hook``).
        The hook counts the optimizer's steps, n, and after step n runs ``cycles`` cycles
        (``step()``) when n is a multiple of ``every``.  So the cycle follows what the weights
        go through, not the training loop's calls:

        - gradient accumulation (k backward passes, then one ``optimizer.step()``) runs the
          cycle once, after the step;
        - a step that ``torch.amp.GradScaler`` skips (inf or NaN gradients) is not counted and
          runs no cycle.  The scaler then does not call ``optimizer.step()``, or, for a fused
          optimizer (``fused=True``), calls it with ``optimizer.found_inf`` set, which the
          hook reads: one device-to-host copy per step, on that path only.

        With the defaults, attaching is the same as calling ``step()`` after every
        ``optimizer.step()``.  The count is the ENorm's: it goes on across ``remove()`` and a
        new ``attach`` (steps taken while detached are not counted), and ``state_dict()``
        saves it, so a resumed run with ``every=4`` keeps its phase.

        Args:
            optimizer: the optimizer whose steps run the cycle; by default ``self.optimizer``.
                An ENorm built with an optimizer rescales that optimizer's state, so only that
                one may be passed.  One built with ``optimizer=None`` (an optimizer without
                per-parameter state, or one ``OPTIMIZER_STATE`` does not list) takes any
                ``torch.optim.Optimizer`` that holds every parameter the cycle rescales, as the
                constructor checks it; its state is not rescaled.
            every: run after every ``every``-th optimizer step (a positive int).
            cycles: cycles per run (a positive int); the paper allows several.

        Returns:
            AttachHandle: ``handle.remove()`` takes the hook off; a ``with`` block removes it
            at its end.

        Raises:
            ValueError: ``every`` or ``cycles`` is not a positive int (a bool is not an int),
                no optimizer (neither passed nor built with), or an optimizer that is not this
                ENorm's or does not hold the chain's parameters.
            TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
            RuntimeError: the ENorm is already attached (one hook at a time: remove it first).

        Example::

            >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            >>> enorm = tritonorm.ENorm.from_model(model, optimizer, c=1.2)
            >>> with enorm.attach(every=2):
            ...     for x, y in batches:
            ...         F.cross_entropy(model(x), y).backward()
            ...         optimizer.step()        # every second step also runs a cycle
            ...         optimizer.zero_grad()
        """
        check_int("every", every)
        check_int("cycles", cycles)
        if optimizer is None:
            optimizer = self.optimizer
            if optimizer is None:
                raise ValueError(
                    "optimizer: this ENorm was built with optimizer=None; pass the optimizer whose steps run the cycle"
                )
        elif not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        elif self.optimizer is None:
            for name, layers, _, pairs in self._chains():
                _check_optimizer_holds(optimizer, layers[: pairs + 1], scale_biases=self.scale_biases, name=name)
        elif optimizer is not self.optimizer:
            raise ValueError(
                f"optimizer: this ENorm rescales the state of the {type(self.optimizer).__name__} it was built with, "
                f"so its cycle must follow that optimizer's steps, not those of another {type(optimizer).__name__}; "
                "call attach() without it"
            )
        if self._attachment is not None:
            raise RuntimeError("ENorm.attach: already attached to an optimizer; call remove() on its handle first")

        def hook(optimizer, args, kwargs) -> None:
            found_inf = getattr(optimizer, "found_inf", None)  # a fused step under a GradScaler
            if found_inf is not None and found_inf.item():
                return
            self._optimizer_steps += 1
            if self._optimizer_steps % every == 0:
                for _ in range(cycles):
                    self.step()

        self._attachment = AttachHandle(self, optimizer.register_step_post_hook(hook))
        return self._attachment

    def _bias_norms(self, layers: list[nn.Module], chain: list) -> list[torch.Tensor | None]:
        """b_q for pair q's norm of one chain (its touched layers and their tensors), or None."""
        return [chain[q][1][0] if self.balance_biases and layers[q].bias is not None else None
                for q in range(len(layers) - 1)]

    def _torch_cycle(self) -> None:
        for layers, chain in self._layers:
            pairs = len(layers) - 1
            weights = [items[0][0] for items in chain]
            ds = _ref.coefficients(weights, self._bias_norms(layers, chain), pairs=pairs, c=self.c, p=self.p,
                                   eps=self.eps, sequential=self.mode == "sequential")
            flat = [(k, t, a) for k, items in enumerate(chain) for t, a in items]
            _ref.rescale_(
                [t for _, t, _ in flat],
                [ds[k] if k < pairs else None for k, _, _ in flat],
                [ds[k - 1] if k and t.dim() == 3 else None for k, t, _ in flat],
                [a for _, _, a in flat],
            )

    @property
    def _plan(self):
        """The Triton plan of the first chain the cycle balances (None before a Triton cycle)."""
        return self._plans[0] if self._plans else None

    def _triton_cycle(self) -> None:
        from .kernels import enorm as _kernels

        if self._plans is None:
            self._plans = [_kernels.Plan(chain, [b is not None for b in self._bias_norms(layers, chain)])
                           for layers, chain in self._layers]
        for plan in self._plans:
            _kernels.cycle(plan, c=self.c, p=self.p, eps=self.eps, sequential=self.mode == "sequential")

    def state_dict(self) -> dict:
        """The settings, and ``optimizer_steps``: the optimizer steps that ``attach``'s hook
        has counted (the layers and the optimizer are references, not state)."""
        branches = {"branch_layers": [len(b) for b in self.branches]} if self.branches else {}
        return {"num_layers": len(self.layers), **branches, **{name: getattr(self, name) for name in _SETTINGS},
                "optimizer_steps": self._optimizer_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the settings, checked as the constructor checks them, and the step count
        (0 when ``state_dict`` predates it)."""
        missing = {"num_layers", *_SETTINGS} - set(state_dict)
        if missing:
            raise KeyError(f"state_dict: missing {sorted(missing)}")
        if state_dict["num_layers"] != len(self.layers):
            raise ValueError(
                f"state_dict: saved for a chain of {state_dict['num_layers']} layers, this one has {len(self.layers)}"
            )
        saved = list(state_dict.get("branch_layers", []))
        if saved != [len(b) for b in self.branches]:
            raise ValueError(
                f"state_dict: saved for branches of {saved} layers, this one has {[len(b) for b in self.branches]}"
            )
        steps = check_int("optimizer_steps", state_dict.get("optimizer_steps", 0), minimum=0)
        self._configure({name: state_dict[name] for name in _SETTINGS})
        self._optimizer_steps = steps

    def __repr__(self) -> str:
        settings = ", ".join(f"{name}={getattr(self, name)!r}" for name in _SETTINGS)
        branches = f"{len(self.branches)} branches, " if self.branches else ""
        return f"ENorm({len(self.layers)} layers, {branches}{self.pairs} pairs, {settings})"


class AttachHandle:
    """What ``ENorm.attach`` returns.  ``remove()`` takes the hook off the optimizer (again:
    nothing happens); as a context manager, the hook is removed at the end of the block."""

    def __init__(self, enorm: ENorm, handle: RemovableHandle):
        self._enorm, self._handle = enorm, handle

    def remove(self) -> None:
        self._handle.remove()
        if self._enorm._attachment is self:
            self._enorm._attachment = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


def _view(t: torch.Tensor, shape, what: str) -> torch.Tensor:
    """A view of t's storage without autograd history (it outlives the no_grad block)."""
    try:
        return t.detach().view(shape)
    except RuntimeError:
        raise ValueError(
            f"{what}: strides {t.stride()} cannot be viewed as {tuple(shape)}; make it contiguous"
        ) from None
