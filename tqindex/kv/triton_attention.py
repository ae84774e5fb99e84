"""Attention over KV codes on the GPU: a split-K (flash-decoding) Triton kernel and a merge kernel.

For one (batch, KV head) pair ``n``, its query rows ``m`` (the query heads of its GQA group times
the query positions: ``M = g * L``) and ``Tc`` encoded tokens, then ``Tw`` dense window tokens:

1. `_split_kernel`, grid ``(row blocks, N, S)`` (row blocks first: CUDA's 65,535 limit binds only the
   other axes): program ``(., n, s)`` owns a contiguous range of
   ``SPLIT_BLOCKS * BLOCK_T`` tokens. Per block of ``BLOCK_T`` tokens it loads the packed key and
   value rows once for all ``BLOCK_M`` rows (the GQA group shares each code read), unpacks them in
   registers with the shared helper `tqindex.kernels.triton_unpack` (whole byte tiles, shift, mask
   and interleave per bit field, levels by select tree or an L1 gather; on tensor cores, with
   ``KernelOptions(register_tables=True)``, 2- and 4-bit levels by byte permutes), decodes one-byte log
   factors in place, and keeps an online softmax: running max, sum of exponentials and the value
   sum in rotated space (DESIGN.md section 5: rotated back once, after the merge). It writes one
   partial per split.
2. `_merge_kernel`, grid ``(row blocks, N)`` (a decode: one row a program, on CUDA cores; more rows:
   the split kernel's blocks): merges the ``S`` partials, adds the key centring's
   ``q . offset`` to the code logits, attends the dense window exactly (online softmax over
   blocks, so memory stays linear in the window), rotates the normalised code part back (a
   product with ``codec.finish_matrix``, the code part read back from a scratch in blocks of
   coordinates) and adds the window part: the output, in the query's dtype. Two launches per
   call besides the query rotation, where ``codec.finish``, an add and a cast were three more.

Products: with at most 8 rows per (batch, KV head) (decode: ``g`` rows per position) over fewer
than `DOT_MIN_TOKENS` codes, one row at a time on CUDA cores in float32, exact; with more rows
(speculative decode, extend, prefill after earlier codes) or codes, blocks of 16 to 64 rows on
tensor cores (``tl.dot``, float16 operands, float32 sums; faster from 32k tokens on an H200).
The number of splits ``S`` aims the grid at a few programs per SM (`plan`): flash-decoding
(Dao et al. 2023).

Loop counts are compile-time constants (powers of two of blocks, masked at the ends), so no loop
bound is a runtime tensor: Triton's interpreter on numpy >= 2.5 cannot turn one into an int.
Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is imported).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from tqindex.codec import Codes, TurboQuantCodec
from tqindex.kernels.grid import cdiv, next_power_of_2, on_device
from tqindex.kernels.triton_unpack import (
    half_asm,
    half_tables,
    levels_table,
    register_width,
    resolve_gather_asm,
    unpack_constants,
    unpack_half_levels,
    unpack_levels,
    unpack_signs,
)
from tqindex.kv.compressed import CompressedKV
from tqindex.kv.factors import STEPS_PER_OCTAVE

DEFAULT_SMS = 132  # an H200's SM count: the split plan when no GPU is at hand (the interpreter)
PROGRAMS_PER_SM = 4  # split-kernel programs the grid aims at per SM
SLOT_MAX_ROWS = 4  # the token-slot decode keeps a (tokens, dim) value sum per row: up to this many rows
FMA_MAX_ROWS = 8  # up to this many rows per (batch, KV head): CUDA-core products; beyond: tensor cores
# Measured on an H200 (benchmarks/bench_kv_gpu.py: batch 1, 32 query / 8 KV heads, head_dim 128, 4-bit
# codes, CUDA graph replay; docs/kv-cache.md): CUDA cores with 4 warps 0.089 / 0.299 ms a step at 4k /
# 32k tokens (8 warps: 0.108 / 0.443), tensor cores with 8 warps 0.149 / 0.218 ms.
SPLIT_WARPS = 4  # split-kernel warps on CUDA cores
DOT_WARPS = 8  # on tensor cores
MERGE_WARPS = 4  # merge-kernel warps on CUDA cores
MERGE_DOT_WARPS = 8  # on tensor cores (an extend's 64-row blocks: 4 warps took 255 registers and spilled, sm_90)
DOT_MIN_TOKENS = 16384  # decode runs on tensor cores from this many encoded tokens (between the two measured)
DOT_MIN_BLOCK_T = 32  # tensor-core blocks of 16 tokens computed wrong results on an H200 (Triton 3.6; right
# in the interpreter, and with 32 or 64 tokens): not established whether Triton's or ours, so not run
_DOT_BLOCK_M = 64
_MERGE_TILE = 8192  # elements of one (splits, rows, coordinates) tile in the merge
_NONE, _BOOL, _FLOAT = 0, 1, 2  # mask modes
_LOG_STEPS = tl.constexpr(STEPS_PER_OCTAVE)


# ---- reading codes -----------------------------------------------------------------------


@triton.jit
def _rows(
    P, row_base, offs_t, tmask, s_t, F, f_base, s_ft, table, low,
    FIELDS: tl.constexpr, LEVELS: tl.constexpr, N_LO: tl.constexpr, EXTRA: tl.constexpr, SIGN_OFFSET: tl.constexpr,
    LOG: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, GATHER_ASM: tl.constexpr,
    HALF: tl.constexpr, HALF_ASM: tl.constexpr, WIDTH: tl.constexpr,
):  # fmt: skip
    """Tokens ``offs_t``: levels ``(BT, D_PAD)`` and first factor ``(BT,)``; for prod QJL signs (+-1) and second factor.

    With ``WIDTH`` (2 or 4; 0: gathers) the levels are float16, looked up in registers from the
    ``HALF`` tables (`triton_unpack.unpack_half_levels`): for tensor cores, which take them so."""
    row_ptrs = P + row_base + offs_t.to(tl.int64)[:, None] * s_t
    if WIDTH > 0:
        lev = unpack_half_levels(row_ptrs, tmask[:, None], 0, HALF, HALF_ASM, WIDTH, D, D_PAD, tl.float16)
    else:
        lev = unpack_levels(row_ptrs, tmask[:, None], 0, table, FIELDS, LEVELS, N_LO, EXTRA, D, D_PAD, GATHER_ASM)
    factor_ptrs = F + f_base + offs_t.to(tl.int64) * s_ft
    scale = _factor(factor_ptrs, tmask, LOG, low)
    if SIGN_OFFSET >= 0:
        signs = unpack_signs(row_ptrs, tmask[:, None], 0, SIGN_OFFSET, D, D_PAD)
        qjl = _factor(factor_ptrs + 1, tmask, LOG, low)
    else:
        signs = lev
        qjl = scale
    return lev, scale, signs, qjl


@triton.jit
def _factor(ptrs, ok, LOG: tl.constexpr, low):
    """Per-vector factors as float32: stored floats, or one-byte log codes (`tqindex.kv.factors`) decoded."""
    raw = tl.load(ptrs, mask=ok, other=0)
    if LOG:
        code = raw.to(tl.float32)
        return tl.where(code > 0, tl.exp2(low + (code - 1.0) / _LOG_STEPS), 0.0)
    return raw.to(tl.float32)


# ---- products -----------------------------------------------------------------------------


@triton.jit
def _scores(q, keys, BLOCK_M: tl.constexpr, DOT: tl.constexpr):
    """``q`` ``(BM, K)`` x ``keys`` ``(BT, K)`` -> float32 ``(BM, BT)``."""
    if DOT:
        out = tl.dot(q.to(tl.float16), tl.trans(keys.to(tl.float16)))
    else:  # one row at a time: every product stays in the keys' layout, float32
        rows = tl.arange(0, BLOCK_M)[:, None]
        out = tl.zeros((BLOCK_M, keys.shape[0]), dtype=tl.float32)
        for m in tl.static_range(BLOCK_M):
            q_m = tl.sum(tl.where(rows == m, q, 0.0), axis=0)
            out = tl.where(rows == m, tl.sum(keys * q_m[None, :], axis=1)[None, :], out)
    return out


@triton.jit
def _weighted(p, values, BLOCK_M: tl.constexpr, DOT: tl.constexpr):
    """Weights ``p`` ``(BM, BT)`` (at most 1) x ``values`` ``(BT, K)`` -> float32 ``(BM, K)``."""
    if DOT:
        out = tl.dot(p.to(tl.float16), values.to(tl.float16))
    else:
        rows = tl.arange(0, BLOCK_M)[:, None]
        out = tl.zeros((BLOCK_M, values.shape[1]), dtype=tl.float32)
        for m in tl.static_range(BLOCK_M):
            p_m = tl.sum(tl.where(rows == m, p, 0.0), axis=0)
            out = tl.where(rows == m, tl.sum(values * p_m[:, None], axis=0)[None, :], out)
    return out


@triton.jit
def _scaled_weighted(p, scale, values, BLOCK_M: tl.constexpr, DOT: tl.constexpr):
    """``sum_t p[m, t] * scale[t] * values[t]``: the per-token factor folded into ``p``, kept <= 1 for float16."""
    top = tl.max(scale, axis=0)
    top = tl.where(top > 0, top, 1.0)
    return _weighted(p * (scale / top)[None, :], values, BLOCK_M, DOT) * top


@triton.jit
def _keep(s, pos, row_ok, keys, kmask, MASK, m_base, s_ml, s_mt, causal_shift, MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr):
    """Logits ``s`` with the mask applied: -inf where a key is excluded. ``s`` ``(BM, BT)`` with ``pos``
    / ``row_ok`` ``(BM, 1)`` and ``keys`` / ``kmask`` ``(1, BT)``, or ``s`` ``(BT,)`` of one row with
    scalar ``pos`` and ``row_ok``: ``pos`` is the row's query position."""
    keep = row_ok & kmask
    if CAUSAL:  # query position l sees keys <= T - L + l
        keep &= keys <= causal_shift + pos
    if MASK_MODE != 0:
        ptrs = MASK + m_base + pos.to(tl.int64) * s_ml + keys.to(tl.int64) * s_mt
        mask = tl.load(ptrs, mask=keep, other=0)
        if MASK_MODE == 1:
            keep &= mask != 0
        else:
            s += mask.to(tl.float32)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _online(top, s):
    """One online-softmax step: the new max ``(BM,)``, the rescale of what came before, and the weights."""
    new_top = tl.maximum(top, tl.max(s, axis=1))
    shift = tl.where(new_top == float("-inf"), 0.0, new_top)
    return new_top, tl.exp(top - shift), tl.exp(s - shift[:, None])


@triton.jit
def _slot_row(
    acc, acc_qjl, top, total, q_row, row, rows, pos, d, keys, k_scale, k_signs, k_qjl, values, v_scale, v_signs, v_qjl,
    offs_t, tmask, MASK, m_base, s_ml, s_mt, causal_shift, scaling,
    D: tl.constexpr, K_SIGN_OFFSET: tl.constexpr, V_SIGN_OFFSET: tl.constexpr, MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr,
):  # fmt: skip
    """One query row (``q_row`` points at it) over one block: an online softmax per token slot.

    Each of the ``BT`` slots keeps its own running max ``top``, sum ``total`` and value sum ``acc``
    ``(BT, D_PAD)``: every update is elementwise in the layout the codes were unpacked in, and the
    only reduction is along the coordinates (within a token's threads). `_slot_store` folds the
    slots once per split.
    """
    row_ok = row + tl.zeros_like(offs_t) < rows  # tensors, not a scalar: the interpreter's masks must be bool
    qmask = (row + tl.zeros_like(d) < rows) & (d < D)
    s = tl.sum(keys * tl.load(q_row + d, mask=qmask, other=0.0)[None, :], axis=1) * k_scale
    if K_SIGN_OFFSET >= 0:
        s += tl.sum(k_signs * tl.load(q_row + D + d, mask=qmask, other=0.0)[None, :], axis=1) * k_qjl
    s = _keep(s * scaling, pos, row_ok, offs_t, tmask, MASK, m_base, s_ml, s_mt, causal_shift, MASK_MODE, CAUSAL)
    new_top = tl.maximum(top, s)
    shift = tl.where(new_top == float("-inf"), 0.0, new_top)
    alpha = tl.exp(top - shift)
    p = tl.exp(s - shift)
    acc = acc * alpha[:, None] + (p * v_scale)[:, None] * values
    if V_SIGN_OFFSET >= 0:
        acc_qjl = acc_qjl * alpha[:, None] + (p * v_qjl)[:, None] * v_signs
    return acc, acc_qjl, new_top, total * alpha + p


@triton.jit
def _slot_store(acc, acc_qjl, top, total, acc_row, stats_at, TOP, TOTAL, row, rows, d, D: tl.constexpr, V_SIGN_OFFSET: tl.constexpr):
    """Fold row ``row``'s token slots into its split partial and store it (``acc_row`` points at its ACC row)."""
    best = tl.max(top, axis=0)
    w = tl.exp(top - tl.where(best == float("-inf"), 0.0, best))
    dmask = (row + tl.zeros_like(d) < rows) & (d < D)
    row_ok = row < rows
    tl.store(acc_row + d, tl.sum(acc * w[:, None], axis=0), mask=dmask)
    if V_SIGN_OFFSET >= 0:
        tl.store(acc_row + D + d, tl.sum(acc_qjl * w[:, None], axis=0), mask=dmask)
    tl.store(TOP + stats_at, best, mask=row_ok)
    tl.store(TOTAL + stats_at, tl.sum(total * w, axis=0), mask=row_ok)


# ---- kernels ------------------------------------------------------------------------------


@triton.jit
def _split_slots(
    Q, KP, KF, VP, VF, MASK, ACC, TOP, TOTAL, K_TABLE, V_TABLE, n, split, b, h,
    k_low, v_low, scaling, tokens, rows, q_len, causal_shift,
    s_qn, s_qm, s_kpb, s_kph, s_kpt, s_kfb, s_kfh, s_kft, s_vpb, s_vph, s_vpt, s_vfb, s_vfh, s_vft,
    s_mb, s_ml, s_mt, s_an, s_as, s_am, D: tl.constexpr, D_PAD: tl.constexpr,
    K_FIELDS: tl.constexpr, K_LEVELS: tl.constexpr, K_N_LO: tl.constexpr, K_EXTRA: tl.constexpr, K_SIGN_OFFSET: tl.constexpr, K_LOG: tl.constexpr,
    K_HALF: tl.constexpr, K_HALF_ASM: tl.constexpr, K_WIDTH: tl.constexpr,
    V_FIELDS: tl.constexpr, V_LEVELS: tl.constexpr, V_N_LO: tl.constexpr, V_EXTRA: tl.constexpr, V_SIGN_OFFSET: tl.constexpr, V_LOG: tl.constexpr,
    V_HALF: tl.constexpr, V_HALF_ASM: tl.constexpr, V_WIDTH: tl.constexpr,
    MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, SPLIT_BLOCKS: tl.constexpr,
    GATHER_ASM: tl.constexpr,
):  # fmt: skip
    """`_split_kernel` for 1, 2 or 4 rows (``BLOCK_M``) on CUDA cores, token slot by token slot (`_slot_row`):
    no reduction across tokens, so no barrier, until each row's slots are folded at the end."""
    row0 = tl.program_id(0) * BLOCK_M
    q_row = Q + n.to(tl.int64) * s_qn + row0.to(tl.int64) * s_qm
    d = tl.arange(0, D_PAD)
    m_base = b * s_mb
    qjl_cols: tl.constexpr = D_PAD if V_SIGN_OFFSET >= 0 else 1  # the QJL value sums, where the values have signs
    acc0 = tl.zeros((BLOCK_T, D_PAD), dtype=tl.float32)
    qjl0 = tl.zeros((BLOCK_T, qjl_cols), dtype=tl.float32)
    top0 = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
    total0 = tl.zeros((BLOCK_T,), dtype=tl.float32)
    acc1, qjl1, top1, total1 = acc0, qjl0, top0, total0
    acc2, qjl2, top2, total2 = acc0, qjl0, top0, total0
    acc3, qjl3, top3, total3 = acc0, qjl0, top0, total0
    for i in range(SPLIT_BLOCKS):
        offs_t = (split * SPLIT_BLOCKS + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = offs_t < tokens
        keys, k_scale, k_signs, k_qjl = _rows(
            KP, b * s_kpb + h * s_kph, offs_t, tmask, s_kpt, KF, b * s_kfb + h * s_kfh, s_kft, K_TABLE, k_low,
            K_FIELDS, K_LEVELS, K_N_LO, K_EXTRA, K_SIGN_OFFSET, K_LOG, D, D_PAD, GATHER_ASM, K_HALF, K_HALF_ASM, 0,
        )  # fmt: skip
        values, v_scale, v_signs, v_qjl = _rows(
            VP, b * s_vpb + h * s_vph, offs_t, tmask, s_vpt, VF, b * s_vfb + h * s_vfh, s_vft, V_TABLE, v_low,
            V_FIELDS, V_LEVELS, V_N_LO, V_EXTRA, V_SIGN_OFFSET, V_LOG, D, D_PAD, GATHER_ASM, V_HALF, V_HALF_ASM, 0,
        )  # fmt: skip
        acc0, qjl0, top0, total0 = _slot_row(
            acc0, qjl0, top0, total0, q_row, row0, rows, row0 % q_len, d, keys, k_scale, k_signs, k_qjl, values, v_scale, v_signs,
            v_qjl, offs_t, tmask, MASK, m_base, s_ml, s_mt, causal_shift, scaling, D, K_SIGN_OFFSET, V_SIGN_OFFSET, MASK_MODE, CAUSAL,
        )  # fmt: skip
        if BLOCK_M > 1:
            acc1, qjl1, top1, total1 = _slot_row(
                acc1, qjl1, top1, total1, q_row + s_qm, row0 + 1, rows, (row0 + 1) % q_len, d, keys, k_scale, k_signs, k_qjl, values,
                v_scale, v_signs, v_qjl, offs_t, tmask, MASK, m_base, s_ml, s_mt, causal_shift, scaling, D, K_SIGN_OFFSET,
                V_SIGN_OFFSET, MASK_MODE, CAUSAL,
            )  # fmt: skip
        if BLOCK_M > 2:
            acc2, qjl2, top2, total2 = _slot_row(
                acc2, qjl2, top2, total2, q_row + 2 * s_qm, row0 + 2, rows, (row0 + 2) % q_len, d, keys, k_scale, k_signs, k_qjl,
                values, v_scale, v_signs, v_qjl, offs_t, tmask, MASK, m_base, s_ml, s_mt, causal_shift, scaling, D, K_SIGN_OFFSET,
                V_SIGN_OFFSET, MASK_MODE, CAUSAL,
            )  # fmt: skip
            acc3, qjl3, top3, total3 = _slot_row(
                acc3, qjl3, top3, total3, q_row + 3 * s_qm, row0 + 3, rows, (row0 + 3) % q_len, d, keys, k_scale, k_signs, k_qjl,
                values, v_scale, v_signs, v_qjl, offs_t, tmask, MASK, m_base, s_ml, s_mt, causal_shift, scaling, D, K_SIGN_OFFSET,
                V_SIGN_OFFSET, MASK_MODE, CAUSAL,
            )  # fmt: skip
    acc_row = ACC + n.to(tl.int64) * s_an + split.to(tl.int64) * s_as + row0.to(tl.int64) * s_am
    stats = (n * tl.num_programs(2) + split).to(tl.int64) * rows + row0
    _slot_store(acc0, qjl0, top0, total0, acc_row, stats, TOP, TOTAL, row0, rows, d, D, V_SIGN_OFFSET)
    if BLOCK_M > 1:
        _slot_store(acc1, qjl1, top1, total1, acc_row + s_am, stats + 1, TOP, TOTAL, row0 + 1, rows, d, D, V_SIGN_OFFSET)
    if BLOCK_M > 2:
        _slot_store(acc2, qjl2, top2, total2, acc_row + 2 * s_am, stats + 2, TOP, TOTAL, row0 + 2, rows, d, D, V_SIGN_OFFSET)
        _slot_store(acc3, qjl3, top3, total3, acc_row + 3 * s_am, stats + 3, TOP, TOTAL, row0 + 3, rows, d, D, V_SIGN_OFFSET)


@triton.jit
def _split_kernel(
    Q, KP, KF, VP, VF, MASK, ACC, TOP, TOTAL, K_TABLE, V_TABLE,
    k_low, v_low, scaling, tokens, rows, q_len, heads, causal_shift,
    s_qn, s_qm, s_kpb, s_kph, s_kpt, s_kfb, s_kfh, s_kft, s_vpb, s_vph, s_vpt, s_vfb, s_vfh, s_vft,
    s_mb, s_ml, s_mt, s_an, s_as, s_am,
    D: tl.constexpr, D_PAD: tl.constexpr,
    K_FIELDS: tl.constexpr, K_LEVELS: tl.constexpr, K_N_LO: tl.constexpr, K_EXTRA: tl.constexpr, K_SIGN_OFFSET: tl.constexpr, K_LOG: tl.constexpr,
    K_HALF: tl.constexpr, K_HALF_ASM: tl.constexpr, K_WIDTH: tl.constexpr,
    V_FIELDS: tl.constexpr, V_LEVELS: tl.constexpr, V_N_LO: tl.constexpr, V_EXTRA: tl.constexpr, V_SIGN_OFFSET: tl.constexpr, V_LOG: tl.constexpr,
    V_HALF: tl.constexpr, V_HALF_ASM: tl.constexpr, V_WIDTH: tl.constexpr,
    MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, SPLIT_BLOCKS: tl.constexpr, DOT: tl.constexpr,
    GATHER_ASM: tl.constexpr, SLOTS: tl.constexpr,
):  # fmt: skip
    """Partial attention of rows ``(n, row block)`` over split ``s``'s tokens -> ACC, TOP, TOTAL ``[n, s, rows]``."""
    n = tl.program_id(1)
    split = tl.program_id(2)
    b = (n // heads).to(tl.int64)
    h = (n % heads).to(tl.int64)
    if SLOTS:
        _split_slots(
            Q, KP, KF, VP, VF, MASK, ACC, TOP, TOTAL, K_TABLE, V_TABLE, n, split, b, h,
            k_low, v_low, scaling, tokens, rows, q_len, causal_shift,
            s_qn, s_qm, s_kpb, s_kph, s_kpt, s_kfb, s_kfh, s_kft, s_vpb, s_vph, s_vpt, s_vfb, s_vfh, s_vft,
            s_mb, s_ml, s_mt, s_an, s_as, s_am, D, D_PAD,
            K_FIELDS, K_LEVELS, K_N_LO, K_EXTRA, K_SIGN_OFFSET, K_LOG, K_HALF, K_HALF_ASM, K_WIDTH,
            V_FIELDS, V_LEVELS, V_N_LO, V_EXTRA, V_SIGN_OFFSET, V_LOG, V_HALF, V_HALF_ASM, V_WIDTH,
            MASK_MODE, CAUSAL, BLOCK_M, BLOCK_T, SPLIT_BLOCKS, GATHER_ASM,
        )  # fmt: skip
    else:
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = offs_m < rows
        d = tl.arange(0, D_PAD)
        q_ptrs = Q + n.to(tl.int64) * s_qn + offs_m[:, None].to(tl.int64) * s_qm + d[None, :]
        qmask = mmask[:, None] & (d < D)[None, :]
        q = tl.load(q_ptrs, mask=qmask, other=0.0)
        if K_SIGN_OFFSET >= 0:
            q_qjl = tl.load(q_ptrs + D, mask=qmask, other=0.0)
        m_base = b * s_mb

        top = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
        acc_qjl = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
        for i in range(SPLIT_BLOCKS):
            offs_t = (split * SPLIT_BLOCKS + i) * BLOCK_T + tl.arange(0, BLOCK_T)
            tmask = offs_t < tokens
            lev, scale, signs, qjl = _rows(
                KP, b * s_kpb + h * s_kph, offs_t, tmask, s_kpt, KF, b * s_kfb + h * s_kfh, s_kft, K_TABLE, k_low,
                K_FIELDS, K_LEVELS, K_N_LO, K_EXTRA, K_SIGN_OFFSET, K_LOG, D, D_PAD, GATHER_ASM, K_HALF, K_HALF_ASM, K_WIDTH,
            )  # fmt: skip
            s = _scores(q, lev, BLOCK_M, DOT) * scale[None, :]
            if K_SIGN_OFFSET >= 0:
                s += _scores(q_qjl, signs, BLOCK_M, DOT) * qjl[None, :]
            s = _keep(s * scaling, (offs_m % q_len)[:, None], mmask[:, None], offs_t[None, :], tmask[None, :], MASK, m_base, s_ml, s_mt, causal_shift, MASK_MODE, CAUSAL)
            top, alpha, p = _online(top, s)
            total = total * alpha + tl.sum(p, axis=1)

            lev, scale, signs, qjl = _rows(
                VP, b * s_vpb + h * s_vph, offs_t, tmask, s_vpt, VF, b * s_vfb + h * s_vfh, s_vft, V_TABLE, v_low,
                V_FIELDS, V_LEVELS, V_N_LO, V_EXTRA, V_SIGN_OFFSET, V_LOG, D, D_PAD, GATHER_ASM, V_HALF, V_HALF_ASM, V_WIDTH,
            )  # fmt: skip
            acc = acc * alpha[:, None] + _scaled_weighted(p, scale, lev, BLOCK_M, DOT)
            if V_SIGN_OFFSET >= 0:
                acc_qjl = acc_qjl * alpha[:, None] + _scaled_weighted(p, qjl, signs, BLOCK_M, DOT)

        out = n.to(tl.int64) * s_an + split.to(tl.int64) * s_as + offs_m[:, None].to(tl.int64) * s_am + d[None, :]
        tl.store(ACC + out, acc, mask=qmask)
        if V_SIGN_OFFSET >= 0:
            tl.store(ACC + out + D, acc_qjl, mask=qmask)
        stats = (n * tl.num_programs(2) + split).to(tl.int64) * rows + offs_m
        tl.store(TOP + stats, top, mask=mmask)
        tl.store(TOTAL + stats, total, mask=mmask)


@triton.jit
def _merge_kernel(
    ACC, TOP, TOTAL, Q, OFFSET, KW, VW, MASK, CODES, FINISH, OUT,
    splits, rows, q_len, heads, window, encoded, causal_shift, scaling,
    s_an, s_as, s_am, s_qn, s_qm, s_ob, s_oh, s_kwb, s_kwh, s_kwt, s_vwb, s_vwh, s_vwt, s_mb, s_ml, s_mt, s_cn, s_cm, s_on, s_om,
    DACC: tl.constexpr, DACC_PAD: tl.constexpr, DK: tl.constexpr, DK_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    HAS_OFFSET: tl.constexpr, MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr, SPLIT_LOOPS: tl.constexpr, BLOCK_W: tl.constexpr, WINDOW_LOOPS: tl.constexpr, DOT: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Rows ``(n, row block)``: merge the split partials, add the key offset, attend the window, rotate
    the code part back (``FINISH``, `TurboQuantCodec.finish_matrix`) and add the window part: the
    attention output in ``OUT``'s type. ``CODES`` is float32 scratch for the code part, which the
    rotation reads back in blocks of ``BLOCK_K`` coordinates."""
    n = tl.program_id(1)
    b = (n // heads).to(tl.int64)
    h = (n % heads).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < rows
    c = tl.arange(0, DACC_PAD)

    # the code part: merge the partials of every split
    top = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, DACC_PAD), dtype=tl.float32)
    for i in range(SPLIT_LOOPS):
        s = i * BLOCK_S + tl.arange(0, BLOCK_S)
        smask = (s < splits)[:, None] & mmask[None, :]
        stats = (n * splits + s[:, None]).to(tl.int64) * rows + offs_m[None, :]  # (BS, BM)
        tops = tl.load(TOP + stats, mask=smask, other=float("-inf"))
        new_top = tl.maximum(top, tl.max(tops, axis=0))
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)
        alpha = tl.exp(top - shift)
        w = tl.exp(tops - shift[None, :])
        total = total * alpha + tl.sum(w * tl.load(TOTAL + stats, mask=smask, other=0.0), axis=0)
        parts = n.to(tl.int64) * s_an + s[:, None, None].to(tl.int64) * s_as + offs_m[None, :, None].to(tl.int64) * s_am + c[None, None, :]
        part = tl.load(ACC + parts, mask=smask[:, :, None] & (c < DACC)[None, None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * part, axis=0)
        top = new_top

    dk = tl.arange(0, DK_PAD)
    q = tl.load(Q + n.to(tl.int64) * s_qn + offs_m[:, None].to(tl.int64) * s_qm + dk[None, :], mask=mmask[:, None] & (dk < DK)[None, :], other=0.0)
    q = q.to(tl.float32)
    if HAS_OFFSET:  # the codes hold keys minus the offset: their logits lack scaling * q . offset
        offset = tl.load(OFFSET + b * s_ob + h * s_oh + dk, mask=dk < DK, other=0.0).to(tl.float32)
        top += scaling * tl.sum(q * offset[None, :], axis=1)

    # the window, exactly, continuing the same online softmax
    dv = tl.arange(0, DV_PAD)
    code_scale = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    acc_window = tl.zeros((BLOCK_M, DV_PAD), dtype=tl.float32)
    m_base = b * s_mb
    for i in range(WINDOW_LOOPS):
        offs_t = i * BLOCK_W + tl.arange(0, BLOCK_W)
        tmask = offs_t < window
        keys = tl.load(KW + b * s_kwb + h * s_kwh + offs_t[:, None].to(tl.int64) * s_kwt + dk[None, :], mask=tmask[:, None] & (dk < DK)[None, :], other=0.0)
        s = _scores(q, keys.to(tl.float32), BLOCK_M, DOT) * scaling
        s = _keep(s, (offs_m % q_len)[:, None], mmask[:, None], (encoded + offs_t)[None, :], tmask[None, :], MASK, m_base, s_ml, s_mt, causal_shift, MASK_MODE, CAUSAL)
        top, alpha, p = _online(top, s)
        total = total * alpha + tl.sum(p, axis=1)
        code_scale *= alpha
        values = tl.load(VW + b * s_vwb + h * s_vwh + offs_t[:, None].to(tl.int64) * s_vwt + dv[None, :], mask=tmask[:, None] & (dv < DV)[None, :], other=0.0)
        acc_window = acc_window * alpha[:, None] + _weighted(p, values.to(tl.float32), BLOCK_M, DOT)

    inverse = 1.0 / tl.maximum(total, 1.1754943508222875e-38)  # rows that see no key at all: 0, not nan
    codes = CODES + n.to(tl.int64) * s_cn + offs_m[:, None].to(tl.int64) * s_cm
    tl.store(codes + c[None, :], acc * (code_scale * inverse)[:, None], mask=mmask[:, None] & (c < DACC)[None, :])
    tl.debug_barrier()  # this program's stores are visible to all its threads
    out = acc_window * inverse[:, None]
    for k0 in range(0, DACC, BLOCK_K):  # out += code part (rotated) @ FINISH, float32
        kk = k0 + tl.arange(0, BLOCK_K)
        part = tl.load(codes + kk[None, :], mask=mmask[:, None] & (kk < DACC)[None, :], other=0.0)
        back = tl.load(FINISH + kk[:, None].to(tl.int64) * DV + dv[None, :], mask=(kk < DACC)[:, None] & (dv < DV)[None, :], other=0.0)
        if DOT:
            out += tl.dot(part, back, input_precision="ieee")
        else:
            out += tl.sum(part[:, :, None] * back[None, :, :], axis=1)
    outs = OUT + n.to(tl.int64) * s_on + offs_m[:, None].to(tl.int64) * s_om + dv[None, :]
    tl.store(outs, out.to(OUT.dtype.element_ty), mask=mmask[:, None] & (dv < DV)[None, :])


# ---- host side ----------------------------------------------------------------------------

# decided when triton decorates the kernel: TRITON_INTERPRET=1 at import time runs it on CPU tensors
INTERPRETED = not isinstance(_split_kernel, triton.runtime.JITFunction)


@dataclass(frozen=True)
class KernelOptions:
    """Tunables of the two kernels (defaults picked by `plan`; the benchmark varies them).

    programs_per_sm: split-kernel programs the grid aims at per SM. splits: at most this many
    splits per row block instead (None: from the SM count). block_t: tokens per step. dot: tensor
    cores (True), CUDA cores (False) or by rows and tokens (None: tensor cores above `FMA_MAX_ROWS`
    rows or from `DOT_MIN_TOKENS` tokens). num_warps: per split program (None: `SPLIT_WARPS` on
    CUDA cores, `DOT_WARPS` on tensor cores). gather_asm:
    codebook gathers as inline PTX loads (None: wherever compiled; `triton_unpack.unpack_constants`).
    slots: on CUDA cores with at most `SLOT_MAX_ROWS` rows, an online softmax per token slot
    (`_split_slots`: no reduction across tokens inside the loop). Checked against the torch path in
    the interpreter only so far; benchmarks/bench_kv_gpu.py times it on a GPU. register_tables: on
    tensor cores, 2- and 4-bit levels (one field over whole 32-bit words) looked up in registers
    by byte permutes (`triton_unpack.unpack_half_levels`) instead of gathered: the same float16
    operands; unmeasured on a GPU (the benchmark's variants time it). merge_warps: per merge
    program (None: `MERGE_WARPS` on CUDA cores, `MERGE_DOT_WARPS` on tensor cores). merge_rows: rows per merge program (rounded up to a power of two) where the merge runs on
    CUDA cores: with at most `FMA_MAX_ROWS` rows per (batch, KV head) (a decode), or ``dot=False``.
    A decode's merge runs on CUDA cores, one program per row by default, even where the split
    kernel uses tensor cores: at 32k tokens (64 splits,
    4 rows) a program takes 9 loop steps one after another, against 16 with 4 rows a program
    and 24 with them padded to ``tl.dot``'s 16 (`benchmarks/kv_kernel_resources.py`; unmeasured).
    """

    programs_per_sm: int = PROGRAMS_PER_SM
    splits: int | None = None
    block_t: int | None = None
    dot: bool | None = None
    num_warps: int | None = None
    merge_warps: int | None = None
    merge_rows: int = 1
    gather_asm: bool | None = None
    slots: bool = False
    register_tables: bool = False

    def __post_init__(self) -> None:
        if self.merge_rows < 1:
            raise ValueError(f"merge_rows must be at least 1, got {self.merge_rows}")


@dataclass(frozen=True)
class Plan:
    """The launch of one attention call: rows per program, tensor cores or not, the token split."""

    block_m: int
    dot: bool
    slots: bool
    num_warps: int
    block_t: int
    split_blocks: int  # token blocks per split (a power of two: few compiled variants as T grows)
    splits: int
    tables: bool  # tensor cores with 2- and 4-bit levels looked up in registers
    merge_m: int  # rows per merge program
    merge_dot: bool  # the merge's window and rotation on tensor cores


@lru_cache(maxsize=16)
def sm_count(device: torch.device) -> int:
    """SMs of ``device``; `DEFAULT_SMS` when it is not a GPU (the interpreter)."""
    if device.type == "cuda" and not INTERPRETED:
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def plan(pairs: int, rows: int, tokens: int, dim_pad: int, sms: int, options: KernelOptions = KernelOptions()) -> Plan:
    """Split ``tokens`` so that ``pairs`` (batch x KV heads) x row blocks x splits fills ``sms`` SMs.

    Each split covers a power of two of ``block_t``-token blocks; the splits are at most
    ``programs_per_sm * sms / (pairs * row blocks)`` and at least half that (or one per block).
    Raises ValueError for tensor cores with ``block_t`` under `DOT_MIN_BLOCK_T`.
    """
    dot = (rows > FMA_MAX_ROWS or tokens >= DOT_MIN_TOKENS) if options.dot is None else options.dot
    # on CUDA cores rows run one by one, unrolled: blocks of at most FMA_MAX_ROWS, more row blocks for more rows
    block_m = max(16, min(_DOT_BLOCK_M, next_power_of_2(rows))) if dot else min(FMA_MAX_ROWS, next_power_of_2(rows))
    block_t = options.block_t or (64 if dim_pad <= 128 else 32)
    if dot and block_t < DOT_MIN_BLOCK_T:
        raise ValueError(f"tensor-core blocks need block_t >= {DOT_MIN_BLOCK_T}, got {block_t}")
    row_blocks = cdiv(rows, block_m)
    wanted = options.splits or max(1, cdiv(options.programs_per_sm * sms, pairs * row_blocks))
    split_blocks = next_power_of_2(cdiv(cdiv(max(tokens, 1), wanted), block_t))
    slots = options.slots and not dot and block_m <= SLOT_MAX_ROWS
    warps = options.num_warps or (DOT_WARPS if dot else SPLIT_WARPS)
    splits = cdiv(max(tokens, 1), split_blocks * block_t)
    merge_dot = dot and rows > FMA_MAX_ROWS  # a decode's few rows: CUDA cores, not padded to tl.dot's 16
    merge_m = block_m if merge_dot else next_power_of_2(min(options.merge_rows, rows))
    return Plan(block_m, dot, slots, warps, block_t, split_blocks, splits, options.register_tables and dot, merge_m, merge_dot)


@lru_cache(maxsize=64)
def _codes_args(prefix: str, codec: TurboQuantCodec, log_factors: bool, tables: bool) -> dict:
    """The split kernel's constexpr arguments for keys (``prefix`` "K") or values ("V"), made once per
    codec; with ``tables``, the float16 register look-ups where the layout has them (`register_width`)."""
    layout = unpack_constants(codec)
    names = ("FIELDS", "LEVELS", "N_LO", "EXTRA", "SIGN_OFFSET")
    width = register_width(codec) if tables else 0
    half = half_tables(codec, torch.float16) if width else ()
    registers = {f"{prefix}_HALF": half, f"{prefix}_HALF_ASM": half_asm(half, width) if width else "", f"{prefix}_WIDTH": width}
    return {f"{prefix}_{name}": layout[name] for name in names} | {f"{prefix}_LOG": log_factors} | registers


def _mask_args(mask: torch.Tensor | None, placeholder: torch.Tensor) -> tuple[torch.Tensor, int, tuple[int, int, int]]:
    """The mask as the kernels read it: tensor (``placeholder``, never read, without one), mode, strides
    (batch, query position, key); batch stride 0 if shared."""
    if mask is None:
        return placeholder, _NONE, (0, 0, 0)
    mask = mask[:, 0]
    mode = _BOOL if mask.dtype == torch.bool else _FLOAT
    if mode == _BOOL:
        mask = mask.view(torch.uint8)
    strides = (mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(1), mask.stride(2))
    return mask, mode, strides


def triton_codes_attention(
    query: torch.Tensor,
    key: CompressedKV,
    value: CompressedKV,
    mask: torch.Tensor | None,
    *,
    scaling: float,
    causal: bool,
    options: KernelOptions = KernelOptions(),
) -> torch.Tensor:
    """Softmax attention over compressed keys and values: query ``(B, Hq, L, d)`` -> ``(B, Hq, L, dv)``.

    Same contract as `tqindex.kv.attention.codes_attention` (which validates the inputs): mask
    ``(B or 1, 1, L, T)`` bool (True attends) or additive float, or None with ``causal``.
    Needs keys and values of one rotated dim, scalar codes.
    """
    key_codec, value_codec = key.codec, value.codec
    dim = key_codec.rotated_dim
    if value_codec.rotated_dim != dim:
        raise ValueError(f"the Triton kernel needs keys and values of one rotated dim, got {dim} and {value_codec.rotated_dim}")
    batch, q_heads, q_len, head_dim = query.shape
    heads, tokens, encoded = key.shape[1], key.shape[2], key.encoded_len
    group, pairs = q_heads // heads, batch * heads
    rows, window = group * q_len, tokens - encoded
    device = query.device
    queries = _unit_last(query.reshape(pairs, rows, head_dim))  # (N, M, d): rows are (query head of the group, position)
    # unchecked (a finiteness check waits for the GPU and breaks CUDA graph capture): NaN flows through, as in sdpa
    rotated = key_codec.rotate_rows(queries.reshape(-1, head_dim).float()).view(pairs, rows, -1)
    d_pad = max(16, next_power_of_2(dim))
    launch = plan(pairs, rows, encoded, d_pad, sm_count(device), options)
    acc_dim = dim * value_codec.n_factors
    partial_acc = torch.empty((pairs, launch.splits, rows, acc_dim), dtype=torch.float32, device=device)
    partial_top = torch.empty((pairs, launch.splits, rows), dtype=torch.float32, device=device)
    partial_total = torch.empty_like(partial_top)
    mask_tensor, mask_mode, mask_strides = _mask_args(mask, partial_top)
    causal = causal and mask is None and q_len > 1
    causal_shift = tokens - q_len
    kc, vc = (Codes(_unit_last(kv.codes.packed), _unit_last(kv.codes.factors)) for kv in (key, value))
    with on_device(device):  # Triton launches on the current device, not the tensors'
        _split_kernel[(cdiv(rows, launch.block_m), pairs, launch.splits)](
            rotated, kc.packed, kc.factors, vc.packed, vc.factors, mask_tensor, partial_acc, partial_top, partial_total,
            levels_table(key_codec, device), levels_table(value_codec, device),
            _low(key), _low(value), scaling, encoded, rows, q_len, heads, causal_shift,
            rotated.stride(0), rotated.stride(1), *kc.packed.stride()[:3], *kc.factors.stride()[:3],
            *vc.packed.stride()[:3], *vc.factors.stride()[:3], *mask_strides, *partial_acc.stride()[:3],
            D=dim, D_PAD=d_pad, **_codes_args("K", key_codec, key.log_factors is not None, launch.tables and _word_aligned(kc.packed)),
            **_codes_args("V", value_codec, value.log_factors is not None, launch.tables and _word_aligned(vc.packed)),
            MASK_MODE=mask_mode, CAUSAL=causal, BLOCK_M=launch.block_m, BLOCK_T=launch.block_t,
            SPLIT_BLOCKS=launch.split_blocks, DOT=launch.dot, SLOTS=launch.slots, num_warps=launch.num_warps,
            GATHER_ASM=resolve_gather_asm(options.gather_asm),
        )  # fmt: skip

        value_dim = value_codec.dim
        codes_part = torch.empty((pairs, rows, acc_dim), dtype=torch.float32, device=device)
        out = torch.empty((pairs, rows, value_dim), dtype=query.dtype, device=device)
        merge_m = launch.merge_m
        acc_pad, dk_pad, dv_pad = next_power_of_2(acc_dim), next_power_of_2(head_dim), next_power_of_2(value_dim)
        if launch.merge_dot:  # tl.dot takes K >= 16 (the interpreter takes less, a GPU's compiler does not)
            dk_pad, dv_pad = max(16, dk_pad), max(16, dv_pad)
        block_s = max(1, min(next_power_of_2(launch.splits), _MERGE_TILE // (merge_m * acc_pad)))
        block_w = 32 if launch.merge_dot or merge_m * dk_pad <= 2048 else 16
        offset = _unit_last(key.offset) if key.offset is not None else partial_top[:, :, None]  # a placeholder, never read
        kw, vw = _unit_last(key.window), _unit_last(value.window)
        merge_warps = options.merge_warps or (MERGE_DOT_WARPS if launch.merge_dot else MERGE_WARPS)
        _merge_kernel[(cdiv(rows, merge_m), pairs)](
            partial_acc, partial_top, partial_total, queries, offset, kw, vw, mask_tensor, codes_part, value_codec.finish_matrix(device), out,
            launch.splits, rows, q_len, heads, window, encoded, causal_shift, scaling,
            *partial_acc.stride()[:3], queries.stride(0), queries.stride(1), offset.stride(0), offset.stride(1),
            *kw.stride()[:3], *vw.stride()[:3], *mask_strides, codes_part.stride(0), codes_part.stride(1), out.stride(0), out.stride(1),
            DACC=acc_dim, DACC_PAD=acc_pad, DK=head_dim, DK_PAD=dk_pad, DV=value_dim, DV_PAD=dv_pad,
            HAS_OFFSET=key.offset is not None, MASK_MODE=mask_mode, CAUSAL=causal, BLOCK_M=merge_m,
            BLOCK_S=block_s, SPLIT_LOOPS=next_power_of_2(launch.splits) // block_s, BLOCK_W=block_w,
            WINDOW_LOOPS=_loops(window, block_w),
            DOT=launch.merge_dot, BLOCK_K=_finish_block(launch.merge_dot, merge_m, dv_pad), num_warps=merge_warps,
        )  # fmt: skip
    return out.view(batch, q_heads, q_len, value_dim)


def _finish_block(dot: bool, block_m: int, dv_pad: int) -> int:
    """Coordinates of the code part the merge rotates back a step: on CUDA cores a ``(rows, step, dv)``
    product of at most `_MERGE_TILE` elements."""
    return 32 if dot else max(1, min(32, _MERGE_TILE // (block_m * dv_pad)))


def _unit_last(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with a unit stride along its last dim (the kernels index it so); copied only if needed."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _word_aligned(packed: torch.Tensor) -> bool:
    """Whether every row of ``packed`` starts on a 4-byte boundary (the register look-ups load 32-bit words)."""
    return packed.data_ptr() % 4 == 0 and all(stride % 4 == 0 for stride in packed.stride()[:-1])


def _loops(count: int, block: int) -> int:
    """Blocks to cover ``count``, rounded up to a power of two past 8 (few compiled variants as ``count`` grows:
    a decode window cycles through ``chunk`` sizes, so it takes at most two)."""
    loops = cdiv(count, block)
    return loops if loops <= 8 else next_power_of_2(loops)


def _low(kv: CompressedKV) -> float:
    """log2 of log byte 1 for log-coded factors (unused otherwise)."""
    return kv.log_factors.low if kv.log_factors is not None else 0.0


__all__ = ["DEFAULT_SMS", "INTERPRETED", "KernelOptions", "Plan", "plan", "sm_count", "triton_codes_attention"]
