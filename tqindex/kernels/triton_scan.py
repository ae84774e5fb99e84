"""The Triton scan: one fused kernel from packed codes to a per-program top-k.

Grid: (query tiles of ``BLOCK_M``, row groups). A program owns ``BLOCK_M`` queries and a group
of ``tiles_per_program`` consecutive row tiles of ``BLOCK_N`` rows (programs that share a row
group run side by side, so a group's codes come from HBM once and from L2 for the other query
tiles). For each row tile it loops over the rotated coordinates in steps of ``BLOCK_D``: loads
the packed bytes, unpacks every field of the layout by shift and mask (``packing.py``), maps
indices to levels through ``codec.levels`` + ``codec.level_offsets``, and multiplies with the
query block on the tensor cores (``tl.dot``, fp32 accumulation); ``prod`` adds a second
product of the QJL queries with the sign bits as +-1. Decoded values never leave registers.
The per-vector factors scale the two sums, a per-row ``bias`` (where given) is added; rows past
the chunk or not ``valid`` score -inf.

Top-k in the kernel: each query keeps ``KP`` (score, row) slots, ``KP`` the power of two at or
above the wanted count. After a tile is scored, its best score replaces the weakest slot while
it beats it (an argmax over the tile and an argmin over the slots per step), so a tile costs as
many steps as it has rows that enter the running top-k: ``KP`` for the first tile, then fewer
and fewer as the threshold rises. Only ``KP`` candidates per query and program leave the
kernel; ``torch.topk`` over them (``groups * KP`` per query) gives the chunk's best ``k``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tqindex.codec import TurboQuantCodec

_PROGRAMS_PER_SM = 4
_INTERPRETER_PROGRAMS = 8
_MAX_GRID_Y = 65535


@triton.jit
def _field_values(row_ptrs, row_ok, cols, STOP: tl.constexpr, WIDTH: tl.constexpr, OFFSET: tl.constexpr):
    """Values of one field for coordinates ``cols`` ``(BLOCK_D,)`` of rows ``row_ptrs`` ``(1, BLOCK_N)``: int32 ``(BLOCK_D, BLOCK_N)``."""
    PER_BYTE: tl.constexpr = 8 // WIDTH
    mask = row_ok[None, :] & (cols < STOP)[:, None]
    byte = tl.load(row_ptrs + (OFFSET + cols // PER_BYTE)[:, None], mask=mask, other=0).to(tl.int32)
    return (byte >> ((cols % PER_BYTE) * WIDTH)[:, None]) & ((1 << WIDTH) - 1)


@triton.jit
def _tile_scores(
    queries_ptr, packed_ptr, factors_ptr, valid_ptr, bias_ptr, levels_ptr, level_offsets_ptr,
    rows, q_rows, q_ok, n_rows, stride_q, stride_p, stride_f,
    DIM: tl.constexpr, FIELDS: tl.constexpr, SIGN_OFFSET: tl.constexpr, HAS_VALID: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Scores of the query tile against rows ``(BLOCK_N,)``: float32 ``(BLOCK_M, BLOCK_N)``, -inf where excluded."""
    row_ok = rows < n_rows
    row_ptrs = packed_ptr + rows.to(tl.int64)[None, :] * stride_p
    q_ptrs = queries_ptr + q_rows.to(tl.int64)[:, None] * stride_q
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_signs = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, DIM, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < DIM
        q_mask = q_ok[:, None] & col_ok[None, :]
        q = tl.load(q_ptrs + cols[None, :], mask=q_mask, other=0.0)
        index = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.int32)
        for f in tl.static_range(len(FIELDS)):  # FIELDS[f] = (stop, width, shift, offset)
            index |= _field_values(row_ptrs, row_ok, cols, FIELDS[f][0], FIELDS[f][1], FIELDS[f][3]) << FIELDS[f][2]
        index += tl.load(level_offsets_ptr + cols, mask=col_ok, other=0)[:, None]
        levels = tl.load(levels_ptr + index)
        acc = tl.dot(q, levels.to(q.dtype), acc, input_precision=PRECISION)
        if SIGN_OFFSET >= 0:
            signs = _field_values(row_ptrs, row_ok, cols, DIM, 1, SIGN_OFFSET) * 2 - 1
            q_signs = tl.load(q_ptrs + DIM + cols[None, :], mask=q_mask, other=0.0)
            acc_signs = tl.dot(q_signs, signs.to(q.dtype), acc_signs, input_precision=PRECISION)
    scores = acc * tl.load(factors_ptr + rows * stride_f, mask=row_ok, other=0.0)[None, :]
    if SIGN_OFFSET >= 0:
        scores += acc_signs * tl.load(factors_ptr + rows * stride_f + 1, mask=row_ok, other=0.0)[None, :]
    if HAS_BIAS:
        scores += tl.load(bias_ptr + rows, mask=row_ok, other=0.0)[None, :]
    keep = row_ok
    if HAS_VALID:
        keep = keep & (tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0)
    return tl.where(q_ok[:, None] & keep[None, :], scores, float("-inf"))  # padding queries take no steps


@triton.jit
def _scan_kernel(
    queries_ptr, packed_ptr, factors_ptr, valid_ptr, bias_ptr, levels_ptr, level_offsets_ptr, out_scores_ptr, out_rows_ptr,
    n_rows, n_queries, tiles_per_program, stride_q, stride_p, stride_f,
    DIM: tl.constexpr, FIELDS: tl.constexpr, SIGN_OFFSET: tl.constexpr, HAS_VALID: tl.constexpr, HAS_BIAS: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Best ``KP`` (score, row) per query of the program's row group -> ``out[q, group, :]``, unordered."""
    q_rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    group = tl.program_id(1)
    q_ok = q_rows < n_queries
    slots = tl.arange(0, KP)
    lanes = tl.arange(0, BLOCK_N)
    best = tl.full((BLOCK_M, KP), float("-inf"), dtype=tl.float32)
    best_rows = tl.full((BLOCK_M, KP), -1, dtype=tl.int32)
    for tile in range(group * tiles_per_program, (group + 1) * tiles_per_program):
        rows = tile * BLOCK_N + lanes
        scores = _tile_scores(
            queries_ptr, packed_ptr, factors_ptr, valid_ptr, bias_ptr, levels_ptr, level_offsets_ptr,
            rows, q_rows, q_ok, n_rows, stride_q, stride_p, stride_f,
            DIM, FIELDS, SIGN_OFFSET, HAS_VALID, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION,
        )  # fmt: skip
        # while some query's best remaining score in the tile beats its weakest slot, move it there
        floor, weakest = tl.min(best, axis=1, return_indices=True)
        top, at = tl.max(scores, axis=1, return_indices=True)
        while tl.max((top > floor).to(tl.int32), axis=0) > 0:
            take = top > floor
            put = take[:, None] & (slots[None, :] == weakest[:, None])
            best = tl.where(put, top[:, None], best)
            best_rows = tl.where(put, (tile * BLOCK_N + at)[:, None], best_rows)
            scores = tl.where(lanes[None, :] == at[:, None], float("-inf"), scores)  # taken, or too weak for good
            floor, weakest = tl.min(best, axis=1, return_indices=True)
            top, at = tl.max(scores, axis=1, return_indices=True)
    out = (q_rows.to(tl.int64)[:, None] * tl.num_programs(1) + group) * KP + slots[None, :]
    tl.store(out_scores_ptr + out, best, mask=q_ok[:, None])
    tl.store(out_rows_ptr + out, best_rows, mask=q_ok[:, None])


# decided when triton decorates the kernel: TRITON_INTERPRET=1 at import time runs it on CPU tensors
_INTERPRETED = not isinstance(_scan_kernel, triton.runtime.JITFunction)


def _block_m(m: int, kp: int) -> int:
    """Queries per program: the smallest tensor-core tile (16) that covers the batch, up to 64 (32 for large ``kp``)."""
    return min(max(16, triton.next_power_of_2(m)), 64 if kp <= 128 else 32)


class TritonScanner:
    """Scores chunks of packed rows with the fused Triton kernel (the ``Scanner`` of ``kernels.scan``).

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``. The defaults were chosen
    by ``ptxas -v`` for sm_90 at ``d = 768`` (no register spills for mse, a few bytes for prod at
    16-query tiles), not by timing: no GPU was at hand.

    Args:
        codec: the codec whose layout and levels the codes follow.
        dtype: tensor-core operand precision: float16 (default), bfloat16 or float32; the sums
            are fp32 either way, and ``kernels.scan`` rescores the candidates exactly.
        block_n: rows per tile, a power of two >= 16.
        block_d: coordinates per ``tl.dot`` step, a power of two >= 16.
        tiles_per_program: row tiles per program; None sizes the grid to a few programs per SM.
        num_warps: warps per program.
    """

    def __init__(
        self,
        codec: TurboQuantCodec,
        dtype: torch.dtype = torch.float16,
        *,
        block_n: int = 128,
        block_d: int = 32,
        tiles_per_program: int | None = None,
        num_warps: int = 8,
    ):
        for name, value in (("block_n", block_n), ("block_d", block_d)):
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
        if tiles_per_program is not None and tiles_per_program < 1:
            raise ValueError(f"tiles_per_program must be >= 1, got {tiles_per_program}")
        layout = codec.layout
        self.dtype = dtype
        self.block_n, self.block_d, self.tiles_per_program, self.num_warps = block_n, block_d, tiles_per_program, num_warps
        self._dim = layout.dim
        self._width = layout.dim * (2 if layout.sign_field is not None else 1)
        self._fields = tuple((f.stop, f.width, f.shift, f.offset) for f in layout.index_fields)
        self._sign_offset = layout.sign_field.offset if layout.sign_field is not None else -1
        self._levels = codec.levels
        self._level_offsets = codec.level_offsets.to(torch.int32)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def prepare(self, rotated_queries: torch.Tensor) -> torch.Tensor:
        """Rotated float32 queries ``(m, W)`` -> contiguous ``dtype`` ``(m, W)``; raises if they overflow ``dtype``."""
        queries = rotated_queries.to(self.dtype).contiguous()
        if not bool(torch.isfinite(queries).all()):
            raise ValueError(f"rotated queries overflow {self.dtype}: build the TritonScanner with dtype=torch.float32")
        return queries

    def chunk_topk(
        self,
        queries: torch.Tensor,
        packed: torch.Tensor,
        factors: torch.Tensor,
        valid: torch.Tensor | None,
        k: int,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Best ``k`` rows of the chunk per query by score + ``bias``: scores float32 ``(m, min(k, n))``,
        chunk-local rows int64, best first.

        ``queries`` from ``prepare``; ``packed`` uint8 ``(n, B)``, ``factors`` float32 ``(n, F)``,
        ``valid`` bool ``(n,)`` or None and ``bias`` float32 ``(n,)`` or None, all on one device.
        Where fewer rows are valid, the remaining entries are ``(-inf, -1)``.
        """
        m, n, device = queries.shape[0], packed.shape[0], packed.device
        if device.type != "cuda" and not _INTERPRETED:
            raise ValueError("the Triton scan needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported")
        k = min(k, n)
        if queries.shape[1] != self._width or queries.dtype != self.dtype:
            raise ValueError(f"queries must be {self.dtype} (m, {self._width}) from prepare(), got {queries.dtype} {tuple(queries.shape)}")
        if m == 0 or k <= 0:
            return torch.empty((m, max(k, 0)), device=device), torch.empty((m, max(k, 0)), dtype=torch.int64, device=device)
        kp = triton.next_power_of_2(k)
        block_m = _block_m(m, kp)
        tiles, query_tiles = triton.cdiv(n, self.block_n), triton.cdiv(m, block_m)
        per_program = self.tiles_per_program or triton.cdiv(tiles * query_tiles, self._target_programs(device))
        groups = triton.cdiv(tiles, max(per_program, triton.cdiv(tiles, _MAX_GRID_Y)))
        per_program = triton.cdiv(tiles, groups)
        out_scores = torch.empty((m, groups, kp), dtype=torch.float32, device=device)
        out_rows = torch.empty((m, groups, kp), dtype=torch.int32, device=device)
        levels, level_offsets = self._tables_on(device)
        factors = factors.to(torch.float32).contiguous()
        _scan_kernel[(query_tiles, groups)](
            queries, packed.contiguous(), factors, None if valid is None else valid.contiguous(),
            None if bias is None else bias.to(torch.float32).contiguous(), levels, level_offsets,
            out_scores, out_rows, n, m, per_program, queries.stride(0), packed.shape[1], factors.shape[1],
            DIM=self._dim, FIELDS=self._fields, SIGN_OFFSET=self._sign_offset, HAS_VALID=valid is not None,
            HAS_BIAS=bias is not None, KP=kp,
            BLOCK_M=block_m, BLOCK_N=self.block_n, BLOCK_D=self.block_d,
            PRECISION="ieee" if self.dtype == torch.float32 else "tf32", num_warps=self.num_warps,
        )  # fmt: skip
        scores, at = out_scores.view(m, groups * kp).topk(k, dim=1)
        return scores, out_rows.view(m, groups * kp).gather(1, at).to(torch.int64)

    def _tables_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Levels float32 ``(L,)`` and per-coordinate level offsets int32 ``(D,)`` on ``device`` (cached)."""
        if device not in self._tables:
            self._tables[device] = (self._levels.to(device), self._level_offsets.to(device))
        return self._tables[device]

    @staticmethod
    def _target_programs(device: torch.device) -> int:
        """Programs to aim the grid at: a few per SM on a GPU, a handful in the interpreter."""
        if device.type == "cuda" and not _INTERPRETED:
            return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
        return _INTERPRETER_PROGRAMS
