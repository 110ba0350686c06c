"""backend="auto" | "triton" | "torch", and TRITONORM_BACKEND overriding "auto"."""

import pytest
import torch

import tritonorm
from tritonorm import _dispatch


def test_auto_picks_torch_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("TRITONORM_BACKEND", raising=False)
    assert _dispatch.resolve_backend("auto", torch.ones(1)) == "torch"


def test_explicit_backends(monkeypatch):
    monkeypatch.setenv("TRITONORM_BACKEND", "torch")
    assert _dispatch.resolve_backend("torch", torch.ones(1)) == "torch"
    if _dispatch.INTERPRETED:
        assert _dispatch.resolve_backend("triton", torch.ones(1)) == "triton"


def test_env_var_overrides_auto_only(monkeypatch):
    monkeypatch.setenv("TRITONORM_BACKEND", "triton")
    if _dispatch.INTERPRETED or torch.cuda.is_available():
        assert _dispatch.resolve_backend("auto", torch.ones(1)) == "triton"
    assert _dispatch.resolve_backend("torch", torch.ones(1)) == "torch"
    assert "forces" in _dispatch.describe()


def test_env_var_routes_the_call(monkeypatch):
    """With the variable set, an "auto" layer runs the Triton op (seen through a spy)."""
    if not (_dispatch.INTERPRETED or torch.cuda.is_available()):
        pytest.skip("the Triton path needs CUDA or TRITON_INTERPRET=1")
    from tritonorm.ops import lp_batchnorm as ops

    calls = []
    real = ops.lp_batch_norm
    monkeypatch.setattr(ops, "lp_batch_norm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn(4, 3, device="cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("TRITONORM_BACKEND", "torch")
    tritonorm.functional.l1_batch_norm(x, training=True)
    assert calls == []
    monkeypatch.setenv("TRITONORM_BACKEND", "triton")
    tritonorm.functional.l1_batch_norm(x, training=True)
    assert calls == [1]


def test_bad_backend_values(monkeypatch):
    with pytest.raises(ValueError, match=r"backend must be one of 'auto', 'triton', 'torch', got 'cuda'"):
        tritonorm.L1BatchNorm1d(3, backend="cuda")(torch.randn(4, 3))
    monkeypatch.setenv("TRITONORM_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"environment variable TRITONORM_BACKEND must be one of .*got 'fast'"):
        tritonorm.functional.l1_batch_norm(torch.randn(4, 3), training=True)


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(_dispatch, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match=r"backend='triton' runs on CUDA tensors, got a cpu tensor"):
        _dispatch.resolve_backend("triton", torch.ones(1))
