"""Bounded weight normalization ("Norm matters", Hoffer et al. 2018) as a
``torch.nn.utils.parametrize`` parametrization, so that any module can use it.

The module keeps v (``module.parametrizations.weight.original``) as its parameter and
computes its weight from it at every access:

    w_i = rho * v_i / ||v_i||_p                              (fixed scale, the paper)
    w_i = g_i * (rho_g / ||g||_2) * v_i / ||v_i||_p          (learnable_gain=True, the authors' code)

per slice i along ``dim`` (output channels for ``dim=0``), for the norm order p = 2
(default), 1 or inf.  rho is one fixed number per
layer, by default the mean of the initial slice norms (a buffer, saved in the state_dict);
with the learnable gain, g starts at the initial slice norms and its overall norm is held at
its initial value rho_g (a buffer), so the weight's total norm never moves.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .. import functional as F
from .._checks import check_bool, check_eps, check_norm_order, check_number, check_slice_dim
from .._dispatch import check_backend
from ..reference.bounded_weight_norm import EPS, slice_norms

__all__ = [
    "BoundedWeightNorm", "bounded_weight_norm", "remove_bounded_weight_norm", "BoundedWNLinear", "BoundedWNConv2d",
]


class BoundedWeightNorm(nn.Module):
    """The parametrization v -> w that ``bounded_weight_norm`` registers ("Norm matters",
    Hoffer et al. 2018): per slice i of v along ``dim``,

        w_i = rho * v_i / ||v_i||_p                         (fixed rho)
        w_i = g_i * (rho_g / ||g||_2) * v_i / ||v_i||_p     (learnable_gain)

    Build it through ``bounded_weight_norm``, which checks the arguments; it is found at
    ``module.parametrizations.<name>[0]``.

    Args:
        weight: the weight it will parametrize, whose slice p-norms give the default rho
            (their mean) and the gain's initial values.
        rho: the fixed norm of every slice, or None for the mean initial slice norm.
        learnable_gain: use the gain g (a parameter, ``gain``) whose norm is held at its
            initial value rho_g (a buffer, ``gain_norm``); else rho is a () buffer, ``rho``.
        dim: the axis whose slices are normalized.
        eps: floor on the slice norms.
        backend: "auto", "triton" or "torch".
        p: the norm order of the slices, 2, 1 or inf (a float).

    Shape:
        input v and output w: the parametrized tensor's shape, any rank >= 1.

    Example::

        >>> linear = tritonorm.bounded_weight_norm(nn.Linear(20, 40), learnable_gain=True)
        >>> linear.parametrizations.weight[0].gain.shape
        torch.Size([40])
    """

    def __init__(self, weight: Tensor, *, rho: float | None, learnable_gain: bool, dim: int, eps: float,
                 backend: str, p: float = 2.0):
        super().__init__()
        self.dim, self.eps, self.backend, self.learnable_gain, self.p = dim, eps, backend, learnable_gain, p
        norms = slice_norms(weight.detach(), dim, p)
        init = norms if rho is None else torch.full_like(norms, rho)
        if learnable_gain:
            self.gain = nn.Parameter(init.to(weight.dtype))
            self.register_buffer("gain_norm", torch.linalg.vector_norm(init).to(weight.dtype))
        else:
            self.register_buffer("rho", init.mean().to(weight.dtype))

    def scale(self) -> Tensor:
        """rho_i: the () buffer rho, or (S,) g_i rho_g / ||g|| with the gain."""
        if not self.learnable_gain:
            return self.rho
        return self.gain * (self.gain_norm / torch.linalg.vector_norm(self.gain).clamp_min(self.eps))

    def forward(self, v: Tensor) -> Tensor:
        return F.bounded_weight(v, self.scale(), dim=self.dim, eps=self.eps, p=self.p, backend=self.backend)

    def right_inverse(self, weight: Tensor) -> Tensor:
        """Assigning ``module.weight = w`` sets v = w: w's directions, the bound's norms."""
        return weight

    def extra_repr(self) -> str:
        bound = "learnable_gain=True" if self.learnable_gain else f"rho={self.rho.item():.4g}"
        order = "" if self.p == 2 else f", p={self.p}"
        return f"{bound}, dim={self.dim}{order}, eps={self.eps}, backend={self.backend!r}"


def _ours(module: nn.Module, name: str) -> list[nn.Module]:
    if not parametrize.is_parametrized(module, name):
        return []
    return [p for p in module.parametrizations[name] if isinstance(p, BoundedWeightNorm)]


def bounded_weight_norm(
    module: nn.Module,
    name: str = "weight",
    dim: int = 0,
    *,
    rho: float | None = None,
    learnable_gain: bool = False,
    p: float = 2.0,
    eps: float = EPS,
    backend: str = "auto",
) -> nn.Module:
    """Parametrize ``module.<name>`` with bounded weight normalization, in place, and return
    the module.

    Per slice i along ``dim`` (the output channels of Linear and Conv for ``dim=0``; those of
    ConvTranspose are ``dim=1``):  w_i = rho * v_i / ||v_i||_p.

    Args:
        module: any module with a floating-point parameter ``name`` of one dim or more.
        rho: the fixed norm of every slice, a finite number > 0; None (default) takes the
            mean of the initial slice norms, so the initializer's scale is kept.
        learnable_gain: the authors' variant, w_i = g_i (rho_g / ||g||) v_i / ||v_i||, with
            a parameter g (``module.parametrizations.<name>[0].gain``) that starts at the
            initial slice norms (at ``rho`` if given) and whose norm is held at its initial
            value rho_g.
        p: the norm order of every slice: 2 (default), 1 (sum of |v_ij|) or float("inf")
            (max |v_ij|; its gradient goes to the max element alone, ties to the lowest
            index); rho and the gain's initial values are p-norms too.
        dim: the axis whose slices are normalized.
        eps: floor on the slice norms (as ``torch.nn.functional.normalize``).
        backend: "auto", "triton" or "torch"; see ``tritonorm._dispatch``.

    v starts as the current weight, so with a fixed rho the weight changes at once to the
    bounded one (its directions, norm rho); with ``learnable_gain`` and the default init the
    weight is unchanged.  A slice of norm 0 (or not finite) is refused: it has no direction.
    Undo with ``remove_bounded_weight_norm``.

    Example::

        >>> conv = tritonorm.bounded_weight_norm(nn.Conv2d(3, 16, 3))   # rho: the mean norm
        >>> conv.weight.flatten(1).norm(dim=1)        # all 16 norms equal rho
        >>> conv.parametrizations.weight.original     # v, the parameter the optimizer updates
        >>> up = tritonorm.bounded_weight_norm(nn.ConvTranspose2d(16, 8, 2), "weight", 1)
        >>> gained = tritonorm.bounded_weight_norm(nn.Linear(20, 40), rho=2.0, learnable_gain=True)
        >>> l1 = tritonorm.bounded_weight_norm(nn.Linear(20, 40), p=1)   # rows of L1 norm rho
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(name, str) or not isinstance(getattr(module, name, None), Tensor):
        raise ValueError(f"name: {type(module).__name__} has no tensor attribute {name!r}")
    if _ours(module, name):
        raise ValueError(f"name: {type(module).__name__}.{name} already has bounded_weight_norm")
    weight = getattr(module, name)
    if not isinstance(weight, nn.Parameter) and not parametrize.is_parametrized(module, name):
        raise ValueError(f"name: {type(module).__name__}.{name} is not a parameter")
    if weight.dtype not in F.FLOAT_DTYPES or weight.dim() == 0:
        raise TypeError(f"{name} must be a floating-point tensor with one dim or more, got {weight.dtype} of shape "
                        f"{tuple(weight.shape)}")
    dim = check_slice_dim(dim, weight, name)
    check_number("rho", rho, low=0, low_open=True, none=True)
    check_bool("learnable_gain", learnable_gain)
    p = check_norm_order(p)
    check_eps(eps)
    check_backend(backend)
    if weight.is_meta:
        raise ValueError(
            f"{name}: {type(module).__name__}.{name} is on the meta device; bounded_weight_norm reads its values "
            "(rho and the gain come from them, and every slice must have a direction): materialize the module "
            "first (to_empty() and its initialization)"
        )
    norms = slice_norms(weight.detach(), dim, p)
    bad = (~torch.isfinite(norms) | (norms <= eps)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"{name}: slice(s) {bad[:8]} along dim={dim} of {type(module).__name__}.{name} have norm "
            f"{norms[bad[0]].item():g} (zero, below eps={eps:g} or not finite): a bounded weight needs a direction "
            "in every slice"
        )
    parametrization = BoundedWeightNorm(weight, rho=rho, learnable_gain=learnable_gain, dim=dim, eps=eps,
                                        backend=backend, p=p)
    parametrize.register_parametrization(module, name, parametrization)
    return module


def remove_bounded_weight_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Bake the bounded weight into a plain parameter ``module.<name>`` again, in place, and
    return the module (as torch's ``remove_parametrizations`` with
    ``leave_parametrized=True``): the weight keeps its current value, v, rho and the gain
    are dropped.

    Args:
        module: a module with ``bounded_weight_norm`` on ``name``, and no other
            parametrization stacked on it (remove those with
            ``torch.nn.utils.parametrize.remove_parametrizations``).
        name: the parametrized parameter.

    Example::

        >>> linear = tritonorm.bounded_weight_norm(nn.Linear(20, 40))
        >>> linear = tritonorm.remove_bounded_weight_norm(linear)
        >>> isinstance(linear.weight, nn.Parameter)
        True
    """
    ours = _ours(module, name)
    if not ours:
        raise ValueError(f"name: {type(module).__name__}.{name} has no bounded_weight_norm")
    if len(module.parametrizations[name]) > 1:
        raise ValueError(
            f"name: {type(module).__name__}.{name} has other parametrizations stacked with bounded_weight_norm; "
            "remove them with torch.nn.utils.parametrize.remove_parametrizations"
        )
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return module


class BoundedWNLinear(nn.Linear):
    """``nn.Linear`` with ``bounded_weight_norm`` on its weight, one slice per output
    feature ("Norm matters", Hoffer et al. 2018): w_i = rho * v_i / ||v_i||_p.

    Args:
        in_features, out_features, bias, device, dtype: as nn.Linear.
        rho: the fixed norm of every row; None (default) for the mean of the initial row
            norms.
        learnable_gain: the authors' held-norm gain instead of one fixed rho (see
            ``bounded_weight_norm``).
        p: the norm order, 2 (default), 1 or float("inf") (see ``bounded_weight_norm``).
        backend: "auto" (Triton on CUDA tensors, PyTorch elsewhere), "triton" or "torch".

    Shape:
        input: (*, H_in), H_in = in_features.
        output: (*, H_out), H_out = out_features.

    Example::

        >>> layer = tritonorm.BoundedWNLinear(20, 30)
        >>> y = layer(torch.randn(128, 20))
        >>> v = layer.parametrizations.weight.original   # the parameter the optimizer updates
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rho: float | None = None,
                 learnable_gain: bool = False, p: float = 2.0, backend: str = "auto", device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        bounded_weight_norm(self, rho=rho, learnable_gain=learnable_gain, p=p, backend=backend)


class BoundedWNConv2d(nn.Conv2d):
    """``nn.Conv2d`` with ``bounded_weight_norm`` on its weight, one slice per output
    channel ("Norm matters", Hoffer et al. 2018): w_i = rho * v_i / ||v_i||_p.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype: as nn.Conv2d.
        rho: the fixed norm of every output channel's kernel; None (default) for the mean
            of the initial norms.
        learnable_gain: the authors' held-norm gain instead of one fixed rho (see
            ``bounded_weight_norm``).
        p: the norm order, 2 (default), 1 or float("inf") (see ``bounded_weight_norm``).
        backend: "auto" (Triton on CUDA tensors, PyTorch elsewhere), "triton" or "torch".

    Shape:
        input: (N, C_in, H_in, W_in), C_in = in_channels.
        output: (N, C_out, H_out, W_out), C_out = out_channels, sizes as nn.Conv2d's.

    Example::

        >>> conv = tritonorm.BoundedWNConv2d(16, 33, 3, stride=2, rho=1.0)
        >>> y = conv(torch.randn(20, 16, 50, 100))
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, rho: float | None = None,
                 learnable_gain: bool = False, p: float = 2.0, backend: str = "auto", device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        bounded_weight_norm(self, rho=rho, learnable_gain=learnable_gain, p=p, backend=backend)
