"""The benchmarks: what each one runs (``lp_cases``, ``equinorm_cases``, ``enorm_cases``,
``bwn_cases``, ``fused_cases``, ``stack_cases``: cases, contenders, bytes, and each its
roofline section), the helpers the sections share (``timing``) and the bandwidth roofline
over them (``roofline``: the plan, the run, the page).

Shared by ``tritonorm bench``, ``benchmarks/roofline.py`` and the pytest-benchmark suites
``benchmarks/bench_*.py``; part of the package so that an installed ``tritonorm bench``
runs without a checkout.  Nothing here is imported by ``import tritonorm``.
"""
