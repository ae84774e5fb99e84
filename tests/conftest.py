import os

# Triton kernels run in the interpreter on CPU tensors unless the environment says otherwise
# (TRITON_INTERPRET=0 on a GPU machine); it must be set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    """``n`` random unit vectors, float32 ``(n, dim)``."""
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def kmeans(x: np.ndarray, nlist: int, seed: int = 0, niter: int = 10) -> np.ndarray:
    """Lloyd's k-means (L2) from ``nlist`` distinct rows of ``x``: float32 ``(nlist, dim)``
    centroids for IVF tests that need lists but not FAISS's training (the oldest environment has
    no faiss; tests of ``TurboQuantIVFIndex.train`` itself import it)."""
    centroids = x[np.random.default_rng(seed).choice(len(x), nlist, replace=False)].astype(np.float64)
    for _ in range(niter):
        nearest = np.argmin((centroids**2).sum(axis=1) - 2 * x @ centroids.T, axis=1)
        for j in np.unique(nearest):
            centroids[j] = x[nearest == j].mean(axis=0)
    return centroids.astype(np.float32)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def one_thread():
    """Torch and numba on one thread: for tests of many tiny calls, which a busy machine otherwise
    slows tenfold with thread-pool waits."""
    import numba

    threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    numba.set_num_threads(numba_threads)
