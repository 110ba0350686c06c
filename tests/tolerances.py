"""The one tolerance rule of the tests that compare a computed result with its oracle.

What is compared
    A result of the dtype under test (the Triton path, compiled on CUDA or interpreted on
    CPU, or the PyTorch path) against the float64 reference run on the same values: the
    inputs, parameters and upstream gradients are rounded to the dtype first, so the
    reference sees exactly what the kernel saw and the only difference is the arithmetic.
    Where the oracle is another result of the same dtype (the Triton ENorm cycle against
    the PyTorch one, a batch split across processes against the whole batch), both sides
    carry that error; the rule below already leaves room for it.

Where the error comes from
    The kernels load the dtype, accumulate in fp32 (fp64 for fp64 input) and round each
    result once to the dtype when they store it.  So an element is off by

    - the rounding of the output, half an ulp: ``u * |expected|`` with the unit roundoff
      ``u`` = 2**-11 (fp16), 2**-8 (bf16), 2**-24 (fp32), 2**-53 (fp64);
    - the rounding of the accumulation, a few ``u`` of the accumulating dtype times the
      size of the terms summed.  That size, not the result's, is what matters where the
      terms cancel (a gradient summed over a channel, a sum of signed products): the caller
      passes it as ``scale``.

The rule, per element::

    |actual - expected| <= ATOL * scale + RTOL * |expected|        (ATOL, RTOL = TOL[dtype])

- ``RTOL``, for the output's rounding and the arithmetic's relative error: 4 u for fp16 /
  bf16, where the output's rounding (u) dominates and fp32's accumulation is far below it;
  2**8 u for fp32, where a result's few roundings are multiplied by the conditioning of the
  normalization (a division by a deviation, a mean subtracted from values of the same size);
  for fp64, 2**23 u (1e-9): a bound that only has to tell fp64 arithmetic (1e-16) from fp32
  leaking into a path (1e-8).  Each leaves room for a same-dtype oracle's own error.
- ``ATOL * scale``, for the error of what was summed, where values are near zero: ATOL is
  2 u for fp16 / bf16 (the rounding of the terms, of size 1) and RTOL / 4 for fp32 and fp64
  (an input gradient subtracts per-channel sums from terms of O(1): 1.4e-6 measured in fp32
  where the exact value is near 0).
  ``scale`` is 1 for normalized values and gradients of O(1) (every test's data is O(1));
  ``sqrt(n)`` for a sum over ``n`` values of O(1) (a per-channel dweight, dbias, dmass: the
  rounding errors of a blocked sum grow as the root of its length); or a tensor, whose
  largest |value| is taken, where the caller knows the size before cancellation (a weight
  norm's unprojected gradient, a weight's largest element).

A test that needs another bound says so where it calls, with the reason.
"""

import torch

# (ATOL, RTOL) by dtype; see the module docstring.
TOL = {
    torch.float16: (2**-10, 2**-9),  # (2 u, 4 u) = (9.8e-4, 2.0e-3)
    torch.bfloat16: (2**-7, 2**-6),  # (2 u, 4 u) = (7.8e-3, 1.6e-2)
    torch.float32: (2**-18, 2**-16),  # (2**6 u, 2**8 u) = (3.8e-6, 1.5e-5)
    torch.float64: (2**-32, 2**-30),  # (2**21 u, 2**23 u) = (2.3e-10, 9.3e-10)
}


def assert_close(actual, expected, dtype, what, *, scale=1.0, equal_nan=False):
    """Fail, naming ``what``, unless every element of ``actual`` is within the rule of
    ``dtype`` of ``expected`` (both compared in float64 on the CPU, shapes equal).

    ``scale``: a number, or a tensor whose largest |value| is taken (see the module
    docstring); ``equal_nan``: NaN matches NaN."""
    if isinstance(scale, torch.Tensor):
        scale = scale.abs().max().item()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double().cpu(),
                               atol=atol * scale, rtol=rtol, equal_nan=equal_nan,
                               msg=lambda m: f"{what}: {m}")
