"""Triton helpers that turn packed rows (``packing.BitLayout``) into tiles of level values and QJL signs.

The one unpacking routine of every Triton kernel here (the index scan, the KV attention):

* ``unpack_levels(row_ptrs, row_mask, d0, levels_ptr, FIELDS, LEVELS, N_LO, EXTRA, DIM, BLOCK_D, GATHER_ASM)``
  -> float32 ``[R, BLOCK_D]``: the codebook level ``c[idx]`` of coordinates ``d0 .. d0 + BLOCK_D``
  of ``R`` rows (0 for coordinates at or past ``DIM``).
* ``unpack_signs(row_ptrs, row_mask, d0, SIGN_OFFSET, DIM, BLOCK_D)`` -> float32 ``[R, BLOCK_D]``:
  the QJL signs as +-1 (0 past ``DIM``).
* ``unpack_indices(row_ptrs, row_mask, d0, FIELDS, DIM, BLOCK_D)`` -> int32 ``[R, BLOCK_D]`` code indices.

* ``unpack_half_levels(row_ptrs, row_mask, d0, TABLES, ASM, WIDTH, DIM, BLOCK_D, DTYPE)`` -> float16
  or bfloat16 ``[R, BLOCK_D]``: the levels rounded to ``DTYPE``, looked up in registers (below), for
  products on tensor cores, which round the float32 levels to that type anyway.

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

Look-ups in registers, without a gather (codes of 2 or 4 bits in one field over whole 32-bit words:
`half_tables`): PTX ``prmt`` picks bytes from a table held as 32-bit immediates, four levels of a
word of codes at a time (the look-up of llama.cpp's IQ4_NL kernels). At 4 bits two ``prmt`` pick
each index's byte by its low 3 bits from the table words of levels 0-7 and of 8-15, and a third
chooses between them by bit 3; at 2 bits one ``prmt`` looks up four indices. The int8 scan
(`triton_int8`) looks up int8 levels so; `unpack_half_levels` looks up the low and the high bytes
of 16-bit levels and interleaves them (two more ``prmt`` per four levels). The interpreter runs
the same steps with ``prmt`` emulated (`prmt`, `byte_lookup`).
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


# ---- look-ups in registers ------------------------------------------------------------------

#: code widths whose indices tile a 32-bit word and whose levels fit a byte look-up (16 entries)
REGISTER_WIDTHS = (2, 4)
_SELECTOR_REGISTERS = {4: ".reg .b32 s, b, s2, b2, l, h;", 2: ".reg .b32 e, o, e2, o2;"}
_HALF_PAIRS = (0x5140, 0x7362)  # prmt selectors: bytes (lo 0, hi 0, lo 1, hi 1) and (lo 2, hi 2, lo 3, hi 3)


def register_width(codec: TurboQuantCodec) -> int:
    """The code width (2 or 4) of a layout whose levels can be looked up in registers, else 0: one
    index field over every coordinate, first in the row, rows of whole 32-bit words."""
    layout = codec.layout
    fields = layout.index_fields
    if len(fields) != 1 or fields[0].width not in REGISTER_WIDTHS or fields[0].stop != layout.dim or layout.extra_coords:
        return 0
    if fields[0].offset or layout.code_bytes % 4 or layout.dim % (32 // fields[0].width):  # look-ups read from the row's start
        return 0
    return fields[0].width


def selectors_ptx(width: int, word: str) -> str:
    """PTX: the ``prmt`` selectors of one word of codes (register ``word``) for `lookup_ptx`."""
    if width == 4:  # s: each index's low 3 bits; b: byte n from the low (0-3) or high (4-7) table half by its bit 3
        return (
            f"and.b32 s, {word}, 0x77777777; shr.u32 b, {word}, 1; and.b32 b, b, 0x44444444; or.b32 b, b, 0x32103210; "
            "shr.u32 s2, s, 16; shr.u32 b2, b, 16; "
        )
    return f"and.b32 e, {word}, 0x33333333; shr.u32 o, {word}, 2; and.b32 o, o, 0x33333333; shr.u32 e2, e, 16; shr.u32 o2, o, 16; "


def lookup_ptx(table: tuple[int, ...], width: int, outputs: tuple[str, ...]) -> str:
    """PTX: bytes of ``table`` (four 32-bit words, byte ``i`` of word ``w`` for index ``4 w + i``) for
    the indices `selectors_ptx` prepared, into ``outputs``: 4 bits, two words (coordinates 0-3, 4-7);
    2 bits, four (coordinates 0 2 4 6, 8 10 12 14, 1 3 5 7, 9 11 13 15)."""
    t = [f"0x{word & 0xFFFFFFFF:08x}" for word in table]
    if width == 4:
        steps = zip(outputs, ("s", "s2"), ("b", "b2"))
        return "".join(f"prmt.b32 l, {t[0]}, {t[1]}, {s}; prmt.b32 h, {t[2]}, {t[3]}, {s}; prmt.b32 {out}, l, h, {b}; " for out, s, b in steps)
    return "".join(f"prmt.b32 {out}, {t[0]}, 0, {sel}; " for out, sel in zip(outputs, ("e", "e2", "o", "o2")))


def lookup_asm(table: tuple[int, ...], width: int) -> str:
    """PTX of one word of codes (``$`` last) -> ``8 / width`` words of table bytes (`byte_lookup`'s order)."""
    parts = 8 // width
    return "{ " + _SELECTOR_REGISTERS[width] + " " + selectors_ptx(width, f"${parts}") + lookup_ptx(table, width, tuple(f"${i}" for i in range(parts))) + "}"


def half_tables(codec: TurboQuantCodec, dtype: torch.dtype) -> tuple[int, ...]:
    """Byte tables of the levels rounded to ``dtype`` (float16 or bfloat16): four words of their low
    bytes, then four of their high bytes (byte ``i`` of word ``w``: level ``4 w + i``); ``()`` where
    `register_width` is 0 or for another dtype."""
    if not register_width(codec) or dtype not in (torch.float16, torch.bfloat16):
        return ()
    bits = torch.zeros(16, dtype=torch.int32)
    bits[: codec.levels.numel()] = codec.levels.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    table = torch.cat([bits & 0xFF, bits >> 8]).to(torch.uint8).view(torch.int32)
    return tuple(int(word) for word in table.tolist())


def half_asm(tables: tuple[int, ...], width: int) -> str:
    """PTX of `half_words`: one word of codes (``$`` last) -> ``16 / width`` words of two 16-bit levels."""
    parts = 8 // width
    low, high = tuple(f"L{i}" for i in range(parts)), tuple(f"H{i}" for i in range(parts))
    pairs = "".join(f"prmt.b32 ${2 * i + j}, {lo}, {hi}, 0x{_HALF_PAIRS[j]:04x}; " for i, (lo, hi) in enumerate(zip(low, high)) for j in range(2))
    registers = f".reg .b32 {', '.join(low + high)};"
    body = selectors_ptx(width, f"${2 * parts}") + lookup_ptx(tables[:4], width, low) + lookup_ptx(tables[4:], width, high)
    return "{ " + _SELECTOR_REGISTERS[width] + " " + registers + " " + body + pairs + "}"


#: inline PTX runs wherever the kernels are compiled (not under TRITON_INTERPRET=1)
PTX = tl.constexpr(COMPILED)


@triton.jit
def prmt(a, b, sel):
    """PTX ``prmt.b32`` (default mode) on int32 tensors: byte ``n`` of the result is byte
    ``sel[4n : 4n + 3]`` of the eight bytes ``b:a`` (``a`` bytes 0-3). Selector nibbles must be below 8.

    In the interpreter it emulates the look-ups (`byte_lookup`); compiled it is the PTX instruction
    itself, which tests hold to the same definition as the emulation on a GPU."""
    if PTX:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel], dtype=tl.int32, is_pure=True, pack=1)
    else:
        out = tl.zeros_like(sel)
        for n in tl.static_range(4):
            pick = (sel >> (4 * n)) & 7
            byte = (tl.where(pick < 4, a, b) >> ((pick & 3) * 8)) & 0xFF
            out |= byte << (8 * n)
        return out


@triton.jit
def byte_lookup(words, TABLES: tl.constexpr, START: tl.constexpr, WIDTH: tl.constexpr):
    """`lookup_asm`'s steps with ``prmt`` (the interpreter's form): int32 code words ``[R, W]`` ->
    ``8 / WIDTH`` int32 tensors ``[R, W]`` of bytes of the table ``TABLES[START : START + 4]``."""
    zeros = tl.zeros_like(words)
    t0 = zeros + TABLES[START]
    if WIDTH == 4:
        t1, t2, t3 = zeros + TABLES[START + 1], zeros + TABLES[START + 2], zeros + TABLES[START + 3]
        sel = words & 0x77777777
        blend = ((words >> 1) & 0x44444444) | 0x32103210  # byte n from the low (0-3) or high (4-7) half by bit 3 of index n
        low = prmt(prmt(t0, t1, sel), prmt(t2, t3, sel), blend)
        return low, prmt(prmt(t0, t1, sel >> 16), prmt(t2, t3, sel >> 16), blend >> 16)
    else:
        even = words & 0x33333333
        odd = (words >> 2) & 0x33333333
        return prmt(t0, t0, even), prmt(t0, t0, even >> 16), prmt(t0, t0, odd), prmt(t0, t0, odd >> 16)


@triton.jit
def half_words(words, TABLES: tl.constexpr, ASM: tl.constexpr, WIDTH: tl.constexpr):
    """int32 code words ``[R, W]`` -> ``16 / WIDTH`` int32 tensors ``[R, W]`` of two 16-bit levels each
    (`half_tables`): 4 bits, coordinates (0, 1), (2, 3), (4, 5), (6, 7); 2 bits, (0, 2), (4, 6),
    (8, 10), (12, 14), (1, 3), (5, 7), (9, 11), (13, 15). Compiled: ``ASM`` (`half_asm`)."""
    if PTX:
        if WIDTH == 4:
            return tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [words], dtype=(tl.int32,) * 4, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [words], dtype=(tl.int32,) * 8, is_pure=True, pack=1)
    else:
        low = byte_lookup(words, TABLES, 0, WIDTH)
        high = byte_lookup(words, TABLES, 4, WIDTH)
        first = tl.zeros_like(words) + 0x5140
        second = tl.zeros_like(words) + 0x7362
        if WIDTH == 4:
            return prmt(low[0], high[0], first), prmt(low[0], high[0], second), prmt(low[1], high[1], first), prmt(low[1], high[1], second)
        else:
            return (
                prmt(low[0], high[0], first), prmt(low[0], high[0], second), prmt(low[1], high[1], first), prmt(low[1], high[1], second),
                prmt(low[2], high[2], first), prmt(low[2], high[2], second), prmt(low[3], high[3], first), prmt(low[3], high[3], second),
            )  # fmt: skip


@triton.jit
def _halves(pair, DTYPE: tl.constexpr):
    """A word of two 16-bit levels -> the first and the second as ``DTYPE``."""
    return pair.to(tl.int16).to(DTYPE, bitcast=True), (pair >> 16).to(tl.int16).to(DTYPE, bitcast=True)


@triton.jit
def unpack_half_levels(
    row_ptrs, row_mask, d0,
    TABLES: tl.constexpr, ASM: tl.constexpr, WIDTH: tl.constexpr, DIM: tl.constexpr, BLOCK_D: tl.constexpr, DTYPE: tl.constexpr,
):  # fmt: skip
    """Levels rounded to ``DTYPE`` of coordinates ``d0 + [0, BLOCK_D)`` of each row, looked up in
    registers: ``DTYPE`` ``[R, BLOCK_D]``, 0 past ``DIM``. For layouts `register_width` takes: one
    index field, first in the row (offset 0), so words are read from ``row_ptrs``, which must be
    4-byte aligned."""
    WORDS: tl.constexpr = BLOCK_D * WIDTH // 32
    ROW_WORDS: tl.constexpr = DIM * WIDTH // 32
    at = (d0 // BLOCK_D) * WORDS + tl.arange(0, WORDS)  # written so its alignment is known
    ptrs = row_ptrs.to(tl.pointer_type(tl.int32)) + at[None, :]  # int32 steps keep the contiguity: 16-byte loads (4 * at would split them)
    if ROW_WORDS % WORDS == 0:
        words = tl.load(ptrs, mask=row_mask, other=0)
    else:
        words = tl.load(ptrs, mask=row_mask & (at < ROW_WORDS)[None, :], other=0)
    R: tl.constexpr = words.shape[0]
    pairs = half_words(words, TABLES, ASM, WIDTH)
    if ROW_WORDS % WORDS != 0:  # levels past DIM (whole words: register_width) are 0, set as bits: +0.0 in both types
        inside = (at < ROW_WORDS)[None, :]
        pairs = tuple(tl.where(inside, pair, 0) for pair in pairs)
    # coordinate n of a word sits at join depth (bit 0 outermost): the join trees put n = 0 .. 32 / WIDTH - 1 in order
    if WIDTH == 4:
        c0, c1 = _halves(pairs[0], DTYPE)
        c2, c3 = _halves(pairs[1], DTYPE)
        c4, c5 = _halves(pairs[2], DTYPE)
        c6, c7 = _halves(pairs[3], DTYPE)
        levels = tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)), tl.join(tl.join(c1, c5), tl.join(c3, c7)))
    else:
        c0, c2 = _halves(pairs[0], DTYPE)
        c4, c6 = _halves(pairs[1], DTYPE)
        c8, c10 = _halves(pairs[2], DTYPE)
        c12, c14 = _halves(pairs[3], DTYPE)
        c1, c3 = _halves(pairs[4], DTYPE)
        c5, c7 = _halves(pairs[5], DTYPE)
        c9, c11 = _halves(pairs[6], DTYPE)
        c13, c15 = _halves(pairs[7], DTYPE)
        even = tl.join(tl.join(tl.join(c0, c8), tl.join(c4, c12)), tl.join(tl.join(c2, c10), tl.join(c6, c14)))
        levels = tl.join(even, tl.join(tl.join(tl.join(c1, c9), tl.join(c5, c13)), tl.join(tl.join(c3, c11), tl.join(c7, c15))))
    return tl.reshape(levels, (R, BLOCK_D))
