"""Triton kernel for the code part of attention: scores from key codes, softmax, value sum from value codes.

One program per (batch x KV head ``n``, block of ``BLOCK_M`` query rows). It walks the encoded
tokens in blocks of ``BLOCK_T``: unpacks each token's key code (shift-and-mask per bit field of
`tqindex.packing.BitLayout`, codebook look-up), takes the dot product with the rotated query
(plus the QJL sign term for prod), scales, adds the mask bias, keeps a running max and sum of
exponentials (online softmax), and accumulates ``p * scale * level`` of the value codes in
rotated space. Nothing is decoded to memory. Same contract as `attention._partial_torch`:
returns the unnormalised rotated accumulator ``(N, M, Dacc)``, the running max ``(N, M)`` and
the sum of exponentials ``(N, M)``.

Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (set before triton is imported).
Needs keys and values with the same rotated dim.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from tqindex.codec import Codes, TurboQuantCodec
from tqindex.packing import BitLayout

_BLOCK_M = 16
_BLOCK_T = 32
_PLAN_ROWS = 4  # per field: byte index, bit position, value mask, shift into the index


@lru_cache(maxsize=64)
def _plans(layout: BitLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each coordinate's bits live: int32 ``(fields, 4, D)`` index plan and ``(2, D)`` sign plan.

    A coordinate outside a field's prefix gets mask 0, so it contributes nothing from that field.
    """
    coords = torch.arange(layout.dim)
    rows = []
    for field in layout.index_fields:
        inside = coords < field.stop
        rows.append(
            torch.stack(
                [
                    torch.where(inside, field.offset + coords // field.per_byte, 0),
                    torch.where(inside, coords % field.per_byte * field.width, 0),
                    torch.where(inside, (1 << field.width) - 1, 0),
                    torch.full_like(coords, field.shift),
                ]
            )
        )
    index_plan = torch.stack(rows) if rows else torch.zeros((0, _PLAN_ROWS, layout.dim), dtype=torch.int64)
    signs = layout.sign_field
    sign_plan = torch.stack([signs.offset + coords // 8, coords % 8]) if signs else torch.zeros((2, layout.dim), dtype=torch.int64)
    return index_plan.to(device, torch.int32).contiguous(), sign_plan.to(device, torch.int32).contiguous()


@triton.jit
def _levels(P, row_starts, lmask, PLAN, LEVELS, LOFF, offs_d, dmask, D: tl.constexpr, FIELDS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Codebook levels of ``BLOCK_T`` packed rows starting at ``P + row_starts``: ``(BLOCK_T, BLOCK_D)``."""
    idx = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.int32)
    for f in tl.static_range(FIELDS):
        byte = tl.load(PLAN + (f * 4 + 0) * D + offs_d, mask=dmask, other=0)
        bit = tl.load(PLAN + (f * 4 + 1) * D + offs_d, mask=dmask, other=0)
        keep = tl.load(PLAN + (f * 4 + 2) * D + offs_d, mask=dmask, other=0)
        shift = tl.load(PLAN + (f * 4 + 3) * D + offs_d, mask=dmask, other=0)
        raw = tl.load(P + row_starts[:, None] + byte[None, :], mask=lmask, other=0).to(tl.int32)
        idx = idx | (((raw >> bit[None, :]) & keep[None, :]) << shift[None, :])
    offsets = tl.load(LOFF + offs_d, mask=dmask, other=0)
    return tl.load(LEVELS + idx + offsets[None, :], mask=lmask, other=0.0)


@triton.jit
def _signs(P, row_starts, lmask, SIGN_PLAN, offs_d, dmask, D: tl.constexpr):
    """QJL signs (+-1, 0 where masked) of packed rows starting at ``P + row_starts``."""
    byte = tl.load(SIGN_PLAN + offs_d, mask=dmask, other=0)
    bit = tl.load(SIGN_PLAN + D + offs_d, mask=dmask, other=0)
    raw = tl.load(P + row_starts[:, None] + byte[None, :], mask=lmask, other=0).to(tl.int32)
    return tl.where(lmask, ((raw >> bit[None, :]) & 1).to(tl.float32) * 2.0 - 1.0, 0.0)


@triton.jit
def _codes_attention_kernel(
    Q, KP, KF, VP, VF, BIAS, ACC, TOP, TOTAL,
    K_PLAN, K_SIGN_PLAN, K_LEVELS, K_LOFF, V_PLAN, V_SIGN_PLAN, V_LEVELS, V_LOFF,
    tokens, rows, q_len, heads, scaling,
    sq_n, sq_m, skp_n, skp_t, skf_n, skf_t, svp_n, svp_t, svf_n, svf_t, sb_b, sb_l, sb_t, sa_n, sa_m,
    D: tl.constexpr, K_FIELDS: tl.constexpr, V_FIELDS: tl.constexpr, K_SIGNS: tl.constexpr, V_SIGNS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)  # offsets past 2**31 bytes on long caches
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < rows
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q_ptrs = Q + n * sq_n + offs_m[:, None] * sq_m + offs_d[None, :]
    qmask = mmask[:, None] & dmask[None, :]
    q = tl.load(q_ptrs, mask=qmask, other=0.0)
    if K_SIGNS:
        q_qjl = tl.load(q_ptrs + D, mask=qmask, other=0.0)
    bias_rows = BIAS + (n // heads) * sb_b + (offs_m % q_len)[:, None] * sb_l

    top = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_qjl = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(0, tokens, BLOCK_T):
        offs_t = start + tl.arange(0, BLOCK_T)
        tmask = offs_t < tokens
        lmask = tmask[:, None] & dmask[None, :]

        key_rows = n * skp_n + offs_t * skp_t
        levels = _levels(KP, key_rows, lmask, K_PLAN, K_LEVELS, K_LOFF, offs_d, dmask, D, K_FIELDS, BLOCK_T, BLOCK_D)
        key_scale = tl.load(KF + n * skf_n + offs_t * skf_t, mask=tmask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(levels), input_precision="ieee") * key_scale[None, :]
        if K_SIGNS:
            signs = _signs(KP, key_rows, lmask, K_SIGN_PLAN, offs_d, dmask, D)
            key_qjl = tl.load(KF + n * skf_n + offs_t * skf_t + 1, mask=tmask, other=0.0).to(tl.float32)
            s += tl.dot(q_qjl, tl.trans(signs), input_precision="ieee") * key_qjl[None, :]
        bias = tl.load(bias_rows + offs_t[None, :] * sb_t, mask=mmask[:, None] & tmask[None, :], other=float("-inf"))
        s = tl.where(tmask[None, :], s * scaling + bias, float("-inf"))

        new_top = tl.maximum(top, tl.max(s, axis=1))
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)
        alpha = tl.exp(top - shift)
        p = tl.exp(s - shift[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        top = new_top

        value_rows = n * svp_n + offs_t * svp_t
        levels = _levels(VP, value_rows, lmask, V_PLAN, V_LEVELS, V_LOFF, offs_d, dmask, D, V_FIELDS, BLOCK_T, BLOCK_D)
        value_scale = tl.load(VF + n * svf_n + offs_t * svf_t, mask=tmask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, levels * value_scale[:, None], input_precision="ieee")
        if V_SIGNS:
            signs = _signs(VP, value_rows, lmask, V_SIGN_PLAN, offs_d, dmask, D)
            value_qjl = tl.load(VF + n * svf_n + offs_t * svf_t + 1, mask=tmask, other=0.0).to(tl.float32)
            acc_qjl = acc_qjl * alpha[:, None] + tl.dot(p, signs * value_qjl[:, None], input_precision="ieee")

    acc_ptrs = ACC + n * sa_n + offs_m[:, None] * sa_m + offs_d[None, :]
    tl.store(acc_ptrs, acc, mask=qmask)
    if V_SIGNS:
        tl.store(acc_ptrs + D, acc_qjl, mask=qmask)
    tl.store(TOP + n * rows + offs_m, top, mask=mmask)
    tl.store(TOTAL + n * rows + offs_m, total, mask=mmask)


@lru_cache(maxsize=64)
def _codebook(codec: TurboQuantCodec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index plan, sign plan, levels (float32) and per-coordinate level offsets (int32) on ``device``, made once."""
    index_plan, sign_plan = _plans(codec.layout, device)
    return index_plan, sign_plan, codec.levels.to(device), codec.level_offsets.to(device, torch.int32)


def partial_triton(
    queries: torch.Tensor,
    key_codes: Codes,
    value_codes: Codes,
    bias: torch.Tensor,
    heads: int,
    scaling: float,
    key_codec: TurboQuantCodec,
    value_codec: TurboQuantCodec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotated queries ``(N, M, Dq)``, codes ``(N, Tc, .)``, bias ``(B, L, Tc)`` -> acc ``(N, M, Dacc)``, max, sum ``(N, M)``."""
    dim = key_codec.rotated_dim
    if value_codec.rotated_dim != dim:
        raise ValueError(f"the Triton kernel needs keys and values of one rotated dim, got {dim} and {value_codec.rotated_dim}")
    n, rows, _ = queries.shape
    tokens, q_len = key_codes.packed.shape[1], bias.shape[1]
    device = queries.device
    queries = queries.contiguous()
    kp, kf, vp, vf = (a.contiguous() for a in (key_codes.packed, key_codes.factors, value_codes.packed, value_codes.factors))
    acc = torch.empty((n, rows, dim * value_codec.n_factors), dtype=torch.float32, device=device)
    top = torch.empty((n, rows), dtype=torch.float32, device=device)
    total = torch.empty_like(top)
    grid = (n, triton.cdiv(rows, _BLOCK_M))
    _codes_attention_kernel[grid](
        queries, kp, kf, vp, vf, bias, acc, top, total,
        *_codebook(key_codec, device), *_codebook(value_codec, device),
        tokens, rows, q_len, heads, scaling,
        queries.stride(0), queries.stride(1), kp.stride(0), kp.stride(1), kf.stride(0), kf.stride(1),
        vp.stride(0), vp.stride(1), vf.stride(0), vf.stride(1), *bias.stride(), acc.stride(0), acc.stride(1),
        D=dim, K_FIELDS=len(key_codec.layout.index_fields), V_FIELDS=len(value_codec.layout.index_fields),
        K_SIGNS=key_codec.qjl is not None, V_SIGNS=value_codec.qjl is not None,
        BLOCK_M=_BLOCK_M, BLOCK_T=_BLOCK_T, BLOCK_D=max(16, triton.next_power_of_2(dim)),
    )  # fmt: skip
    return acc, top, total
