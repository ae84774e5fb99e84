"""The look-up-table CPU scan, for a few queries at a time (numba).

Coordinates are taken in *groups*: the coordinates of one byte of the widest index field (4 at 2
bits, 2 at 4 bits). A group's bits in every field form a key of ``group * bits`` bits (one byte
for 1, 2, 4 and 8 bits; 12 bits for 3 or 2.5 bits: a 2-bit byte plus a 1-bit nibble), and a
query's score is a sum of one table entry per group: ``T[g, key]`` = the group's partial dot
product with the rotated query. So a row costs one look-up per group, from tables that sit in
cache, instead of a decode to floats. The QJL sign bytes of ``prod`` have tables of their own
(one per byte) and the row's second factor. Layouts whose keys would exceed 12 bits (7 bits,
3.5 bits) are left to the GEMM scan. Three kernels: one key per byte (one index field), a
whole byte plus a few bits of a second field (two fields), and a loop over fields (three).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch
from numba import njit, prange

from tqindex.codec import TurboQuantCodec
from tqindex.packing import BitLayout, Field

_MAX_KEY_BITS = 12


@dataclass(frozen=True)
class _Groups:
    """How a layout's index bits are read group by group (see module docstring)."""

    size: int  # coordinates per group
    count: int  # groups per row
    key_bits: int
    fields: tuple[Field, ...]
    key_shifts: tuple[int, ...]  # where each field's bits sit in the key


def _groups(layout: BitLayout) -> _Groups | None:
    fields = layout.index_fields
    if not fields:
        return _Groups(1, 0, 0, (), ())
    size = fields[0].per_byte
    shifts = tuple(int(s) for s in np.cumsum([0] + [size * f.width for f in fields])[:-1])
    key_bits = size * sum(f.width for f in fields)
    if key_bits > _MAX_KEY_BITS:
        return None
    return _Groups(size, -(-layout.dim // size), key_bits, fields, shifts)


def supports(layout: BitLayout) -> bool:
    """True when the layout's group keys fit the tables (all widths but 7 bits and x.5 above 3)."""
    return _groups(layout) is not None


def _group_values(codec: TurboQuantCodec, groups: _Groups) -> torch.Tensor:
    """Level of every coordinate of every group for every key: float32 ``(count, size, 2**key_bits)``."""
    keys = torch.arange(1 << groups.key_bits)
    coords = torch.arange(groups.count * groups.size).view(groups.count, groups.size)
    index = torch.zeros((groups.count, groups.size, keys.numel()), dtype=torch.int64)
    for field, key_shift in zip(groups.fields, groups.key_shifts):
        slot_shift = key_shift + torch.arange(groups.size) * field.width
        bits = (keys[None, :] >> slot_shift[:, None]) & ((1 << field.width) - 1)
        covered = coords < field.stop  # a field's bits exist only for its prefix of coordinates
        index += covered[:, :, None] * (bits[None] << field.shift)
    offsets = torch.zeros(coords.numel(), dtype=torch.int64)
    offsets[: codec.rotated_dim] = codec.level_offsets
    return codec.levels[index + offsets.view_as(coords)[:, :, None]]


def _padded(queries: torch.Tensor, width: int) -> torch.Tensor:
    out = torch.zeros((queries.shape[0], width), dtype=torch.float32)
    out[:, : queries.shape[1]] = queries
    return out


class LutScanner:
    """Scores chunks by table look-ups; ``prepare`` builds the tables once per search."""

    def __init__(self, codec: TurboQuantCodec):
        groups = _groups(codec.layout)
        if groups is None:
            raise ValueError(f"the look-up-table scan needs keys of <= {_MAX_KEY_BITS} bits; {codec.config.bits} bits gives more")
        self.codec, self._groups = codec, groups
        self._values = _group_values(codec, groups) if groups.count else None
        fields = groups.fields
        self._field_params = np.array(
            [[f.offset, f.width, -(-f.stop // groups.size), s] for f, s in zip(fields, groups.key_shifts)], dtype=np.int64
        ).reshape(-1, 4)
        sign = codec.layout.sign_field
        #: first sign byte, which is also the count of index bytes (code_bytes without signs)
        self._sign_offset = sign.offset if sign is not None else codec.code_bytes
        signs = torch.tensor([-1.0, 1.0])[(torch.arange(256)[:, None] >> torch.arange(8)) & 1]  # (256, 8)
        self._sign_values = signs if sign is not None else None
        #: one key per byte (1, 2, 4, 8 bits): index and sign bytes share one table array and the
        #: byte kernel, ~3x faster than the grouped kernel on the same tables (measured)
        self._per_byte = len(fields) <= 1
        #: (second field's offset, its bits per group, groups it covers) where two index fields have
        #: the first give each group a whole byte: the straight-line kernel
        self._byte_and_bits = None
        if len(fields) == 2 and fields[0].offset == 0 and groups.size * fields[0].width == 8:
            self._byte_and_bits = (fields[1].offset, groups.size * fields[1].width, -(-fields[1].stop // groups.size))

    def prepare(self, rotated_queries: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Tables for rotated queries ``(m, W)``.

        Per-byte layouts: float32 ``(m, code_bytes, 256)`` and None. Others: index tables
        ``(m, groups, 2**key_bits)`` and sign tables ``(m, sign_bytes, 256)``.
        """
        queries, dim, groups = rotated_queries.cpu(), self.codec.rotated_dim, self._groups
        m = queries.shape[0]
        index = np.zeros((m, groups.count, 1 << max(groups.key_bits, 8)), dtype=np.float32)  # 0 index bits: no groups
        if self._values is not None:
            grouped = _padded(queries[:, :dim], groups.count * groups.size).view(m, groups.count, groups.size)
            index = torch.einsum("mgs,gsk->mgk", grouped, self._values).contiguous().numpy()
        signs = np.zeros((m, 0, 256), dtype=np.float32)
        if self._sign_values is not None:
            nbytes = self.codec.code_bytes - self._sign_offset
            grouped = _padded(queries[:, dim:], nbytes * 8).view(m, nbytes, 8)
            signs = torch.einsum("mjs,vs->mjv", grouped, self._sign_values).contiguous().numpy()
        if self._per_byte:
            return np.ascontiguousarray(np.concatenate([index, signs], axis=1)), None
        return index, signs

    def chunk_topk(
        self,
        tables: tuple[np.ndarray, np.ndarray | None],
        packed: torch.Tensor,
        factors: torch.Tensor,
        valid: torch.Tensor | None,
        k: int,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Best ``k`` rows of the chunk per query by score + ``bias`` (float32 ``(n,)`` or None):
        float32 ``(m, k)`` and chunk-local int64 rows ``(m, k)``."""
        index, signs = tables
        scores = np.empty((index.shape[0], packed.shape[0]), dtype=np.float32)
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        if signs is None:
            _scan_bytes(packed.numpy(), index, factors.numpy(), index_bytes=self._sign_offset, out=scores)
        elif self._byte_and_bits is not None:
            _scan_byte_and_bits(packed.numpy(), index, signs, factors.numpy(), *self._byte_and_bits, self._sign_offset, scores)
        else:
            _scan_groups(packed.numpy(), index, signs, factors.numpy(), self._groups.size, self._field_params, self._sign_offset, scores)
        result = torch.from_numpy(scores)
        if bias is not None:
            result += bias
        if valid is not None:
            result.masked_fill_(~valid, float("-inf"))
        return result.topk(min(k, result.shape[1]), dim=1)


@njit(parallel=True, fastmath=True, cache=True)
def _scan_bytes(codes, tables, factors, index_bytes, out):  # pragma: no cover - compiled
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


@njit(inline="always", fastmath=True)
def _finish_row(index_sum, sign_tables, i, codes, r, sign_offset, factors):  # pragma: no cover - compiled
    """Row ``r``'s score for query ``i``: ``f0 * index_sum`` plus ``f1 *`` its QJL sign bytes' table entries."""
    score = index_sum * factors[r, 0]
    if sign_tables.shape[1]:
        sign_sum = np.float32(0.0)
        for j in range(sign_tables.shape[1]):
            sign_sum += sign_tables[i, j, codes[r, sign_offset + j]]
        score += sign_sum * factors[r, 1]
    return score


@njit(parallel=True, fastmath=True, cache=True)
def _scan_groups(codes, index_tables, sign_tables, factors, group, fields, sign_offset, out):  # pragma: no cover - compiled
    """out[i, r] = f0[r] * sum_g T[i, g, key(r, g)] + f1[r] * sum_j S[i, j, codes[r, sign_offset + j]].

    ``fields``: int64 ``(F, 4)`` rows of (byte offset, width, groups covered, key shift).
    """
    rows = codes.shape[0]
    queries, groups = index_tables.shape[0], index_tables.shape[1]
    for r in prange(rows):
        for i in range(queries):
            index_sum = np.float32(0.0)
            for g in range(groups):
                key = 0
                for f in range(fields.shape[0]):
                    if g < fields[f, 2]:
                        bit = g * group * fields[f, 1]
                        part = (codes[r, fields[f, 0] + (bit >> 3)] >> (bit & 7)) & ((1 << (group * fields[f, 1])) - 1)
                        key |= part << fields[f, 3]
                index_sum += index_tables[i, g, key]
            out[i, r] = _finish_row(index_sum, sign_tables, i, codes, r, sign_offset, factors)


@njit(parallel=True, fastmath=True, cache=True)
def _scan_byte_and_bits(codes, index_tables, sign_tables, factors, second_offset, second_bits, covered, sign_offset, out):  # pragma: no cover - compiled
    """``_scan_groups`` for two index fields where the first gives each group one whole byte
    (3, 2.5, 5 and 6 bits), in straight-line code (1.4x the generic loop over fields, measured).

    Group ``g``'s key: byte ``g`` | its ``second_bits`` bits of the second field (bytes from
    ``second_offset``) << 8, for the ``covered`` groups the second field reaches; byte ``g`` alone after.
    """
    rows = codes.shape[0]
    queries, groups = index_tables.shape[0], index_tables.shape[1]
    per_byte = 8 // second_bits
    mask = (1 << second_bits) - 1
    for r in prange(rows):
        for i in range(queries):
            index_sum = np.float32(0.0)
            for g in range(covered):
                high = (codes[r, second_offset + g // per_byte] >> ((g % per_byte) * second_bits)) & mask
                index_sum += index_tables[i, g, codes[r, g] | (high << 8)]
            for g in range(covered, groups):
                index_sum += index_tables[i, g, codes[r, g]]
            out[i, r] = _finish_row(index_sum, sign_tables, i, codes, r, sign_offset, factors)
