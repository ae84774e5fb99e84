"""Seeded synthetic datasets (Gaussian, anisotropic Gaussian, Gaussian mixture, SIFT-like) with exact ground truth.

Names round-trip through `load_dataset`:
``synthetic-{kind}-{dim}-{metric}[-raw][-n{n}][-q{n_queries}]``, e.g. "synthetic-gaussian-128-ip"
(10,000 vectors and 100 queries unless -n/-q say otherwise; "-raw" skips normalisation; seed 0).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np

from .dataset import METRIC_TO_DISTANCE, Dataset
from .groundtruth import METRICS, exact_knn

CLUSTER_SPREAD = 0.5  # std of a mixture component around its centre (centres have std 1)


def _gaussian(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    """Isotropic N(0, I)."""
    return rng.standard_normal((rows, dim), dtype=np.float32)


def _anisotropic(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    """N(0, C) with C = Q diag(1 / (i + 1)) Q^T, Q a random rotation: a few directions dominate."""
    g = rng.standard_normal((dim, dim))
    q, r = np.linalg.qr(g)
    q *= np.sign(np.diag(r))  # Haar-distributed rotation
    scale = 1.0 / np.sqrt(np.arange(1, dim + 1))
    z = rng.standard_normal((rows, dim), dtype=np.float32)
    return (z * scale.astype(np.float32)) @ q.T.astype(np.float32)


def _clustered(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    """Mixture of min(100, rows // 100) (at least 1) equally likely Gaussians around N(0, I) centres."""
    n_clusters = max(1, min(100, rows // 100))
    centres = rng.standard_normal((n_clusters, dim), dtype=np.float32)
    labels = rng.integers(n_clusters, size=rows)
    return centres[labels] + CLUSTER_SPREAD * rng.standard_normal((rows, dim), dtype=np.float32)


def _siftlike(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    """Non-negative integer histograms made the way SIFT descriptors are (Lowe 2004, section 6.1).

    Raw gradient histograms: a mixture of min(100, rows // 100) sparse non-negative centres
    (Gamma(0.5)) times per-entry Gamma(2, 1/2) noise. Then SIFT's own steps: normalise to unit
    length, clip at 0.2, normalise again, scale by 512 and round down to integers in [0, 255].
    Every row ends near norm 512 with all entries >= 0: far from the origin, where L2 and inner
    product rank differently.
    """
    n_clusters = max(1, min(100, rows // 100))
    centres = rng.gamma(0.5, 1.0, size=(n_clusters, dim)).astype(np.float32)
    x = centres[rng.integers(n_clusters, size=rows)] * rng.gamma(2.0, 0.5, size=(rows, dim)).astype(np.float32)
    for _ in range(2):  # normalise, clip at 0.2, normalise again
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float32).tiny)
        np.minimum(x, 0.2, out=x)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float32).tiny)
    return np.minimum(np.floor(512 * x), 255).astype(np.float32)


_SAMPLERS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "gaussian": _gaussian,
    "anisotropic": _anisotropic,
    "clustered": _clustered,
    "siftlike": _siftlike,
}
KINDS = tuple(_SAMPLERS)

_NAME = re.compile(
    rf"synthetic-(?P<kind>{'|'.join(KINDS)})-(?P<dim>\d+)-(?P<metric>{'|'.join(METRICS)})"
    r"(?P<raw>-raw)?(?:-n(?P<n>\d+))?(?:-q(?P<n_queries>\d+))?"
)


def synthetic_name(kind: str, n: int, n_queries: int, dim: int, metric: str, normalize: bool) -> str:
    """The name under which `load_dataset` rebuilds this dataset (seed 0, k = 100)."""
    return f"synthetic-{kind}-{dim}-{metric}{'' if normalize else '-raw'}-n{n}-q{n_queries}"


def parse_synthetic_name(name: str) -> dict[str, Any] | None:
    """`make_synthetic` keyword arguments for a synthetic name, or None if it is not one."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    return {
        "kind": match["kind"],
        "n": int(match["n"] or 10_000),
        "n_queries": int(match["n_queries"] or 100),
        "dim": int(match["dim"]),
        "metric": match["metric"],
        "normalize": match["raw"] is None,
    }


def make_synthetic(
    kind: str,
    n: int,
    n_queries: int,
    dim: int,
    *,
    metric: str = "ip",
    normalize: bool = True,
    k: int = 100,
    seed: int = 0,
    progress: bool = True,
) -> Dataset:
    """A deterministic synthetic dataset: train float32 (n, dim), test float32 (n_queries, dim).

    kind: "gaussian" (isotropic), "anisotropic" (decaying spectrum 1/(i+1) in a random basis,
    like real embeddings), "clustered" (Gaussian mixture) or "siftlike" (non-negative integer
    histograms made like SIFT descriptors; use ``normalize=False``, "-raw" in a name, to keep them). Queries are drawn from the same
    distribution as the vectors but are not among them. normalize: project every row to the
    unit sphere. Ground truth: exact top-min(k, n) for ``metric``.
    """
    if kind not in _SAMPLERS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    sizes = {"n": n, "n_queries": n_queries, "dim": dim, "k": k, "seed": seed}
    wrong = [f"{name}={value!r}" for name, value in sizes.items() if isinstance(value, bool) or not isinstance(value, (int, np.integer))]
    if wrong:
        raise TypeError(f"n, n_queries, dim, k and seed must be integers; got {', '.join(wrong)}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if min(n, n_queries, dim, k) < 1:
        raise ValueError(f"n, n_queries, dim and k must be positive; got {n}, {n_queries}, {dim}, {k}")
    x = _SAMPLERS[kind](np.random.default_rng(seed), n + n_queries, dim)
    if normalize:
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float32).tiny)
    train, test = np.ascontiguousarray(x[:n]), np.ascontiguousarray(x[n:])
    distances, neighbors = exact_knn(train, test, min(k, n), metric, progress=progress)
    return Dataset(
        name=synthetic_name(kind, n, n_queries, dim, metric, normalize),
        train=train,
        test=test,
        neighbors=neighbors,
        distances=distances,
        distance=METRIC_TO_DISTANCE[metric],
    )
