"""Nearest-level quantization of rotated rows, fused in one pass (numba).

For each row ``y`` (rotated, not yet normalised) and its norm ``n``: ``u = y / n``; each
coordinate's index of the nearest level (levels of ``bits + 1`` bits for the first
``extra_coords`` coordinates); ``<u, c[idx]>``; and, when asked, the residual ``u - c[idx]``.
One pass over the row replaces a division, a bucketize, a gather and a reduction in torch.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(inline="always")
def _nearest(value, bounds):  # pragma: no cover - compiled
    """Index of ``value``'s cell among sorted midpoints ``bounds`` (== torch.bucketize, right=False)."""
    if bounds.shape[0] <= 15:  # a count of comparisons: branch-free
        index = 0
        for b in bounds:
            index += value > b
        return index
    lo, hi = 0, bounds.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if bounds[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(parallel=True, cache=True)
def quantize_rows(rotated, inverse_norms, bounds_lo, levels_lo, bounds_hi, levels_hi, extra, indices, alignment, residual):  # pragma: no cover - compiled
    """Fill ``indices`` uint8 ``(n, D)``, ``alignment`` float32 ``(n,)`` and, if it has rows, ``residual`` ``(n, D)``."""
    rows, dim = rotated.shape
    keep_residual = residual.shape[0] > 0
    for r in prange(rows):
        scale = inverse_norms[r]
        total = np.float32(0.0)
        for j in range(dim):
            value = rotated[r, j] * scale
            if j < extra:
                index = _nearest(value, bounds_hi)
                level = levels_hi[index]
            else:
                index = _nearest(value, bounds_lo)
                level = levels_lo[index]
            indices[r, j] = index
            total += value * level
            if keep_residual:
                residual[r, j] = value - level
        alignment[r] = total
