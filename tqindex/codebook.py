"""Lloyd-Max scalar codebooks for one coordinate of a uniform point on the unit sphere.

After a random rotation, each coordinate ``t`` of a unit vector in ``R^d`` has density

    f_d(t) = Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2)) * (1 - t^2)^((d-3)/2),  t in [-1, 1],

whatever the data. The codebook for ``b`` bits is the set of ``2^b`` levels minimising
``E[(t - c(t))^2]`` under ``f_d``: it depends only on ``(d, b)``, so it is computed once
(numerically, on a fine grid) and cached. Nothing is trained.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_GRID_POINTS = 1 << 17
_MAX_ITERATIONS = 20_000
_TOLERANCE = 1e-12


def _grid(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A grid over the support that carries all but ~1e-30 of f_d's mass, and its weights.

    Returns ``(t, w)``: float64 arrays of shape ``(_GRID_POINTS,)``, ``w`` summing to 1.
    """
    if dim == 2:
        # arcsine law: put the grid on the angle so the endpoint singularities are exact.
        theta = (np.arange(_GRID_POINTS) + 0.5) * (np.pi / _GRID_POINTS)
        return np.cos(theta)[::-1].copy(), np.full(_GRID_POINTS, 1.0 / _GRID_POINTS)
    half_width = min(1.0, 12.0 / np.sqrt(dim))
    edges = np.linspace(-half_width, half_width, _GRID_POINTS + 1)
    t = 0.5 * (edges[1:] + edges[:-1])
    log_density = 0.5 * (dim - 3) * np.log1p(-(t * t))
    w = np.exp(log_density - log_density.max())
    return t, w / w.sum()


@lru_cache(maxsize=None)
def _lloyd_max(dim: int, bits: int) -> np.ndarray:
    levels = 1 << bits
    t, w = _grid(dim)
    cum_w = np.concatenate([[0.0], np.cumsum(w)])
    cum_wt = np.concatenate([[0.0], np.cumsum(w * t)])
    # start from the quantile midpoints of each equal-mass cell
    centroids = np.interp((np.arange(levels) + 0.5) / levels, cum_w[1:], t)
    for _ in range(_MAX_ITERATIONS):
        boundaries = 0.5 * (centroids[1:] + centroids[:-1])
        cuts = np.concatenate([[0], np.searchsorted(t, boundaries), [t.size]])
        mass = cum_w[cuts[1:]] - cum_w[cuts[:-1]]
        moment = cum_wt[cuts[1:]] - cum_wt[cuts[:-1]]
        updated = np.where(mass > 0, moment / np.maximum(mass, 1e-300), centroids)
        # the law is symmetric: keep the codebook exactly antisymmetric
        updated = 0.5 * (updated - updated[::-1])
        shift = np.max(np.abs(updated - centroids))
        centroids = updated
        if shift < _TOLERANCE:
            break
    return centroids


def lloyd_max_codebook(dim: int, bits: int) -> np.ndarray:
    """Lloyd-Max levels for one rotated coordinate of a unit vector in ``R^dim``.

    Args:
        dim: the dimension of the (rotated) space, >= 2.
        bits: bits per coordinate, 0..8; 0 bits gives the single level ``[0.0]``.

    Returns:
        float64 array of shape ``(2**bits,)``, strictly increasing and antisymmetric.
    """
    if not isinstance(dim, (int, np.integer)) or dim < 2:
        raise ValueError(f"codebook dimension must be an integer >= 2, got {dim!r}")
    if not isinstance(bits, (int, np.integer)) or not 0 <= bits <= 8:
        raise ValueError(f"codebook bits must be an integer in 0..8, got {bits!r}")
    if bits == 0:
        return np.zeros(1)
    return _lloyd_max(int(dim), int(bits)).copy()


def expected_distortion(dim: int, bits: int) -> float:
    """``E[(t - c(t))^2]`` for one coordinate under ``f_dim`` with the Lloyd-Max codebook.

    Multiply by ``dim`` for the expected squared error of a reconstructed unit vector.
    """
    centroids = lloyd_max_codebook(dim, bits)
    t, w = _grid(dim)
    boundaries = 0.5 * (centroids[1:] + centroids[:-1])
    nearest = centroids[np.searchsorted(boundaries, t)]
    return float(np.sum(w * (t - nearest) ** 2))
