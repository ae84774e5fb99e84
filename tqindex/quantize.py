"""Nearest-level quantization of rotated rows, fused in one pass (numba).

For each row ``y`` (rotated, not yet normalised) and its norm ``n``: ``u = y / n``; each
coordinate's index of the nearest level (levels of ``bits + 1`` bits for the first
``extra_coords`` coordinates); ``<u, c[idx]>``; and, when asked, the residual ``u - c[idx]``.
One pass over the row replaces a division, a bucketize, a gather and a reduction in torch.

``quantize_rows_search`` is the encoder of ``TurboQuantCodec(search=True)``: of the codes
``nearest(t u)`` for a grid of scalings ``t``, the one whose levels have the best cosine with ``u``.
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


@njit(inline="always")
def _crossing(bound, value, grid, inv_step, rising):  # pragma: no cover - compiled
    """First grid index ``g >= 1`` at which ``grid[g] * value > bound`` turns true (``rising``) or false.

    ``grid`` is increasing and evenly spaced, so the predicate is monotone in ``g``; the caller
    knows that it changes between the first and the last point. A division estimates ``g``; the
    exact float32 comparisons (the ones ``_nearest`` makes) settle it.
    """
    last = grid.shape[0] - 1
    g = min(max(int((bound / value - grid[0]) * inv_step) + 1, 1), last)
    while g > 1 and (grid[g - 1] * value > bound) == rising:
        g -= 1
    while g < last and (grid[g] * value > bound) != rising:
        g += 1
    return g


@njit(inline="always")
def _add_crossings(value, bounds, levels, grid, inv_step, step_dot, step_energy):  # pragma: no cover - compiled
    """One coordinate of ``quantize_rows_search``'s first pass: its level at ``grid[0]``, and the
    changes of ``<u, c>`` and ``|c|^2`` at each grid point where its level moves."""
    last = grid.shape[0] - 1
    first = _nearest(grid[0] * value, bounds)
    final = _nearest(grid[last] * value, bounds)
    v = np.float64(value)
    for k in range(first, final):  # value > 0: one level up at each boundary crossed
        g = _crossing(bounds[k], value, grid, inv_step, True)
        old, new = np.float64(levels[k]), np.float64(levels[k + 1])
        step_dot[g] += v * (new - old)
        step_energy[g] += new * new - old * old
    for k in range(first - 1, final - 1, -1):  # value < 0: one level down at each boundary crossed
        g = _crossing(bounds[k], value, grid, inv_step, False)
        old, new = np.float64(levels[k + 1]), np.float64(levels[k])
        step_dot[g] += v * (new - old)
        step_energy[g] += new * new - old * old
    return np.float64(levels[first])


#: code search tries the scalings ``t`` of ``u`` from ``SEARCH_RANGE[0]`` to ``SEARCH_RANGE[1]`` in steps of
#: ``SEARCH_STEP`` (t = 1 included). Wider or finer grids gained < 0.1% of MSE at d >= 128, 2-4 bits
#: (docs/benchmarks.md); the best ``t`` falls in [0.7, 1.3] for 98% of vectors there.
SEARCH_RANGE = (0.6, 1.5)
SEARCH_STEP = 0.01
#: code search: keys within this fraction of the best tie (the plain codes if among them, else the
#: first point). Codes at two scalings can be proportional (all coordinates one cell out, as at
#: d <= 4), so their cosines are equal and only float64 rounding, which differs between the
#: encoders (numba, torch, Triton), would tell them apart; distinct cosines differ by far more.
SEARCH_TIE = 1e-12
_SEARCH_BLOCK = 64  # rows per parallel task of quantize_rows_search (shares its scratch arrays)


def search_grid() -> tuple[np.ndarray, int]:
    """The scalings ``t`` that code search tries: float32 ``(T,)``, evenly spaced, and the index of ``t = 1``."""
    below = int(round((1 - SEARCH_RANGE[0]) / SEARCH_STEP))
    above = int(round((SEARCH_RANGE[1] - 1) / SEARCH_STEP))
    grid = (1 + SEARCH_STEP * np.arange(-below, above + 1)).astype(np.float32)
    grid[below] = 1.0
    return grid, below


@njit(inline="always")
def _tied_best(keys, start):  # pragma: no cover - compiled
    """Code search's choice among the keys of the grid points: the plain codes (``start``) if within
    `SEARCH_TIE` of the largest, else the first point that is."""
    floor = keys.max()
    floor -= SEARCH_TIE * abs(floor)
    if keys[start] >= floor:
        return start
    for g in range(keys.shape[0]):
        if keys[g] >= floor:
            return g
    return start


@njit(parallel=True, cache=True)
def quantize_rows_search(rotated, inverse_norms, bounds_lo, levels_lo, bounds_hi, levels_hi, extra, grid, start, indices, alignment, energy, residual):  # pragma: no cover - compiled
    """``quantize_rows`` with code search: of the codes ``nearest(t u)`` for ``t`` in ``grid``, the
    one whose levels have the largest cosine with ``u``.

    ``grid`` float32 ``(T,)``, increasing, evenly spaced, with ``grid[start] == 1`` (the plain
    codes, kept on ties: keys within `SEARCH_TIE` of the best). Per row, a first pass finds for each coordinate the grid points where
    its level ``nearest(t u_j)`` moves (the level boundaries crossed between ``grid[0] u_j`` and
    ``grid[-1] u_j``) and adds there the change of ``<u, c>`` and ``|c|^2``; a sweep over the
    ``T`` points finds the largest cosine (compared as ``<u, c> |<u, c>| / |c|^2``, in float64,
    ties within `SEARCH_TIE`);
    a last pass writes ``nearest(t* u)``. Cost: about three plain passes plus one step per
    boundary crossed, not ``T`` quantizations. The result is exactly ``nearest(grid[g] u)`` for
    one ``g``: the same float32 products and comparisons as the torch path.

    Fills ``indices``, ``alignment`` ``<u, c[idx]>``, ``energy`` ``|c[idx]|^2`` and, if it has
    rows, ``residual`` ``u - a c[idx]`` with the least-squares ``a = alignment / energy``.
    """
    rows, dim = rotated.shape
    points = grid.shape[0]
    keep_residual = residual.shape[0] > 0
    inv_step = (points - 1) / (grid[points - 1] - grid[0])
    for block in prange((rows + _SEARCH_BLOCK - 1) // _SEARCH_BLOCK):
        step_dot = np.empty(points, np.float64)
        step_energy = np.empty(points, np.float64)
        keys = np.empty(points, np.float64)
        for r in range(block * _SEARCH_BLOCK, min(rows, (block + 1) * _SEARCH_BLOCK)):
            scale = inverse_norms[r]
            step_dot[:] = 0.0
            step_energy[:] = 0.0
            dot = 0.0
            norm2 = 0.0
            for j in range(extra):
                value = rotated[r, j] * scale
                level = _add_crossings(value, bounds_hi, levels_hi, grid, inv_step, step_dot, step_energy)
                dot += np.float64(value) * level
                norm2 += level * level
            for j in range(extra, dim):
                value = rotated[r, j] * scale
                level = _add_crossings(value, bounds_lo, levels_lo, grid, inv_step, step_dot, step_energy)
                dot += np.float64(value) * level
                norm2 += level * level
            for g in range(points):
                dot += step_dot[g]
                norm2 += step_energy[g]
                keys[g] = dot * abs(dot) / max(norm2, 1e-300)
            best = _tied_best(keys, start)
            t = grid[best]
            total = np.float32(0.0)
            total2 = np.float32(0.0)
            for j in range(dim):
                value = rotated[r, j] * scale
                if j < extra:
                    index = _nearest(t * value, bounds_hi)
                    level = levels_hi[index]
                else:
                    index = _nearest(t * value, bounds_lo)
                    level = levels_lo[index]
                indices[r, j] = index
                total += value * level
                total2 += level * level
            alignment[r] = total
            energy[r] = total2
            if keep_residual:
                a = total / max(total2, np.float32(1e-30))
                for j in range(dim):
                    value = rotated[r, j] * scale
                    level = levels_hi[indices[r, j]] if j < extra else levels_lo[indices[r, j]]
                    residual[r, j] = value - a * level
