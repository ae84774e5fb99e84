"""Columns resident on a device (`TurboQuantIndex.to`), held with spare rows so that an add copies only its own.

Appending to exact-size tensors copies every row held (``torch.cat``): adding one vector to 100M rows
of 4-bit codes resident on a GPU moved 38 GB and needed room for both copies. Here the buffers grow
by a quarter when full (`GROWTH`), as FAISS's GPU vectors reserve ahead, and the index reads views
of the rows held. Copies and pickles take those rows, not the spare ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

#: a full buffer is regrown to this many times its rows (at least what the add needs)
GROWTH = 1.25


class ResidentColumns:
    """Tensors ``(rows, ...)`` on one device, one a column, in buffers of ``capacity`` rows.

    ``views``: the rows held, one tensor a column (views of the buffers, updated by `append` and
    `hold`; a view taken earlier keeps the rows it had). An add streams its rows into the spare
    ones (`reserve`, then `stage` batch by batch) and holds them once committed (`hold`).
    """

    def __init__(self, columns: Sequence[torch.Tensor]):
        self._buffers = tuple(columns)
        self.views = self._buffers

    @property
    def rows(self) -> int:
        return int(self.views[0].shape[0])

    @property
    def capacity(self) -> int:
        return int(self._buffers[0].shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes the buffers take, spare rows included."""
        return sum(b.numel() * b.element_size() for b in self._buffers)

    def append(self, new: Sequence[torch.Tensor]) -> None:
        """Rows ``new`` (one tensor a column, on the buffers' device) after those held."""
        rows = self.rows
        self.reserve(rows + int(new[0].shape[0]))
        self.stage(rows, new)
        self.hold(rows + int(new[0].shape[0]))

    def reserve(self, rows: int) -> None:
        """Room for ``rows`` rows: the buffers copied to larger ones (by `GROWTH` at least) only when full."""
        if rows > self.capacity:
            size = max(rows, int(self.capacity * GROWTH))
            grown = tuple(torch.empty((size, *b.shape[1:]), dtype=b.dtype, device=b.device) for b in self._buffers)
            for buffer, held in zip(grown, self.views):
                buffer[: self.rows] = held
            self._buffers = grown
            self.views = tuple(b[: self.rows] for b in grown)

    def stage(self, start: int, new: Sequence[torch.Tensor]) -> None:
        """Write rows ``new`` at ``start`` (at or past the rows held, within the capacity) without holding them yet."""
        stop = start + int(new[0].shape[0])
        if start < self.rows or stop > self.capacity:
            raise ValueError(f"rows [{start}, {stop}) are not spare: {self.rows} held, room for {self.capacity}")
        for buffer, added in zip(self._buffers, new):
            buffer[start:stop] = added

    def hold(self, rows: int) -> None:
        """Hold the first ``rows`` rows (fewer: the rest become spare; more: rows staged there)."""
        if rows > self.capacity:
            raise ValueError(f"cannot hold {rows} rows in room for {self.capacity}")
        self.views = tuple(b[:rows] for b in self._buffers)

    def __getstate__(self) -> dict[str, Any]:
        """The rows held, copied without the spare ones (a view would pickle its whole buffer)."""
        return {"views": tuple(v.clone() for v in self.views)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["views"])


__all__ = ["GROWTH", "ResidentColumns"]
