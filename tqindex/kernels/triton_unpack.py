"""Triton helpers that turn packed rows (``packing.BitLayout``) into tiles of level values and QJL signs.

The one unpacking routine of every Triton kernel here (the index scan, the KV attention):

* ``unpack_levels(row_ptrs, row_mask, d0, levels_ptr, FIELDS, LEVELS, N_LO, EXTRA, DIM, BLOCK_D, GATHER_ASM)``
  -> float32 ``[R, BLOCK_D]``: the codebook level ``c[idx]`` of coordinates ``d0 .. d0 + BLOCK_D``
  of ``R`` rows (0 for coordinates at or past ``DIM``).
* ``unpack_signs(row_ptrs, row_mask, d0, SIGN_OFFSET, DIM, BLOCK_D)`` -> float32 ``[R, BLOCK_D]``:
  the QJL signs as +-1 (0 past ``DIM``).
* ``unpack_indices(row_ptrs, row_mask, d0, FIELDS, DIM, BLOCK_D)`` -> int32 ``[R, BLOCK_D]`` code indices.

``row_ptrs`` is a ``[R, 1]`` tensor of ``uint8`` pointers to the first byte of each packed row,
``row_mask`` ``[R, 1]`` bool (masked rows read as index 0: callers mask their scores), ``d0`` a
multiple of ``BLOCK_D`` below ``DIM`` (``BLOCK_D`` a power of two >= 8, so every field's bytes
split evenly). The constexpr
arguments come from ``unpack_constants(codec)``; ``levels_ptr`` from ``levels_table(codec, device)``.

How a field is read: the ``BLOCK_D * width / 8`` bytes that hold the block's coordinates are one
contiguous run per row, so one load of a ``[R, bytes]`` uint8 tile (vectorised, coalesced across
rows) brings each byte in once; shifts and masks split every byte into its ``8 // width`` values
and ``tl.interleave`` puts them in coordinate order, all in registers. Fields are ORed into the
index at their bit shift; the extra-bit field of a fractional layout covers a prefix, and its
coordinates take levels from the second codebook (``N_LO`` entries on).

How a level is looked up: a 1-bit codebook (2 levels) is one select, no memory access; a larger one
is one gather per value from the float32 table at ``levels_ptr`` (at most 2^8 + 2^9 floats; at 4
bits the 16 entries share one 64-byte line, so a warp's 32 gathers hit one L1 line). Compiled, the
gather is an inline PTX load (``ld.global.nc``): being elementwise, it keeps the unpack's register
layout, where a ``tl.load`` of a gathered pointer tensor gets a layout of its own and every tile
crosses shared memory to reach it. Measured on an H200 (benchmarks/bench_gpu.py, 10M x 768, one
query): 4 bits 2.8 ms with the PTX gather, 7.7 with ``tl.load``; 2 bits 2.75 ms gathering vs 3.57
with a 3-select tree, so select trees stop at 2 levels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tqindex.codec import TurboQuantCodec

#: codebooks of at most this many levels are looked up by a constexpr select, larger ones by a gather
SELECT_LEVELS = tl.constexpr(2)


def unpack_constants(codec: TurboQuantCodec, select: bool = True, gather_asm: bool | None = None) -> dict[str, object]:
    """The constexpr keyword arguments of ``unpack_levels``/``unpack_signs`` for ``codec``'s layout.

    ``FIELDS``: ``((stop, width, shift, offset), ...)`` of the index fields; ``LEVELS``: every level
    (base codebook, then the extra-bit one) as Python floats, exactly the float32 values, or ``()``
    with ``select=False``, which makes every lookup a gather (for measuring the two); ``N_LO``:
    base levels; ``EXTRA``: coordinates with one more bit; ``SIGN_OFFSET``: first byte of the QJL
    sign field, -1 without one; ``DIM``: rotated coordinates; ``GATHER_ASM``: gathers as inline PTX
    loads (``gather_asm``; None: wherever kernels are compiled, i.e. not under the interpreter,
    which runs no PTX). Raises ValueError for ``gather_asm=True`` under the interpreter.
    """
    layout = codec.layout
    return {
        "FIELDS": tuple((f.stop, f.width, f.shift, f.offset) for f in layout.index_fields),
        "LEVELS": tuple(float(v) for v in codec.levels.tolist()) if select else (),
        "N_LO": 1 << layout.base_bits,
        "EXTRA": layout.extra_coords,
        "SIGN_OFFSET": layout.sign_field.offset if layout.sign_field is not None else -1,
        "DIM": layout.dim,
        "GATHER_ASM": resolve_gather_asm(gather_asm),
    }


def resolve_gather_asm(gather_asm: bool | None) -> bool:
    """``GATHER_ASM`` for a choice: None means wherever the kernels are compiled; True raises
    ValueError under the interpreter."""
    if gather_asm is None:
        return COMPILED
    if gather_asm and not COMPILED:
        raise ValueError("gather_asm=True needs compiled kernels: the interpreter (TRITON_INTERPRET=1) runs no PTX")
    return gather_asm


def levels_table(codec: TurboQuantCodec, device: torch.device | str) -> torch.Tensor:
    """The levels as float32 ``(L,)`` on ``device``: the table ``unpack_levels`` gathers from."""
    return codec._on(codec.levels, torch.device(device))


@triton.jit
def _field_values(
    row_ptrs, row_mask, d0, STOP: tl.constexpr, WIDTH: tl.constexpr, OFFSET: tl.constexpr, DIM: tl.constexpr, BLOCK_D: tl.constexpr
):  # fmt: skip
    """The ``WIDTH``-bit values of one field for coordinates ``d0 + [0, BLOCK_D)``: int32 ``[R, BLOCK_D]``.

    Coordinates at or past ``STOP`` read 0 (padding bits are 0, and bytes past the field are masked).
    A field over all of ``DIM``, a multiple of ``BLOCK_D``, needs no column mask (callers stay below
    ``DIM``), so its loads stay wide.
    """
    PER_BYTE: tl.constexpr = 8 // WIDTH
    NBYTES: tl.constexpr = (STOP + PER_BYTE - 1) // PER_BYTE
    MASK: tl.constexpr = (1 << WIDTH) - 1
    at = (d0 // BLOCK_D) * (BLOCK_D // PER_BYTE) + tl.arange(0, BLOCK_D // PER_BYTE)  # written so its alignment is known
    if STOP == DIM and DIM % BLOCK_D == 0:
        byte = tl.load(row_ptrs + OFFSET + at[None, :], mask=row_mask, other=0).to(tl.int32)
    else:
        byte = tl.load(row_ptrs + OFFSET + at[None, :], mask=row_mask & (at < NBYTES)[None, :], other=0).to(tl.int32)
    if PER_BYTE == 1:
        return byte
    elif PER_BYTE == 2:
        return tl.interleave(byte & MASK, byte >> 4)
    elif PER_BYTE == 4:
        even = tl.interleave(byte & MASK, (byte >> 4) & MASK)  # slots 0, 2
        odd = tl.interleave((byte >> 2) & MASK, byte >> 6)  # slots 1, 3
        return tl.interleave(even, odd)
    else:
        # slots in bit-reversed order, so that three interleaves restore 0..7
        s04 = tl.interleave(byte & 1, (byte >> 4) & 1)
        s26 = tl.interleave((byte >> 2) & 1, (byte >> 6) & 1)
        s15 = tl.interleave((byte >> 1) & 1, (byte >> 5) & 1)
        s37 = tl.interleave((byte >> 3) & 1, byte >> 7)
        return tl.interleave(tl.interleave(s04, s26), tl.interleave(s15, s37))


@triton.jit
def unpack_indices(row_ptrs, row_mask, d0, FIELDS: tl.constexpr, DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Code indices of coordinates ``d0 + [0, BLOCK_D)`` of each row: int32 ``[R, BLOCK_D]``."""
    index = tl.zeros((row_ptrs.shape[0], BLOCK_D), dtype=tl.int32)
    for f in tl.static_range(len(FIELDS)):  # FIELDS[f] = (stop, width, shift, offset)
        index |= _field_values(row_ptrs, row_mask, d0, FIELDS[f][0], FIELDS[f][1], FIELDS[f][3], DIM, BLOCK_D) << FIELDS[f][2]
    return index


@triton.jit
def _lookup(index, levels_ptr, LEVELS: tl.constexpr, START: tl.constexpr, COUNT: tl.constexpr, GATHER_ASM: tl.constexpr):
    """``levels[START + index]`` for indices below ``COUNT``: float32, in registers up to ``SELECT_LEVELS``
    (when ``LEVELS`` holds them), else a gather from ``levels_ptr``."""
    if len(LEVELS) == 0 or COUNT > SELECT_LEVELS:
        if GATHER_ASM:  # elementwise: keeps the unpack's register layout, where a tl.load gather gets its own
            base = levels_ptr.to(tl.int64, bitcast=True) + 4 * START + tl.zeros(index.shape, dtype=tl.int64)
            return tl.inline_asm_elementwise(
                "{ .reg .u64 a; mul.wide.u32 a, $2, 4; add.u64 a, a, $1; ld.global.nc.f32 $0, [a]; }",
                "=r,l,r", [base, index], dtype=tl.float32, is_pure=True, pack=1,
            )  # fmt: skip
        return tl.load(levels_ptr + START + index)
    elif COUNT == 1:
        return tl.zeros(index.shape, dtype=tl.float32) + LEVELS[START]
    else:
        return tl.where(index != 0, LEVELS[START + 1], LEVELS[START])


@triton.jit
def unpack_levels(
    row_ptrs, row_mask, d0, levels_ptr,
    FIELDS: tl.constexpr, LEVELS: tl.constexpr, N_LO: tl.constexpr, EXTRA: tl.constexpr, DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    GATHER_ASM: tl.constexpr,
):  # fmt: skip
    """Levels ``c[idx]`` of coordinates ``d0 + [0, BLOCK_D)`` of each row: float32 ``[R, BLOCK_D]``, 0 past ``DIM``."""
    index = unpack_indices(row_ptrs, row_mask, d0, FIELDS, DIM, BLOCK_D)
    levels = _lookup(index, levels_ptr, LEVELS, 0, N_LO, GATHER_ASM)
    cols = d0 + tl.arange(0, BLOCK_D)[None, :]
    if EXTRA > 0:
        levels = tl.where(cols < EXTRA, _lookup(index, levels_ptr, LEVELS, N_LO, 2 * N_LO, GATHER_ASM), levels)
    if DIM % BLOCK_D != 0:
        levels = tl.where(cols < DIM, levels, 0.0)
    return levels


# decided when triton decorates: TRITON_INTERPRET=1 at import runs the kernels in the interpreter
COMPILED = isinstance(unpack_levels, triton.runtime.JITFunction)


@triton.jit
def unpack_signs(row_ptrs, row_mask, d0, SIGN_OFFSET: tl.constexpr, DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """QJL signs of coordinates ``d0 + [0, BLOCK_D)`` of each row as +-1: float32 ``[R, BLOCK_D]``, 0 past ``DIM``."""
    signs = _field_values(row_ptrs, row_mask, d0, DIM, 1, SIGN_OFFSET, DIM, BLOCK_D).to(tl.float32) * 2.0 - 1.0
    if DIM % BLOCK_D != 0:
        signs = tl.where(d0 + tl.arange(0, BLOCK_D)[None, :] < DIM, signs, 0.0)
    return signs
