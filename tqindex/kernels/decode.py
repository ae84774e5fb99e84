"""Decoding packed rows, chunk by chunk, into scaled level values ready for one matrix product.

A decoded row is ``f0 * c[idx]`` (``D`` values) and, for ``prod``, ``f1 * s`` with the QJL
signs ``s`` (``D`` more), so that ``scores = rotated_queries @ decoded.T`` is the codec's
estimator. Fields of width 1, 2, 4 or 8 that cover every coordinate decode with one table
look-up per byte (a 256-row table of the ``8 // width`` values that byte holds); other
layouts (3, 5, 6, 7 bits, fractional) unpack indices first and then look levels up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tqindex.codec import TurboQuantCodec
from tqindex.packing import Field


def _byte_table(field: Field, values: torch.Tensor) -> torch.Tensor:
    """``(256, per_byte)`` table: entry ``[byte, slot]`` = ``values[(byte >> slot*width) & mask]``."""
    byte = torch.arange(256)
    slots = torch.arange(field.per_byte) * field.width
    return values[(byte[:, None] >> slots) & ((1 << field.width) - 1)]


class ChunkDecoder:
    """Packed uint8 ``(n, code_bytes)`` + factors float32 ``(n, F)`` -> ``dtype`` ``(n, W)``."""

    def __init__(self, codec: TurboQuantCodec, dtype: torch.dtype = torch.bfloat16):
        self.codec, self.dtype = codec, dtype
        layout = codec.layout
        self.dim = layout.dim
        fields = layout.index_fields
        self._direct = len(fields) == 1 and fields[0].stop == layout.dim
        self._level_table = _byte_table(fields[0], codec.levels).to(dtype) if self._direct else None
        self._levels = codec.levels.to(dtype)[:, None]
        self._offsets = codec.level_offsets.to(torch.int32)
        sign = layout.sign_field
        self._sign_table = _byte_table(sign, torch.tensor([-1.0, 1.0])).to(dtype) if sign else None

    @property
    def width(self) -> int:
        """Values per decoded row: ``D``, or ``2 D`` with QJL signs."""
        return self.dim * (2 if self._sign_table is not None else 1)

    def __call__(self, packed: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        n, dim = packed.shape[0], self.dim
        out = torch.empty((n, self.width), dtype=self.dtype, device=packed.device)
        scale = factors.to(self.dtype)
        out[:, :dim] = self._levels_of(packed) * scale[:, :1]
        if self._sign_table is not None:
            out[:, dim:] = self._table_lookup(packed, self.codec.layout.sign_field, self._sign_table) * scale[:, 1:2]
        return out

    def _levels_of(self, packed: torch.Tensor) -> torch.Tensor:
        if self._direct:
            return self._table_lookup(packed, self.codec.layout.index_fields[0], self._level_table)
        if not self.codec.layout.index_fields:  # 0-bit indices: every level is 0
            return torch.zeros((packed.shape[0], self.dim), dtype=self.dtype, device=packed.device)
        indices = self.codec.layout.unpack_indices(packed).to(torch.int32) + self._offsets.to(packed.device)
        return F.embedding(indices, self._levels.to(packed.device)).squeeze(-1)

    def _table_lookup(self, packed: torch.Tensor, field: Field, table: torch.Tensor) -> torch.Tensor:
        block = packed[:, field.offset : field.offset + field.nbytes].to(torch.int32)
        values = F.embedding(block, table.to(packed.device)).reshape(packed.shape[0], -1)
        return values[:, : field.stop]
