"""Exact k-nearest neighbours by brute force (chunked, bounded memory) and recall measures."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from tqindex._arrays import as_float32, unit_rows

METRICS = ("ip", "angular", "euclidean")


def _as_float32(a: np.ndarray, name: str, first_row: int = 0) -> torch.Tensor:
    """Rows of ``a`` as a float32 tensor; ValueError naming row ``first_row + i`` if one holds
    NaN, inf or a value beyond the float32 range."""
    return torch.from_numpy(np.ascontiguousarray(as_float32(a, name, first_row)))


def _as_matrix(a: object, name: str) -> np.ndarray:
    """``a`` as an array-like of numbers (numpy, memmap, h5py dataset; lists are converted)."""
    if not (hasattr(a, "ndim") and hasattr(a, "dtype")):
        a = np.asarray(a)
    if np.dtype(a.dtype).kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    return a


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def exact_knn(
    train: np.ndarray,
    test: np.ndarray,
    k: int,
    metric: str = "ip",
    *,
    chunk_rows: int = 16384,
    query_rows: int = 1024,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each query over ``train``, the ground truth of a benchmark.

    train: (n, d), read ``chunk_rows`` rows at a time (a memmap or h5py dataset works);
    test: (m, d). Scores are float32 matmuls of ``query_rows`` queries against one chunk,
    merged into a running top-k, so memory stays near ``query_rows * chunk_rows`` floats.
    ValueError naming the row for NaN, inf or values beyond float32 in either, and for a query
    whose scores overflow float32 ("angular" is exact at any magnitude: rows are normalised
    after an exact rescale).

    Returns (distances float32 (m, k), neighbors int64 (m, k)), best first, in the
    ann-benchmarks convention: "ip" inner products, largest first; "angular" cosine
    distance 1 - cos, smallest first; "euclidean" L2 distance (not squared), smallest first.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    train, test = _as_matrix(train, "train"), _as_matrix(test, "test")
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(f"train (n, d) and test (m, d) must share d; got {train.shape}, {test.shape}")
    n = train.shape[0]
    if not _is_int(k) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, n={n}], got {k!r}")
    if chunk_rows < 1 or query_rows < 1:
        raise ValueError("chunk_rows and query_rows must be positive")

    q = _as_float32(test, "test")
    if metric == "angular":
        q = unit_rows(q)
    m = q.shape[0]
    # Scores are "larger is better": q.x, or q.x - |x|^2 / 2 for euclidean (same order as -|q-x|).
    best_s = torch.full((m, k), -torch.inf)
    best_i = torch.full((m, k), -1, dtype=torch.int64)
    for start in tqdm(range(0, n, chunk_rows), desc="exact kNN", unit="chunk", disable=not progress):
        x = _as_float32(train[start : start + chunk_rows], "train", start)
        if metric == "angular":
            x = unit_rows(x)
        half_sq_norm = (x * x).sum(dim=1) / 2 if metric == "euclidean" else None
        for qs in range(0, m, query_rows):
            qe = min(qs + query_rows, m)
            s = q[qs:qe] @ x.T
            if half_sq_norm is not None:
                s -= half_sq_norm
            if not bool(torch.isfinite(s).all()):
                row = qs + int(torch.nonzero(~torch.isfinite(s).all(dim=1))[0, 0])
                raise ValueError(f"test row {row}: its scores against train rows {start}.. overflow float32: scale the vectors down")
            top_s, top_i = s.topk(min(k, s.shape[1]), dim=1)
            merged_s = torch.cat([best_s[qs:qe], top_s], dim=1)
            merged_i = torch.cat([best_i[qs:qe], top_i + start], dim=1)
            best_s[qs:qe], pos = merged_s.topk(k, dim=1)
            best_i[qs:qe] = merged_i.gather(1, pos)

    if metric == "ip":
        dist = best_s
    elif metric == "angular":
        dist = 1.0 - best_s
    else:  # |q - x|^2 = |q|^2 - 2 (q.x - |x|^2 / 2)
        dist = ((q * q).sum(dim=1, keepdim=True) - 2.0 * best_s).clamp_min(0.0).sqrt()
    return dist.numpy().astype(np.float32, copy=False), best_i.numpy()


def _check_ids(neighbors_true: np.ndarray, found: np.ndarray, k: int, k_true: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k_true`` true ids and the first ``k`` found ids, as int64 (m, *)."""
    t, f = np.asarray(neighbors_true), np.asarray(found)
    if t.ndim != 2 or f.ndim != 2 or t.shape[0] != f.shape[0]:
        raise ValueError(f"need two (m, *) id arrays with the same m; got {t.shape}, {f.shape}")
    if t.shape[0] == 0:
        raise ValueError("need at least one query: the id arrays have no rows")
    if t.dtype.kind not in "iu" or f.dtype.kind not in "iu":
        raise TypeError(f"ids must be integers, got dtypes {t.dtype} and {f.dtype}")
    if not _is_int(k) or k < 1 or k > f.shape[1] or k_true > t.shape[1]:
        raise ValueError(f"k={k!r} does not fit true ids {t.shape} and found ids {f.shape}")
    return t[:, :k_true].astype(np.int64), f[:, :k].astype(np.int64)


def recall_at(neighbors_true: np.ndarray, neighbors_found: np.ndarray, k: int) -> float:
    """k-recall@k: mean over queries of |true[:, :k] & found[:, :k]| / k (10-recall@10 for k=10).

    Both are int (m, >=k) id arrays; ids repeated in ``found`` or padding (-1) never count twice.
    """
    t, f = _check_ids(neighbors_true, neighbors_found, k, k)
    # Key each id by its query row, then ask which true (row, id) pairs were found.
    base = max(int(t.max()), int(f.max())) + 2
    rows = np.arange(t.shape[0], dtype=np.int64)[:, None] * base
    hits = np.isin(rows + t + 1, rows + f + 1)
    return float(hits.sum() / hits.size)


def recall_1_at(neighbors_true: np.ndarray, found: np.ndarray, k: int) -> float:
    """1-recall@k: fraction of queries whose true nearest neighbour is in found[:, :k]."""
    t, f = _check_ids(neighbors_true, found, k, 1)
    return float((f == t).any(axis=1).mean())
