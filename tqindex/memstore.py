"""Columns held in RAM, with the reading, appending and commit interface of `storage.ColumnStore`.

An index made without a path keeps its rows here; `save` copies them into a ColumnStore. As on
disk, appended rows count once committed, and `rollback` drops the rest (a failed write changes
nothing). Holds only numpy arrays: it pickles and copies.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tqindex.errors import StorageError
from tqindex.storage import ColumnSpec


class _GrowingArray:
    """Rows appended to a numpy array that doubles its capacity when full; ``rows`` committed, ``pending`` appended."""

    def __init__(self, spec: ColumnSpec):
        self._data = np.empty((0, *spec.row_shape), dtype=np.dtype(spec.dtype))
        self.rows = self.pending = 0

    def append(self, values: np.ndarray) -> None:
        needed = self.pending + len(values)
        if needed > len(self._data):
            grown = np.empty((max(needed, 2 * len(self._data), 1024), *self._data.shape[1:]), self._data.dtype)
            grown[: self.pending] = self._data[: self.pending]
            self._data = grown
        self._data[self.pending : needed] = values
        self.pending = needed

    def rows_view(self, start: int, stop: int) -> np.ndarray:
        return self._data[start : min(stop, self.rows)]

    def view(self) -> np.ndarray:
        view = self._data[: self.rows]
        view.flags.writeable = False
        return view


class MemoryStore:
    """In-RAM twin of ColumnStore: `meta`, `fixed`, columns appended and read by name."""

    mode = "a"
    path = None

    def __init__(self, *, meta: dict[str, Any], fixed: dict[str, np.ndarray], columns: dict[str, ColumnSpec]):
        self.meta, self.fixed = meta, fixed
        self.columns = dict(columns)
        self._arrays = {name: _GrowingArray(spec) for name, spec in columns.items()}

    def rows(self, name: str) -> int:
        return self._arrays[name].rows

    def append(self, name: str, values: np.ndarray) -> None:
        spec = self.columns[name]
        values = np.asarray(values)
        if values.shape[1:] != tuple(spec.row_shape) or not np.can_cast(values.dtype, spec.dtype, casting="safe"):
            raise StorageError(f"column {name!r} takes {spec.dtype} rows of shape {spec.row_shape}, got {values.dtype} {values.shape}")
        self._arrays[name].append(values)

    def column(self, name: str) -> np.ndarray:
        """Read-only view of all rows, shape (rows, *row_shape)."""
        return self._arrays[name].view()

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) without a copy (for the scan; callers must not write to them)."""
        return self._arrays[name].rows_view(start, stop)

    def read_at(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Copies of the rows ``rows`` (int64 ``(u,)``), shape (u, *row_shape)."""
        return self._arrays[name].view()[rows]

    def commit(self) -> None:
        """Count the appended rows (nothing to make durable in RAM)."""
        for array in self._arrays.values():
            array.rows = array.pending

    def rollback(self) -> None:
        """Drop the rows appended since the last commit."""
        for array in self._arrays.values():
            array.pending = array.rows

    def close(self) -> None:
        """Nothing to release."""
