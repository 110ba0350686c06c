"""Triton kernels and their launchers, one file per method."""

# Elements a thread holds (two 128-bit vectors of fp32, one of bf16) before a tile gets
# another warp.
ELEMENTS_PER_THREAD = 8


def num_warps_for(elements: int, max_warps: int) -> int:
    """Warps for a tile of ``elements``: up to ``max_warps``, fewer for a small tile, whose
    threads then still hold ELEMENTS_PER_THREAD elements and load them as vectors (a tile of
    64 over 4 warps would leave half the threads idle and the rest loading one element)."""
    return min(max(elements // (32 * ELEMENTS_PER_THREAD), 1), max_warps)
