"""The `Dataset` record shared by every loader: vectors, queries and their exact neighbours."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ann-benchmarks' name for a distance -> tqindex's metric name.
DISTANCE_TO_METRIC: dict[str, str] = {"angular": "angular", "euclidean": "euclidean", "dot": "ip"}
METRIC_TO_DISTANCE: dict[str, str] = {m: d for d, m in DISTANCE_TO_METRIC.items()}


@dataclass(frozen=True, eq=False)
class Dataset:
    """A search benchmark in the ann-benchmarks layout.

    train: float32 (n, d) vectors to index; test: float32 (m, d) queries;
    neighbors: int64 (m, K) ids into train, best first; distances: float32 (m, K),
    in the ann-benchmarks convention of ``distance`` ("angular": 1 - cos,
    "euclidean": L2, "dot": inner product, largest first).
    """

    name: str
    train: np.ndarray
    test: np.ndarray
    neighbors: np.ndarray
    distances: np.ndarray
    distance: str

    @property
    def metric(self) -> str:
        """The tqindex metric: "ip", "angular" or "euclidean"."""
        return DISTANCE_TO_METRIC[self.distance]

    @property
    def dim(self) -> int:
        """Vector dimension d."""
        return int(self.train.shape[1])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={self.train.shape}, test={self.test.shape}, "
            f"k={self.neighbors.shape[1]}, distance={self.distance!r})"
        )
