"""tqindex as an ann-benchmarks algorithm (``ann_benchmarks/algorithms/tqindex/module.py``).

``TurboQuant(metric, bits, variant, scale)`` wraps `tqindex.TurboQuantIndex`: exhaustive
search over b-bit TurboQuant codes. ann-benchmarks' "angular" runs in cosine mode; "dot" / "ip"
in inner-product mode; "euclidean" with ``metric="l2"``. The one query argument, ``chunk_rows``,
sets how many rows each scan step covers (speed only).
"""

from __future__ import annotations

from typing import Any

import numpy as np

import tqindex

try:
    from ann_benchmarks.algorithms.base.module import BaseANN
except ImportError:  # outside an ann-benchmarks checkout: the same interface, minimal defaults

    class BaseANN:  # type: ignore[no-redef]
        """Stand-in for ann-benchmarks' ``BaseANN`` with its interface."""

        name = "BaseANN"

        def done(self) -> None:
            pass

        def get_memory_usage(self) -> float | None:
            return None

        def fit(self, X: np.ndarray) -> None:
            pass

        def query(self, q: np.ndarray, n: int) -> np.ndarray:
            return np.empty(0, dtype=np.int64)

        def batch_query(self, X: np.ndarray, n: int) -> None:
            self.res = [self.query(q, n) for q in X]

        def get_batch_results(self) -> Any:
            return self.res

        def get_additional(self) -> dict[str, Any]:
            return {}

        def __str__(self) -> str:
            return self.name


METRICS = {"angular": "cosine", "euclidean": "l2", "dot": "ip", "ip": "ip"}  # ann-benchmarks distance -> tqindex metric


class TurboQuant(BaseANN):
    """Exhaustive search over ``bits``-bit TurboQuant codes (see `tqindex.TurboQuantIndex`)."""

    def __init__(self, metric: str, bits: float, variant: str = "mse", scale: str = "auto", seed: int = 0):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
        self._metric, self._bits, self._variant, self._scale, self._seed = METRICS[metric], bits, variant, scale, seed
        self._chunk_rows: int | None = None
        self.index: tqindex.TurboQuantIndex | None = None
        self.name = f"tqindex(bits={bits:g}, variant={variant}, scale={scale})"

    def fit(self, X: np.ndarray) -> None:
        self.index = tqindex.TurboQuantIndex(
            X.shape[1], self._bits, metric=self._metric, variant=self._variant, scale=self._scale, seed=self._seed
        )
        self.index.add(np.ascontiguousarray(X, dtype=np.float32), progress=False)

    def set_query_arguments(self, chunk_rows: int) -> None:
        """Rows scanned per step: trades memory per search for fewer, larger matrix products."""
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
        self._chunk_rows = chunk_rows
        self._fitted().chunk_rows = chunk_rows

    def query(self, q: np.ndarray, n: int) -> np.ndarray:
        _, ids = self._fitted().search(np.asarray(q, dtype=np.float32)[None, :], n)
        return ids[0][ids[0] >= 0]

    def batch_query(self, X: np.ndarray, n: int) -> None:
        _, self.res = self._fitted().search(np.ascontiguousarray(X, dtype=np.float32), n)

    def get_batch_results(self) -> list[np.ndarray]:
        return [row[row >= 0] for row in self.res]

    def get_memory_usage(self) -> float:
        """kB this index holds in RAM (0 before ``fit``): ann-benchmarks' index size is the growth over ``fit``."""
        return 0.0 if self.index is None else self.index.memory_usage() / 1024

    def get_additional(self) -> dict[str, Any]:
        return {"bytes_per_vector": self._fitted().bytes_per_vector}

    def done(self) -> None:
        if self.index is not None:
            self.index.close()

    def _fitted(self) -> tqindex.TurboQuantIndex:
        if self.index is None:
            raise RuntimeError("call fit(X) first")
        return self.index

    def __str__(self) -> str:
        return self.name if self._chunk_rows is None else f"{self.name[:-1]}, chunk_rows={self._chunk_rows})"
