"""The Triton scan: packed codes to per-query candidates in one kernel, no score array in memory.

Grid: (query tiles of ``BLOCK_M``, row groups). A program owns ``BLOCK_M`` queries and a group of
``tiles_per_program`` consecutive row tiles of ``BLOCK_N`` rows; programs that share a row group
are launched side by side, so a group's codes come from HBM once and from L2 for the other query
tiles. Per row tile it walks the rotated coordinates in steps of ``BLOCK_D``: the shared unpack
helper (``triton_unpack``) turns the packed bytes into levels in registers, and

* ``MMA=False`` (a few queries: memory-bound): the levels multiply the fp32 queries on the CUDA
  cores into a ``[BLOCK_N, BLOCK_M, BLOCK_D]`` partial sum, reduced once per tile;
* ``MMA=True`` (more queries: the dequantize-GEMM form): the levels, cast to fp16/bf16, are the A
  operand of ``tl.dot`` against the transposed query tile, fp32 accumulation on the tensor cores;
* ``INT8_WIDTH`` 2 or 4 (the int8 form, ``triton_int8``; opt-in, not yet timed on a GPU): int8
  levels looked up by byte permutes in registers, int8 queries, ``dp4a``; each row scored by an
  upper bound, which callers check after rescoring (``scan.below_bounds``).

``prod`` adds the same product of the QJL queries with the sign bits as +-1. The per-vector factors
scale the sums, a per-row ``bias`` (where given) is added; rows past the chunk or not ``valid`` score -inf.

Top-k without a score array: each program keeps, per query, two slots per *bucket*, a bucket being
one lane of the row tile (the rows ``r`` of its group with the same ``r mod BLOCK_N``). A tile's
scores enter their buckets with four selects each (elementwise, no reductions, no loops), and the
best score that fell out of any bucket is kept too (``dropped``). The program writes its ``2 BLOCK_N``
slots and that one float per query; ``torch.topk`` over all programs' slots gives the candidates.
The result is exact whenever no bucket lost a score that could be a candidate: that is checked,
``dropped < `` the last candidate's score, and a query that fails (three of its candidates in one
bucket: probability ~C^3 / (6 B^2) for C candidates over B buckets, ~1e-5 at k = 10 with the bucket
counts set below; and always for rows that tie exactly) is rescanned exactly (``exact_topk``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tqindex.codec import TurboQuantCodec
from tqindex.kernels.fastscan import DEFAULT_Z
from tqindex.kernels.grid import cdiv, next_power_of_2, on_device
from tqindex.kernels.scan import below_bounds, candidate_count, exact_topk, padded, rescore_resident
from tqindex.kernels import triton_int8
from tqindex.kernels.triton_int8 import int8_dot, int8_levels
from tqindex.kernels.triton_unpack import (
    half_asm,
    half_tables,
    levels_table,
    register_width,
    unpack_constants,
    unpack_half_levels,
    unpack_levels,
    unpack_signs,
)

_INTERPRETER_PROGRAMS = 4
#: ``TritonScanner.rescore`` takes up to this many candidates a query in its kernel (one program a query)
RESCORE_MAX_CANDIDATES = 1024
_RESCORE_TILE = 4096  # elements of a (candidates, coordinates) tile of the rescoring kernel
_MAX_GRID_Y = 65535
#: buckets per query >= this * C^1.5 for C candidates: keeps a query's chance of needing the exact
#: rescan near C^3 / (6 B^2) = 1 / (6 * 64^2) ~ 4e-5, whatever C
_BUCKETS_PER_CANDIDATE = 64
#: candidate slots of one scan (queries x buckets x 2, 8 bytes each: 256 MiB): 64 C^1.5 buckets grow
#: past the rows scanned for large k (k = 1000: 5.8M a query, 13.7 GB for 256 queries over 10M rows);
#: beyond this, fewer buckets, and more queries go to the exact rescan (bucket overflows are flagged)
_MAX_CANDIDATE_SLOTS = 1 << 25


@dataclass(frozen=True)
class ScanConfig:
    """Tiling of the scan kernel.

    ``mma``: tensor cores (``tl.dot``) or CUDA-core FMAs; ``max_block_m``: queries per program at most
    (a power of two; ``tl.dot`` needs >= 16, the FMA form takes 1-8); ``block_n`` rows per tile
    (for FMA, divided by the queries per program to bound the partial sums); ``block_d`` coordinates
    per step; ``num_warps`` per program; ``programs_per_sm``: the grid aims at this many programs
    per SM (more programs keep more code loads in flight); ``num_stages``: Triton's software
    pipelining depth for the loads of a step.
    """

    mma: bool
    max_block_m: int
    block_n: int
    block_d: int
    num_warps: int
    programs_per_sm: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("max_block_m", "block_n", "block_d"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if self.block_d < 16 or self.block_n < 16:
            raise ValueError(f"block_n and block_d must be >= 16, got {self.block_n} and {self.block_d}")
        if self.programs_per_sm < 1 or self.num_stages < 1:
            raise ValueError(f"programs_per_sm and num_stages must be >= 1, got {self.programs_per_sm} and {self.num_stages}")
        if self.mma and self.max_block_m < 16:
            raise ValueError(f"tl.dot needs max_block_m >= 16, got {self.max_block_m}")

    def block_m(self, m: int) -> int:
        """Queries per program for a batch of ``m``."""
        return min(max(16 if self.mma else 1, next_power_of_2(m)), self.max_block_m)

    def block_rows(self, block_m: int) -> int:
        """Rows per tile for ``block_m`` queries per program."""
        return self.block_n if self.mma else max(16, self.block_n // block_m)


# Tilings measured on an H200 (benchmarks/bench_gpu.py sweeps over 10M x 768 4-bit codes, k = 10;
# docs/benchmarks.md): the best of each batch's sweep.
#: one query: CUDA-core FMAs (2.59 ms, vs 2.96 with 64-row tiles and 3.61 with 4 programs per SM;
#: two queries take 6.3 ms this way and 4.0 on the tensor cores)
FMA = ScanConfig(mma=False, max_block_m=4, block_n=128, block_d=64, num_warps=4, programs_per_sm=16)
#: two queries and more: decode to fp16 and ``tl.dot`` (batch 4 / 64 / 128 / 1024: 3.9 / 7.2 / 13.8 /
#: 107 ms; 8 warps and 4 programs per SM: 6.4 ms at 4; 128 queries per program with 16 warps: 12.1
#: / 14.4 / 117 ms at 64 / 128 / 1024)
MMA = ScanConfig(mma=True, max_block_m=64, block_n=64, block_d=64, num_warps=4, programs_per_sm=16)
#: the int8 form on tensor cores (``dtype=torch.int8``): 128 coordinates a step, so that even 2-bit
#: codes give int8 ``tl.dot`` its least K of 32 bytes (not yet timed on a GPU)
INT8_MMA = ScanConfig(mma=True, max_block_m=64, block_n=64, block_d=128, num_warps=4, programs_per_sm=16)


@triton.jit
def _int8_scores(
    queries_ptr, row_ptrs, row_mask, terms_ptr, q_rows, q_ok, n_queries, stride_q,
    WIDTH: tl.constexpr, ASM: tl.constexpr, TABLES: tl.constexpr, DIM: tl.constexpr, MMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """The int8 form (``triton_int8``): ``s_q s_c sum L Q`` float32 ``[BLOCK_N, BLOCK_M]`` and the
    queries' margins ``[BLOCK_M]``. ``row_ptrs`` point to int32 code words; ``queries_ptr`` to int32
    query words on CUDA cores (``MMA=False``, DP4A), to their bytes on tensor cores, where each part
    of the levels is the A operand of an int8 ``tl.dot`` against the query bytes of that part."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    if MMA:
        ROW_BYTES: tl.constexpr = DIM * WIDTH // 8
        BLOCK_B: tl.constexpr = BLOCK_D * WIDTH // 8
        q_ptrs = queries_ptr + q_rows.to(tl.int64)[None, :] * stride_q  # [1, BLOCK_M]: the tile is transposed
        for b0 in range(0, ROW_BYTES, BLOCK_B):
            at = (b0 // BLOCK_B) * BLOCK_B + tl.arange(0, BLOCK_B)  # written so its alignment is known
            w_at = (b0 // BLOCK_B) * (BLOCK_B // 4) + tl.arange(0, BLOCK_B // 4)
            col_ok = at < ROW_BYTES
            if ROW_BYTES % BLOCK_B == 0:
                words = tl.load(row_ptrs + w_at[None, :], mask=row_mask, other=0)
            else:
                words = tl.load(row_ptrs + w_at[None, :], mask=row_mask & (w_at < ROW_BYTES // 4)[None, :], other=0)
            parts = int8_levels(words, ASM, TABLES, WIDTH)
            for r in tl.static_range(8 // WIDTH):
                q = tl.load(q_ptrs + r * ROW_BYTES + at[:, None], mask=q_ok[None, :] & col_ok[:, None], other=0)
                acc = tl.dot(parts[r], q, acc, out_dtype=tl.int32)  # Triton <= 3.6 asserts acc's dtype is out_dtype (default float32)
    else:
        WORDS: tl.constexpr = DIM * WIDTH // 32
        BLOCK_W: tl.constexpr = BLOCK_D * WIDTH // 32
        query_of = tl.arange(0, BLOCK_M)[None, :]
        first = tl.program_id(0) * BLOCK_M
        for w0 in range(0, WORDS, BLOCK_W):
            at = (w0 // BLOCK_W) * BLOCK_W + tl.arange(0, BLOCK_W)  # written so its alignment is known
            if WORDS % BLOCK_W == 0:
                words = tl.load(row_ptrs + at[None, :], mask=row_mask, other=0)
            else:
                words = tl.load(row_ptrs + at[None, :], mask=row_mask & (at < WORDS)[None, :], other=0)
            for j in tl.static_range(BLOCK_M):
                q_mask = (at < WORDS) & (first + j + tl.zeros_like(at) < n_queries)
                dot = int8_dot(words, at, q_mask, queries_ptr + (first + j).to(tl.int64) * stride_q, ASM, TABLES, WIDTH, DIM)
                acc += tl.where(query_of == j, dot[:, None], 0)
    scale = tl.load(terms_ptr + 2 * q_rows, mask=q_ok, other=0.0)
    margin = tl.load(terms_ptr + 2 * q_rows + 1, mask=q_ok, other=0.0)
    return acc.to(tl.float32) * scale[None, :], margin


@triton.jit
def _tile_scores(
    queries_ptr, packed_ptr, factors_ptr, valid_ptr, bias_ptr, levels_ptr, terms_ptr,
    rows, q_rows, q_ok, n_rows, n_queries, stride_q, stride_p, stride_f,
    FIELDS: tl.constexpr, LEVELS: tl.constexpr, N_LO: tl.constexpr, EXTRA: tl.constexpr, SIGN_OFFSET: tl.constexpr,
    DIM: tl.constexpr, HAS_VALID: tl.constexpr, HAS_BIAS: tl.constexpr, MMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, GATHER_ASM: tl.constexpr,
    INT8_WIDTH: tl.constexpr, INT8_ASM: tl.constexpr, INT8_TABLES: tl.constexpr,
    HALF: tl.constexpr, HALF_ASM: tl.constexpr, HALF_WIDTH: tl.constexpr,
):  # fmt: skip
    """Scores of rows ``(BLOCK_N,)`` against the query tile: float32 ``[BLOCK_N, BLOCK_M]``, -inf
    where excluded; in the int8 form (``INT8_WIDTH`` 2 or 4), each row's upper bound. On tensor
    cores with ``HALF_WIDTH`` (2 or 4), the levels in the queries' 16-bit type are looked up in
    registers (`triton_unpack.unpack_half_levels`), the values ``levels.to(q.dtype)`` has."""
    row_ok = rows < n_rows
    row_mask = row_ok[:, None]
    row_ptrs = packed_ptr + rows.to(tl.int64)[:, None] * stride_p
    if INT8_WIDTH > 0:
        dots, margin = _int8_scores(
            queries_ptr, row_ptrs, row_mask, terms_ptr, q_rows, q_ok, n_queries, stride_q,
            INT8_WIDTH, INT8_ASM, INT8_TABLES, DIM, MMA, BLOCK_M, BLOCK_N, BLOCK_D,
        )  # fmt: skip
        factor = tl.load(factors_ptr + rows * stride_f, mask=row_ok, other=0.0)[:, None]
        scores = dots * factor + tl.abs(factor) * margin[None, :]
    elif MMA:
        q_ptrs = queries_ptr + q_rows.to(tl.int64)[None, :] * stride_q  # [1, BLOCK_M]: the tile is transposed
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_signs = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for d0 in range(0, DIM, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)[:, None]
            q_mask = q_ok[None, :] & (cols < DIM)
            q = tl.load(q_ptrs + cols, mask=q_mask, other=0.0)
            if HALF_WIDTH > 0:
                levels = unpack_half_levels(row_ptrs, row_mask, d0, HALF, HALF_ASM, HALF_WIDTH, DIM, BLOCK_D, q.dtype)
            else:
                levels = unpack_levels(row_ptrs, row_mask, d0, levels_ptr, FIELDS, LEVELS, N_LO, EXTRA, DIM, BLOCK_D, GATHER_ASM)
            acc = tl.dot(levels.to(q.dtype), q, acc, input_precision=PRECISION)
            if SIGN_OFFSET >= 0:
                signs = unpack_signs(row_ptrs, row_mask, d0, SIGN_OFFSET, DIM, BLOCK_D)
                q_signs = tl.load(q_ptrs + DIM + cols, mask=q_mask, other=0.0)
                acc_signs = tl.dot(signs.to(q.dtype), q_signs, acc_signs, input_precision=PRECISION)
    else:
        # one query at a time against the unpacked tile, reduced along the coordinates at once: the
        # products stay in the unpack's register layout (a [rows, queries, coordinates] partial sum
        # made the compiler move every tile through shared memory)
        query_of = tl.arange(0, BLOCK_M)[None, :]
        first = tl.program_id(0) * BLOCK_M
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_signs = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for d0 in range(0, DIM, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            levels = unpack_levels(row_ptrs, row_mask, d0, levels_ptr, FIELDS, LEVELS, N_LO, EXTRA, DIM, BLOCK_D, GATHER_ASM)
            if SIGN_OFFSET >= 0:
                signs = unpack_signs(row_ptrs, row_mask, d0, SIGN_OFFSET, DIM, BLOCK_D)
            for j in tl.static_range(BLOCK_M):
                q_ptr = queries_ptr + (first + j).to(tl.int64) * stride_q
                q_mask = (first + j + tl.zeros_like(cols) < n_queries) & (cols < DIM)  # both [BLOCK_D]: bool in the interpreter too
                q = tl.load(q_ptr + cols, mask=q_mask, other=0.0).to(tl.float32)
                acc += tl.where(query_of == j, tl.sum(levels * q[None, :], axis=1)[:, None], 0.0)
                if SIGN_OFFSET >= 0:
                    q_signs = tl.load(q_ptr + DIM + cols, mask=q_mask, other=0.0).to(tl.float32)
                    acc_signs += tl.where(query_of == j, tl.sum(signs * q_signs[None, :], axis=1)[:, None], 0.0)
    if INT8_WIDTH == 0:
        scores = acc * tl.load(factors_ptr + rows * stride_f, mask=row_ok, other=0.0)[:, None]
        if SIGN_OFFSET >= 0:
            scores += acc_signs * tl.load(factors_ptr + rows * stride_f + 1, mask=row_ok, other=0.0)[:, None]
    keep = row_ok
    if HAS_BIAS:
        scores += tl.load(bias_ptr + rows, mask=row_ok, other=0.0)[:, None]
    if HAS_VALID:
        keep = keep & (tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0)
    return tl.where(keep[:, None] & q_ok[None, :], scores, float("-inf"))


@triton.jit
def _scan_kernel(
    queries_ptr, packed_ptr, factors_ptr, valid_ptr, bias_ptr, levels_ptr, terms_ptr, out_scores_ptr, out_rows_ptr,
    out_dropped_ptr, n_rows, n_queries, tiles_per_program, stride_q, stride_p, stride_f,
    FIELDS: tl.constexpr, LEVELS: tl.constexpr, N_LO: tl.constexpr, EXTRA: tl.constexpr, SIGN_OFFSET: tl.constexpr,
    DIM: tl.constexpr, HAS_VALID: tl.constexpr, HAS_BIAS: tl.constexpr, MMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, GATHER_ASM: tl.constexpr,
    INT8_WIDTH: tl.constexpr, INT8_ASM: tl.constexpr, INT8_TABLES: tl.constexpr,
    HALF: tl.constexpr, HALF_ASM: tl.constexpr, HALF_WIDTH: tl.constexpr,
):  # fmt: skip
    """Per query of the tile and bucket of the row group: the two best (score, row), unordered, in
    ``out[q, group, slot * BLOCK_N + lane]``; and the best score any bucket dropped, ``out_dropped[q, group]``."""
    q_rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = q_rows < n_queries
    group = tl.program_id(1)
    lanes = tl.arange(0, BLOCK_N)
    best1 = tl.full((BLOCK_N, BLOCK_M), float("-inf"), dtype=tl.float32)
    best2 = tl.full((BLOCK_N, BLOCK_M), float("-inf"), dtype=tl.float32)
    dropped = tl.full((BLOCK_N, BLOCK_M), float("-inf"), dtype=tl.float32)
    row1 = tl.full((BLOCK_N, BLOCK_M), -1, dtype=tl.int32)
    row2 = tl.full((BLOCK_N, BLOCK_M), -1, dtype=tl.int32)
    tile = group * tiles_per_program
    end = tile + tiles_per_program
    while tile < end:  # not range(): Triton 3.6's interpreter cannot take tensor bounds under NumPy >= 2.5 (issue 17)
        rows = tile * BLOCK_N + lanes
        scores = _tile_scores(
            queries_ptr, packed_ptr, factors_ptr, valid_ptr, bias_ptr, levels_ptr, terms_ptr,
            rows, q_rows, q_ok, n_rows, n_queries, stride_q, stride_p, stride_f,
            FIELDS, LEVELS, N_LO, EXTRA, SIGN_OFFSET, DIM, HAS_VALID, HAS_BIAS, MMA, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, GATHER_ASM,
            INT8_WIDTH, INT8_ASM, INT8_TABLES, HALF, HALF_ASM, HALF_WIDTH,
        )  # fmt: skip
        row = rows[:, None] + tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
        above1 = scores > best1
        above2 = scores > best2
        dropped = tl.maximum(dropped, tl.where(above2, best2, scores))  # what leaves the bucket
        best2 = tl.where(above1, best1, tl.where(above2, scores, best2))
        row2 = tl.where(above1, row1, tl.where(above2, row, row2))
        best1 = tl.where(above1, scores, best1)
        row1 = tl.where(above1, row, row1)
        tile += 1
    out = (q_rows.to(tl.int64)[None, :] * tl.num_programs(1) + group) * (2 * BLOCK_N) + lanes[:, None]
    tl.store(out_scores_ptr + out, best1, mask=q_ok[None, :])
    tl.store(out_rows_ptr + out, row1, mask=q_ok[None, :])
    tl.store(out_scores_ptr + out + BLOCK_N, best2, mask=q_ok[None, :])
    tl.store(out_rows_ptr + out + BLOCK_N, row2, mask=q_ok[None, :])
    tl.store(out_dropped_ptr + q_rows.to(tl.int64) * tl.num_programs(1) + group, tl.max(dropped, axis=0), mask=q_ok)


@triton.jit
def _rescore_kernel(
    queries_ptr, rows_ptr, packed_ptr, factors_ptr, bias_ptr, levels_ptr, out_scores_ptr, out_rows_ptr,
    n_candidates, k, stride_q, stride_r, stride_p, stride_f, stride_o,
    FIELDS: tl.constexpr, LEVELS: tl.constexpr, N_LO: tl.constexpr, EXTRA: tl.constexpr, SIGN_OFFSET: tl.constexpr,
    DIM: tl.constexpr, GATHER_ASM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One query (program): exact float32 scores (+ bias) of its candidate rows (``-1``: none), the
    best ``k`` written best first, equal scores by lower row first, ``(-inf, -1)`` past the
    candidates: `scan.rescore_resident`'s results in one launch."""
    q = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    rows = tl.load(rows_ptr + q * stride_r + c, mask=c < n_candidates, other=-1)
    ok = rows >= 0
    at = tl.maximum(rows, 0)
    row_ptrs = packed_ptr + at[:, None] * stride_p
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc_signs = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for d0 in range(0, DIM, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        query = tl.load(queries_ptr + q * stride_q + cols, mask=cols < DIM, other=0.0)
        levels = unpack_levels(row_ptrs, ok[:, None], d0, levels_ptr, FIELDS, LEVELS, N_LO, EXTRA, DIM, BLOCK_D, GATHER_ASM)
        acc += tl.sum(levels * query[None, :], axis=1)
        if SIGN_OFFSET >= 0:
            query_signs = tl.load(queries_ptr + q * stride_q + DIM + cols, mask=cols < DIM, other=0.0)
            acc_signs += tl.sum(unpack_signs(row_ptrs, ok[:, None], d0, SIGN_OFFSET, DIM, BLOCK_D) * query_signs[None, :], axis=1)
    score = acc * tl.load(factors_ptr + at * stride_f, mask=ok, other=0.0)
    if SIGN_OFFSET >= 0:
        score += acc_signs * tl.load(factors_ptr + at * stride_f + 1, mask=ok, other=0.0)
    if HAS_BIAS:
        score += tl.load(bias_ptr + at, mask=ok, other=0.0)
    score = tl.where(ok, score, float("-inf"))
    taken = c < 0
    j = 0
    while j < k:  # selection, k times: the best untaken score, the lowest row among its ties
        live = tl.where(taken, float("-inf"), score)
        best = tl.max(live, axis=0)
        pick = tl.min(tl.where(~taken & (live == best), rows, 9223372036854775807), axis=0)
        taken |= rows == pick
        tl.store(out_scores_ptr + q * stride_o + j, best)
        tl.store(out_rows_ptr + q * stride_o + j, tl.where(best == float("-inf"), -1, pick))
        j += 1


# decided when triton decorates the kernel: TRITON_INTERPRET=1 at import time runs it on CPU tensors
_INTERPRETED = not isinstance(_scan_kernel, triton.runtime.JITFunction)


def _target_programs(device: torch.device, programs_per_sm: int) -> int:
    """Programs to aim the grid at: ``programs_per_sm`` per SM on a GPU, a handful in the interpreter."""
    if device.type == "cuda" and not _INTERPRETED:
        return programs_per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_PROGRAMS


class TritonScanner:
    """Scores packed rows with the fused Triton kernel (the ``Scanner`` of ``kernels.scan``).

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.

    Args:
        codec: the codec whose layout and levels the codes follow.
        config: the kernel's tiling, ``FMA`` or ``MMA`` (``get_scanner`` picks by batch size).
        dtype: query precision: float16 (default), bfloat16 or float32 (the ``tl.dot`` operands,
            and what the FMA form reads); sums are fp32 either way, and ``kernels.scan`` rescores
            the candidates exactly. ``torch.int8``: the int8 form (``triton_int8``: levels and
            queries rounded to int8, byte-permute look-ups, then DP4A on CUDA cores or an int8
            ``tl.dot`` on tensor cores, ``INT8_MMA``), mse codes of 2 or 4 bits only; its candidate
            scores are upper bounds (``bounds``), and rows are exact up to the margin ``z``.
            ValueError for other dtypes, layouts the int8 form does not take, or a tensor-core
            config with fewer than 32 code bytes a step.
        tiles_per_program: row tiles per program; None: enough programs for the config's
            ``programs_per_sm`` and enough buckets for the candidates (``_BUCKETS_PER_CANDIDATE``).
        select: look 2-level (1-bit) codebooks up by a select in registers (True) or by a gather
            like larger ones (False); see ``triton_unpack``.
        gather_asm: gathers as inline PTX loads (None: wherever compiled); see ``unpack_constants``.
        z: the int8 form's margin in standard deviations of its rounding error (<= 0: the worst
            case, and the results are provably the codec's own top-k); as the CPU fast-scan's.
        register_tables: on tensor cores with float16 or bfloat16 queries, look 2- and 4-bit levels
            (one field over whole 32-bit words, ``triton_unpack.register_width``) up in registers by
            byte permutes instead of gathering them: the same operands, so the same results (on a
            GPU; Triton's interpreter rounds float32 to bfloat16 toward zero, the tables to nearest
            even); other layouts and forms gather. Not yet timed on a GPU (``bench_gpu.py``'s sweep).
    """

    def __init__(
        self,
        codec: TurboQuantCodec,
        config: ScanConfig = MMA,
        dtype: torch.dtype = torch.float16,
        *,
        tiles_per_program: int | None = None,
        select: bool = True,
        gather_asm: bool | None = None,
        z: float = DEFAULT_Z,
        register_tables: bool = False,
    ):
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.int8):
            raise ValueError(f"dtype must be float16, bfloat16, float32 or int8, got {dtype}")
        if tiles_per_program is not None and tiles_per_program < 1:
            raise ValueError(f"tiles_per_program must be >= 1, got {tiles_per_program}")
        if codec.trellis is not None:
            raise ValueError("the Triton scan reads scalar codes; trellis codes are scanned by the torch backend")
        #: the int8 form's plan (`triton_int8.Int8Plan`), None for the float forms
        self.int8 = triton_int8.Int8Plan(codec) if dtype == torch.int8 else None
        width = 0 if self.int8 is None else self.int8.width
        if width and config.mma and config.block_d * width < 256:
            raise ValueError(f"the int8 form on tensor cores needs block_d >= {256 // width} at {width} bits "
                             f"(32 code bytes a step, int8 tl.dot's least K), got {config.block_d}")  # fmt: skip
        asm, tables = ("", ()) if self.int8 is None else (self.int8.asm, self.int8.tables)
        self._int8 = {"INT8_WIDTH": width, "INT8_ASM": asm, "INT8_TABLES": tables}
        half = half_tables(codec, dtype) if register_tables and config.mma else ()
        half_width = register_width(codec) if half else 0
        self._half = {"HALF": half, "HALF_ASM": half_asm(half, half_width) if half else "", "HALF_WIDTH": half_width}
        self.codec, self.config, self.dtype, self.tiles_per_program, self.z = codec, config, dtype, tiles_per_program, z
        self._constants = unpack_constants(codec, select, gather_asm)
        del self._constants["SIGN_OFFSET"], self._constants["DIM"]  # passed by name below
        layout = codec.layout
        self._dim = layout.dim
        self._sign_offset = layout.sign_field.offset if layout.sign_field is not None else -1
        self._width = layout.dim * (2 if layout.sign_field is not None else 1)

    @property
    def bounds(self) -> bool:
        """Whether ``candidates`` scores rows by upper bounds (the int8 form): a caller that rescores
        them checks ``scan.below_bounds``."""
        return self.int8 is not None

    def prepare(self, rotated_queries: torch.Tensor) -> torch.Tensor | triton_int8.Int8Queries:
        """Rotated float32 queries ``(m, W)`` -> contiguous ``dtype`` ``(m, W)`` (the int8 form:
        `triton_int8.Int8Queries`); raises if they overflow ``dtype`` or are not finite."""
        queries = self.cast(rotated_queries)
        if not bool(self.finite(queries)):
            raise self.overflow_error()
        return queries

    def cast(self, rotated_queries: torch.Tensor) -> torch.Tensor | triton_int8.Int8Queries:
        """``prepare`` without the check (which waits for the device): the caller checks ``finite`` later."""
        if self.int8 is not None:
            return self.int8.quantize(rotated_queries, self.z)
        return rotated_queries.to(self.dtype).contiguous()

    def finite(self, queries: torch.Tensor | triton_int8.Int8Queries) -> torch.Tensor:
        """bool 0-dim tensor on the queries' device: ``cast`` output holds no inf or nan."""
        return torch.isfinite(queries.terms if self.int8 is not None else queries).all()

    def float_queries(self, queries: torch.Tensor | triton_int8.Int8Queries) -> torch.Tensor:
        """The float32 queries ``(m, W)`` behind ``prepare`` output, for exact scoring."""
        return queries.rotated if self.int8 is not None else queries.to(torch.float32)

    def take_queries(self, prepared: torch.Tensor | triton_int8.Int8Queries, at: torch.Tensor) -> torch.Tensor | triton_int8.Int8Queries:
        """The ``prepare`` output of the queries at positions ``at`` (int64 ``(q,)``)."""
        if self.int8 is not None:
            return triton_int8.Int8Queries(*(part.index_select(0, at.to(part.device)) for part in prepared))
        return prepared.index_select(0, at.to(prepared.device))

    def overflow_error(self) -> ValueError:
        """The error for rotated queries that overflow ``dtype``."""
        if self.int8 is not None:
            return ValueError("rotated queries must be finite")
        return ValueError(f"rotated queries overflow {self.dtype}: make the TritonScanner with dtype=torch.float32")

    def candidates(
        self,
        queries: torch.Tensor | triton_int8.Int8Queries,
        packed: torch.Tensor,
        factors: torch.Tensor,
        valid: torch.Tensor | None,
        count: int,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The best ``count`` rows per query by the kernel's scores (+ ``bias``), without synchronising with the device.

        ``queries`` from ``prepare``; ``packed`` uint8 ``(n, B)``, ``factors`` float32 ``(n, F)``,
        ``valid`` bool ``(n,)`` or None, ``bias`` float32 ``(n,)`` or None, on one device. Returns scores float32 ``(m, c)`` best first
        (the int8 form: upper bounds), rows int64 ``(m, c)`` (``-1`` with ``-inf`` past the valid rows), ``c = min(count, candidates
        kept)``, and ``overflow`` bool ``(m,)``: True where a row the buckets dropped might belong
        among the ``count`` best (those queries need ``exact_topk``).
        """
        m, n, device = self._check_queries(queries), packed.shape[0], packed.device
        if device.type != "cuda" and not _INTERPRETED:
            raise ValueError("the Triton scan needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported")
        if m == 0 or n == 0:  # no grid to launch
            empty = torch.empty((m, 0), device=device)
            return empty, empty.to(torch.int64), torch.zeros(m, dtype=torch.bool, device=device)
        config = self.config
        block_m = config.block_m(m)
        block_n = config.block_rows(block_m)
        tiles, query_tiles = cdiv(n, block_n), cdiv(m, block_m)
        slots = 2 * block_n
        if self.tiles_per_program is None:
            buckets = _BUCKETS_PER_CANDIDATE * math.ceil(count**1.5)
            groups = max(cdiv(_target_programs(device, config.programs_per_sm), query_tiles), cdiv(buckets, block_n))
            groups = min(groups, max(1, _MAX_CANDIDATE_SLOTS // (m * slots)))  # memory first; overflows are rescanned
            per_program = cdiv(tiles, min(groups, tiles))
        else:
            per_program = self.tiles_per_program
        per_program = max(per_program, cdiv(tiles, _MAX_GRID_Y))
        groups = cdiv(tiles, per_program)
        out_scores = torch.empty((m, groups * slots), dtype=torch.float32, device=device)
        out_rows = torch.empty((m, groups * slots), dtype=torch.int32, device=device)
        out_dropped = torch.empty((m, groups), dtype=torch.float32, device=device)
        factors = factors.to(torch.float32).contiguous()
        packed = packed.contiguous()
        words, terms = queries, None
        if self.int8 is not None:  # whole 32-bit words of codes (check_layout: rows are whole words); tl.dot takes query bytes
            packed, words, terms = packed.view(torch.int32), queries.words.view(torch.int8) if config.mma else queries.words, queries.terms
        with on_device(device):
            _scan_kernel[(query_tiles, groups)](
                words, packed, factors, None if valid is None else valid.contiguous().view(torch.uint8),
                None if bias is None else bias.to(torch.float32).contiguous(),
                levels_table(self.codec, device), terms, out_scores, out_rows, out_dropped,
                n, m, per_program, words.stride(0), packed.shape[1], factors.shape[1],
                **self._constants, SIGN_OFFSET=self._sign_offset, DIM=self._dim, HAS_VALID=valid is not None,
                HAS_BIAS=bias is not None, MMA=config.mma,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=config.block_d,
                PRECISION="ieee" if self.dtype == torch.float32 else "tf32", **self._int8,
                **(self._half if packed.data_ptr() % 4 == 0 else {**self._half, "HALF_WIDTH": 0}),  # look-ups load 32-bit words
                num_warps=config.num_warps, num_stages=config.num_stages,
            )  # fmt: skip
        kept = min(count, groups * slots)
        scores, at = out_scores.topk(kept, dim=1)
        rows = out_rows.gather(1, at).to(torch.int64)
        floor = scores[:, -1] if kept == count else torch.full((m,), float("-inf"), device=device)
        dropped = out_dropped.max(dim=1).values
        return scores, rows, (dropped > float("-inf")) & (dropped >= floor)

    def rescore(
        self,
        rotated_queries: torch.Tensor,
        rows: torch.Tensor,
        packed: torch.Tensor,
        factors: torch.Tensor,
        bias: torch.Tensor | None,
        k: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`scan.rescore_resident` (same arguments and results) in one kernel launch: per query the
        exact float32 scores (+ ``bias``) of its candidate ``rows`` int64 ``(m, c)``, the best ``k``
        best first (equal scores by lower row), ``(-inf, -1)`` past them; no synchronisation.
        More than `RESCORE_MAX_CANDIDATES` candidates a query go to the torch path."""
        m, count = rows.shape
        if count > RESCORE_MAX_CANDIDATES:
            return rescore_resident(self.codec, rotated_queries, rows, packed, factors, bias, k)
        device = packed.device
        scores = torch.empty((m, k), dtype=torch.float32, device=device)
        found = torch.empty((m, k), dtype=torch.int64, device=device)
        if m == 0 or k == 0:
            return scores, found
        queries = rotated_queries.to(device=device, dtype=torch.float32).contiguous()
        rows, factors = rows.to(device).contiguous(), factors.to(torch.float32).contiguous()
        block_c = max(16, next_power_of_2(count))
        with on_device(device):
            _rescore_kernel[(m,)](
                queries, rows, packed.contiguous(), factors, None if bias is None else bias.to(torch.float32).contiguous(),
                levels_table(self.codec, device), scores, found, count, k,
                queries.stride(0), rows.stride(0), packed.shape[1], factors.shape[1], scores.stride(0),
                **self._constants, SIGN_OFFSET=self._sign_offset, DIM=self._dim, HAS_BIAS=bias is not None,
                BLOCK_C=block_c, BLOCK_D=max(16, min(64, _RESCORE_TILE // block_c)),
            )  # fmt: skip
        return scores, found

    def _check_queries(self, queries: torch.Tensor | triton_int8.Int8Queries) -> int:
        """The batch size of ``prepare`` output; ValueError for anything else."""
        if self.int8 is not None:
            words = queries[0] if isinstance(queries, tuple) and len(queries) == 3 else None
            if words is None or words.dtype != torch.int32 or words.shape[1] != self._dim // 4:
                raise ValueError(f"queries must be the int8 form's (words, terms, rotated) from prepare(), got {type(queries).__name__}")
            return queries[0].shape[0]
        if not isinstance(queries, torch.Tensor) or queries.shape[1] != self._width or queries.dtype != self.dtype:
            got = f"{queries.dtype} {tuple(queries.shape)}" if isinstance(queries, torch.Tensor) else type(queries).__name__
            raise ValueError(f"queries must be {self.dtype} (m, {self._width}) from prepare(), got {got}")
        return queries.shape[0]

    def chunk_topk(
        self,
        queries: torch.Tensor | triton_int8.Int8Queries,
        packed: torch.Tensor,
        factors: torch.Tensor,
        valid: torch.Tensor | None,
        k: int,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Best ``k`` rows of the chunk per query by score + ``bias`` (float32 ``(n,)`` or None):
        scores float32 ``(m, min(k, n))``, chunk-local rows int64, best first.

        ``candidates``, then the exact rescan for the queries whose buckets overflowed (one
        synchronisation). The int8 form takes ``candidate_count(k)`` candidates, rescores them
        exactly and rescans where ``below_bounds``; its scores are then the codec's own.
        Where fewer rows are valid, the remaining entries are ``(-inf, -1)``.
        """
        m, n, device = self._check_queries(queries), packed.shape[0], packed.device
        k = min(k, n)
        if m == 0 or k <= 0:
            return torch.empty((m, max(k, 0)), device=device), torch.empty((m, max(k, 0)), dtype=torch.int64, device=device)
        if self.bounds:
            count = candidate_count(k)
            bounds, rows, overflow = self.candidates(queries, packed, factors, valid, count, bias)
            scores, rows = self.rescore(queries.rotated, rows, packed, factors, bias, k)
            overflow = overflow | below_bounds(bounds, count, scores, k)
        else:
            scores, rows, overflow = self.candidates(queries, packed, factors, valid, k, bias)
        scores, rows = padded(scores, rows, k)
        redo = overflow.nonzero().flatten()
        if redo.numel():
            scores[redo], rows[redo] = exact_topk(self.codec, self.float_queries(queries)[redo], packed, factors, valid, k, bias)
        return scores, rows
