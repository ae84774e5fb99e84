"""Fused GPU encode: the rotation as one GEMM, then nearest levels, alignment and packing in one Triton kernel.

``codec.encode`` on a GPU runs a bucketize, a gather, reductions and the bit packing as separate
torch passes over ``(n, D)`` temporaries. Here one kernel reads each rotated row once and writes
its packed index bytes, ``<u, c[idx]>`` and, for ``prod``, the residual; with code search
(``search=True``) it also tries every scaling ``t`` of the grid (``quantize.search_grid``) and keeps
the codes whose levels have the largest cosine with ``u``, as ``TurboQuantCodec._quantize_torch``
does. The QJL signs of ``prod`` are one more GEMM on the residual; the factors come from
``TurboQuantCodec.factors``.

The codes are bit-identical to ``codec.encode``: ``u = y * (1 / |x|)`` is the same float32
product, and the nearest level is the same count of midpoints below ``u`` (``torch.bucketize``).
The float32 sums (alignment, energy) are taken in another order, so the factors agree to float32
rounding; code search's float64 cosines likewise, so a row whose best two scalings tie to 1e-16
could pick the other one.

API for callers (the index, the KV cache): ``encode(codec, x) -> Codes`` and, one level down,
``quantize(codec, rotated, norms, keep_residual) -> Quantized`` with the pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tqindex._arrays import as_float_rows
from tqindex.codec import Codes, TurboQuantCodec

_BLOCK_D = 64  # coordinates per step
_BLOCK_R = 16  # rows per program


@dataclass(frozen=True)
class Quantized:
    """What the quantize kernel makes of ``n`` rotated rows.

    ``packed`` uint8 ``(n, code_bytes)`` with the index fields filled (sign bytes 0);
    ``alignment`` ``<u, c[idx]>`` float32 ``(n,)``; ``energy`` ``|c[idx]|^2`` float32 ``(n,)`` with
    code search, else None; ``residual`` float32 ``(n, D)`` when asked (``u - c[idx]``, or
    ``u - a c[idx]``, ``a = alignment / energy``, with code search), else None.
    """

    packed: torch.Tensor
    alignment: torch.Tensor
    energy: torch.Tensor | None
    residual: torch.Tensor | None


@triton.jit
def _nearest(value, bounds_ptr, START: tl.constexpr, STEPS: tl.constexpr):
    """Count of the sorted midpoints ``bounds[START : START + 2^STEPS - 1]`` below ``value`` (== ``torch.bucketize``)."""
    lo = tl.zeros(value.shape, dtype=tl.int32)
    hi = tl.zeros(value.shape, dtype=tl.int32) + ((1 << STEPS) - 1)
    for _ in tl.static_range(STEPS):
        mid = (lo + hi) >> 1
        active = lo < hi
        below = active & (tl.load(bounds_ptr + START + mid, mask=active, other=0.0) < value)
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(active & ~below, mid, hi)
    return lo


@triton.jit
def _levels_and_index(value, cols, bounds_ptr, levels_ptr, BASE_BITS: tl.constexpr, EXTRA: tl.constexpr):
    """Nearest level index (int32) and level (float32) of each ``value``; coordinates below ``EXTRA`` use the second codebook."""
    N_LO: tl.constexpr = 1 << BASE_BITS
    index = _nearest(value, bounds_ptr, 0, BASE_BITS)
    offset = tl.zeros(value.shape, dtype=tl.int32)
    if EXTRA > 0:
        high = _nearest(value, bounds_ptr, N_LO - 1, BASE_BITS + 1)
        extra = cols < EXTRA
        index = tl.where(extra, high, index)
        offset = tl.where(extra, N_LO, 0)
    return index, tl.load(levels_ptr + offset + index)


@triton.jit
def _cosine_key(rotated_ptr, inverse, rows, row_ok, t, bounds_ptr, levels_ptr,
                D: tl.constexpr, BASE_BITS: tl.constexpr, EXTRA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """Code search's key for the codes ``nearest(t u)``: ``<u, c> |<u, c>| / |c|^2`` in float64, ``(BLOCK_R,)``."""
    dot = tl.zeros((BLOCK_R,), dtype=tl.float64)
    energy = tl.zeros((BLOCK_R,), dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)[None, :]
        mask = row_ok[:, None] & (cols < D)
        unit = tl.load(rotated_ptr + rows[:, None] * D + cols, mask=mask, other=0.0) * inverse[:, None]
        _, level = _levels_and_index(t * unit, cols, bounds_ptr, levels_ptr, BASE_BITS, EXTRA)
        level = tl.where(mask, level, 0.0).to(tl.float64)
        dot += tl.sum(level * unit.to(tl.float64), axis=1)
        energy += tl.sum(level * level, axis=1)
    return dot * tl.abs(dot) / tl.maximum(energy, 1e-300)


@triton.jit
def _store_field(row_ptrs, row_mask, index, cols, d0, STOP: tl.constexpr, WIDTH: tl.constexpr, SHIFT: tl.constexpr,
                 OFFSET: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """Pack bits ``SHIFT ..`` of the indices ``[BLOCK_R, BLOCK_D]`` of coordinates ``d0 ..`` into one field's bytes (``packing.py``)."""
    PER_BYTE: tl.constexpr = 8 // WIDTH
    NB: tl.constexpr = BLOCK_D // PER_BYTE
    values = tl.where(cols < STOP, (index >> SHIFT) & ((1 << WIDTH) - 1), 0)
    slots = (tl.arange(0, PER_BYTE) * WIDTH)[None, None, :]
    byte = tl.sum(tl.reshape(values, (BLOCK_R, NB, PER_BYTE)) << slots, axis=2)
    at = d0 // PER_BYTE + tl.arange(0, NB)[None, :]
    tl.store(row_ptrs + OFFSET + at, byte.to(tl.uint8), mask=row_mask & (at < (STOP + PER_BYTE - 1) // PER_BYTE))


@triton.jit
def _quantize_kernel(
    rotated_ptr, inverse_ptr, bounds_ptr, levels_ptr, grid_ptr, packed_ptr, alignment_ptr, energy_ptr, residual_ptr,
    n_rows, n_grid, grid_start,
    D: tl.constexpr, CODE_BYTES: tl.constexpr, FIELDS: tl.constexpr, BASE_BITS: tl.constexpr, EXTRA: tl.constexpr,
    SEARCH: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Rows ``[pid * BLOCK_R, ...)``: packed index bytes, alignment, energy (SEARCH), residual (RESIDUAL)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)
    inverse = tl.load(inverse_ptr + rows, mask=row_ok, other=0.0)
    t = tl.full((BLOCK_R,), 1.0, dtype=tl.float32)
    if SEARCH:  # the first scaling of largest cosine; the plain codes (t = 1) on a tie
        best = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float64)
        best_t = tl.zeros((BLOCK_R,), dtype=tl.float32)
        g = 0
        while g < n_grid:  # not range(): Triton 3.6's interpreter cannot take tensor bounds under NumPy >= 2.5
            scale = tl.load(grid_ptr + g)
            key = _cosine_key(rotated_ptr, inverse, rows, row_ok, scale, bounds_ptr, levels_ptr, D, BASE_BITS, EXTRA, BLOCK_R, BLOCK_D)
            better = key > best
            best = tl.where(better, key, best)
            best_t = tl.where(better, scale, best_t)
            g += 1
        plain = _cosine_key(rotated_ptr, inverse, rows, row_ok, tl.load(grid_ptr + grid_start), bounds_ptr, levels_ptr,
                            D, BASE_BITS, EXTRA, BLOCK_R, BLOCK_D)  # fmt: skip
        t = tl.where(plain == best, tl.load(grid_ptr + grid_start), best_t)
    alignment = tl.zeros((BLOCK_R,), dtype=tl.float32)
    energy = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)[None, :]
        mask = row_ok[:, None] & (cols < D)
        unit = tl.load(rotated_ptr + rows[:, None] * D + cols, mask=mask, other=0.0) * inverse[:, None]
        scaled = unit
        if SEARCH:
            scaled = t[:, None] * unit
        index, level = _levels_and_index(scaled, cols, bounds_ptr, levels_ptr, BASE_BITS, EXTRA)
        level = tl.where(mask, level, 0.0)
        alignment += tl.sum(unit * level, axis=1)
        energy += tl.sum(level * level, axis=1)
        for f in tl.static_range(len(FIELDS)):  # FIELDS[f] = (stop, width, shift, offset)
            _store_field(packed_ptr + rows[:, None] * CODE_BYTES, row_ok[:, None], index, cols, d0,
                         FIELDS[f][0], FIELDS[f][1], FIELDS[f][2], FIELDS[f][3], BLOCK_R, BLOCK_D)  # fmt: skip
        if RESIDUAL and not SEARCH:
            tl.store(residual_ptr + rows[:, None] * D + cols, unit - level, mask=mask)
    tl.store(alignment_ptr + rows, alignment, mask=row_ok)
    if SEARCH:
        tl.store(energy_ptr + rows, energy, mask=row_ok)
        if RESIDUAL:  # u - a c with the least-squares a, once alignment and energy are known
            a = alignment / tl.maximum(energy, 1e-30)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)[None, :]
                mask = row_ok[:, None] & (cols < D)
                unit = tl.load(rotated_ptr + rows[:, None] * D + cols, mask=mask, other=0.0) * inverse[:, None]
                _, level = _levels_and_index(t[:, None] * unit, cols, bounds_ptr, levels_ptr, BASE_BITS, EXTRA)
                tl.store(residual_ptr + rows[:, None] * D + cols, unit - a[:, None] * level, mask=mask)


def quantize(codec: TurboQuantCodec, rotated: torch.Tensor, norms: torch.Tensor, keep_residual: bool) -> Quantized:
    """The fused quantize + pack kernel on rotated rows ``(n, D)`` float32 and their norms ``(n,)``.

    CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``. Scalar quantizer only (trellis codes
    are encoded on the CPU).
    """
    if codec.trellis is not None:
        raise ValueError("the fused encode writes scalar codes; trellis codes are encoded by codec.encode")
    n, device = rotated.shape[0], rotated.device
    layout = codec.layout
    rotated = rotated.to(torch.float32).contiguous()
    inverse = 1 / norms.clamp_min(torch.finfo(torch.float32).tiny)
    search = bool(codec.config.search)
    packed = torch.zeros((n, layout.code_bytes), dtype=torch.uint8, device=device)
    alignment = torch.empty(n, dtype=torch.float32, device=device)
    energy = torch.empty(n, dtype=torch.float32, device=device) if search else None
    residual = torch.empty((n, layout.dim), dtype=torch.float32, device=device) if keep_residual else None
    bounds = torch.cat([codec._bounds_lo, codec._bounds_hi])
    grid = codec._search_grid_t
    _quantize_kernel[(triton.cdiv(n, _BLOCK_R),)](
        rotated, inverse, codec._on(bounds, device), codec._on(codec.levels, device), codec._on(grid, device),
        packed, alignment, energy if search else alignment, residual if keep_residual else rotated,
        n, grid.shape[0], codec._search_start,
        D=layout.dim, CODE_BYTES=layout.code_bytes, FIELDS=tuple((f.stop, f.width, f.shift, f.offset) for f in layout.index_fields),
        BASE_BITS=layout.base_bits, EXTRA=layout.extra_coords, SEARCH=search, RESIDUAL=keep_residual,
        BLOCK_R=_BLOCK_R, BLOCK_D=_BLOCK_D,
    )  # fmt: skip
    return Quantized(packed, alignment, energy, residual)


def _pack_signs(codec: TurboQuantCodec, packed: torch.Tensor, signs: torch.Tensor) -> None:
    """Write QJL signs bool ``(n, D)`` into the sign field of ``packed`` (in place)."""
    field = codec.layout.sign_field
    padded = torch.zeros((signs.shape[0], field.nbytes * 8), dtype=torch.uint8, device=signs.device)
    padded[:, : field.stop] = signs
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=signs.device)
    packed[:, field.offset : field.offset + field.nbytes] = (padded.view(-1, field.nbytes, 8) * weights).sum(dim=2, dtype=torch.uint8)


def encode(codec: TurboQuantCodec, x: torch.Tensor) -> Codes:
    """``codec.encode`` for a tensor on the GPU (or CPU under the interpreter): rotation GEMM + fused kernel.

    ``x`` float ``(n, d)`` or ``(d,)``; returns ``Codes`` of torch tensors on ``x``'s device, packed
    bytes identical to ``codec.encode(x)``. Raises ValueError for non-finite input or norms that
    overflow float32, as ``codec.encode`` does.
    """
    rows = as_float_rows(x, codec.dim, "x")
    norms = torch.linalg.vector_norm(rows, dim=1)
    prod = codec.config.variant == "prod"
    parts = quantize(codec, codec.rotation.forward(rows), norms, keep_residual=prod)
    if prod:
        _pack_signs(codec, parts.packed, codec.qjl_signs(parts.residual))
    factors = codec.factors(norms, parts.alignment, parts.residual, parts.energy)
    if not bool(torch.isfinite(factors).all()):
        raise ValueError("x has a vector whose norm overflows float32: scale the vectors down")
    return Codes(parts.packed, factors)
