"""The look-up-table CPU scan, for a few queries at a time (numba).

Each packed byte holds whole coordinates (layouts whose index bits form one field of width
1, 2, 4 or 8 over every coordinate, plus the QJL sign field of ``prod``), so a query's score
is a sum of one table entry per byte: ``T[j, byte]`` = the byte's partial dot product with the
rotated query. Per row that is ``code_bytes`` look-ups from tables that sit in cache, instead of
decoding the row to floats. Index bytes and sign bytes are summed apart and scaled by the row's
two factors. Used when there are few queries; many queries amortise a decode over one GEMM.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange

from tqindex.codec import TurboQuantCodec
from tqindex.packing import BitLayout, Field


def supports(layout: BitLayout) -> bool:
    """True when every byte of a packed row holds whole coordinates (1, 2, 4, 8 bits, no extra bits)."""
    fields = layout.index_fields
    return len(fields) == 0 or (len(fields) == 1 and fields[0].stop == layout.dim)


def _field_tables(field: Field, queries: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``(m, field.nbytes, 256)``: for byte ``j`` and value ``v``, sum over its slots of query * value of the slot's bits."""
    m, per_byte = queries.shape[0], field.per_byte
    padded = torch.zeros((m, field.nbytes * per_byte), dtype=torch.float32)
    padded[:, : field.stop] = queries[:, : field.stop]
    byte = torch.arange(256)
    slot_values = torch.stack([values[(byte >> (slot * field.width)) & ((1 << field.width) - 1)] for slot in range(per_byte)])
    return torch.einsum("mjs,sv->mjv", padded.view(m, field.nbytes, per_byte), slot_values.to(torch.float32))


def byte_tables(codec: TurboQuantCodec, rotated_queries: torch.Tensor) -> np.ndarray:
    """float32 ``(m, code_bytes, 256)`` tables for rotated queries ``(m, W)`` from ``codec.rotate_queries``."""
    layout, dim = codec.layout, codec.rotated_dim
    parts = [_field_tables(f, rotated_queries[:, :dim], codec.levels) for f in layout.index_fields]
    if layout.sign_field is not None:
        parts.append(_field_tables(layout.sign_field, rotated_queries[:, dim:], torch.tensor([-1.0, 1.0])))
    return torch.cat(parts, dim=1).contiguous().numpy()


@njit(parallel=True, fastmath=True, cache=True)
def _scan(codes, tables, factors, index_bytes, out):  # pragma: no cover - compiled
    """out[i, r] = f0[r] * sum_{j < index_bytes} T[i, j, codes[r, j]] + f1[r] * sum_{j >= index_bytes} (...)."""
    rows, nbytes = codes.shape
    queries = tables.shape[0]
    with_signs = factors.shape[1] > 1
    for r in prange(rows):
        for i in range(queries):
            index_sum = np.float32(0.0)
            for j in range(index_bytes):
                index_sum += tables[i, j, codes[r, j]]
            score = index_sum * factors[r, 0]
            if with_signs:
                sign_sum = np.float32(0.0)
                for j in range(index_bytes, nbytes):
                    sign_sum += tables[i, j, codes[r, j]]
                score += sign_sum * factors[r, 1]
            out[i, r] = score


class LutScanner:
    """Scores chunks by table look-ups; ``prepare`` builds the tables once per search."""

    def __init__(self, codec: TurboQuantCodec):
        if not supports(codec.layout):
            raise ValueError(f"the look-up-table scan needs 1, 2, 4 or 8 index bits, got {codec.config.bits}")
        self.codec = codec
        self._index_bytes = sum(f.nbytes for f in codec.layout.index_fields)

    def prepare(self, rotated_queries: torch.Tensor) -> np.ndarray:
        return byte_tables(self.codec, rotated_queries.cpu())

    def chunk_topk(
        self, tables: np.ndarray, packed: torch.Tensor, factors: torch.Tensor, valid: torch.Tensor | None, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Best ``k`` rows of the chunk per query: float32 ``(m, k)`` and chunk-local int64 rows ``(m, k)``."""
        scores = np.empty((tables.shape[0], packed.shape[0]), dtype=np.float32)
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        _scan(packed.numpy(), tables, factors.numpy(), self._index_bytes, scores)
        result = torch.from_numpy(scores)
        if valid is not None:
            result.masked_fill_(~valid, float("-inf"))
        return result.topk(min(k, result.shape[1]), dim=1)
