"""Integer dot products of packed 2- and 4-bit codes with int8 queries: byte-permute look-ups and DP4A.

The float form of the Triton scan spends ~6.6 SASS instructions per coordinate at 4 bits (sm_90,
``benchmarks/scan_kernel_sass.py``): extract the index, form an address, gather the float level,
multiply, add, convert the query. Here the levels are rounded to int8, ``L = round(c / s_c)``
with ``s_c = max |c| / 127``, and held as the bytes of up to four 32-bit *table words*
(immediates of the PTX); each query is rounded the same way, ``Q = round(q / s_q)``, one scale
per query. One 32-bit word of packed codes then becomes words of four int8 levels each, in
registers and without a memory gather (`lookup_asm`):

* 4 bits (8 coordinates, the index of coordinate ``j`` in bits ``4j..4j+3``): per half word, two
  ``prmt`` pick each index's level by its low 3 bits from the table words of levels 0-7 and of
  levels 8-15, and a third ``prmt`` chooses between them per byte by the index's bit 3 (the
  look-up of llama.cpp's IQ4_NL kernels); the four level bytes are in coordinate order.
* 2 bits (16 coordinates in bits ``2j..2j+1``): the even and the odd coordinates' indices are
  masked into nibbles and each ``prmt`` looks four of them up in the one table word; the query
  bytes are stored in that order (``query_order``).

On CUDA cores (`int8_dot`) ``dp4a`` adds four int8 products into an int32, exactly; on tensor
cores (`int8_levels`) the level words, read as bytes, are the int8 A operand of ``tl.dot``
against the query bytes (int32 sums, exact). ``benchmarks/scan_kernel_sass.py`` counts 2.8
(4-bit) and 1.6 (2-bit) SASS instructions per coordinate for one query on CUDA cores, and 3.3
(4-bit) for 32 queries on tensor cores (the float forms: 6.6, 7.6 and 8.3).

Exactness (as the CPU fast-scan, ``kernels.fastscan``): per query, the error of ``s_q s_c sum L Q``
against the float estimate ``sum c q`` is bounded per coordinate by ``max_i |c_i q_d - s_c L_i
s_q Q_d|`` over the levels ``i``; the *margin* is the sum of these (``z <= 0``: worst case), or
``min(worst case, z`` standard deviations of the error, levels taken as equally likely``)``, plus
slack for float32 rounding: the kernel's scoring, and the rescoring's sum of ``D`` products (so
that a worst-case row stays under its bound after ``codec.score``). The kernel scores each row
by its upper bound ``f (s_q s_c sum L Q) + |f| margin`` (``f`` the row's length factor), so a
row the scan leaves out cannot beat the k-th best rescored candidate when that is at least the
last candidate's bound; the caller checks that (``scan.below_bounds``) and rescans the queries
where it fails exactly.

Compiled, the look-up and ``dp4a`` are inline PTX (sm_61 and later; int8 ``tl.dot`` needs sm_80);
the interpreter (``TRITON_INTERPRET=1``) runs the same kernel with ``prmt`` and ``dp4a`` emulated
by shifts and masks, so the CPU tests check the data flow, and a test holds both emulations to
the PTX ISA's definitions (on a GPU, the instructions themselves).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from tqindex.codec import TurboQuantCodec
from tqindex.kernels import triton_unpack
from tqindex.kernels.triton_unpack import PTX, byte_lookup

#: the largest int8 magnitude used: levels and queries are symmetric, round(x / s) in -127..127
_INT8_MAX = 127
#: float32 roundings of a row's score in the kernel (int32 sum to float, two products, one fused
#: add), with room to spare; the rescoring's sum of D products adds D more (`Int8Plan._margins`)
_FLOAT_SLACK_OPS = 8
#: queries per step of the margin computation ((q, D, levels) float64 errors at once)
_MARGIN_BLOCK = 64
#: 2-bit words: query bytes in the order the look-ups produce levels (even coordinates, then odd)
_ORDER_2BIT = (0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15)


class Int8Queries(NamedTuple):
    """Queries prepared for the int8 scan: ``words`` int32 ``(m, D / 4)`` (the int8 ``Q`` in
    ``query_order``, four to a word; word ``r`` of code word ``w`` at ``r (D width / 32) + w``),
    ``terms`` float32 ``(m, 2)``: the scale ``s_q s_c`` and the margin of each query, and
    ``rotated`` float32 ``(m, D)``: the queries themselves, for rescoring."""

    words: torch.Tensor
    terms: torch.Tensor
    rotated: torch.Tensor


def check_layout(codec: TurboQuantCodec) -> int:
    """The code width (2 or 4) of a layout the int8 scan takes; ValueError for any other.

    Taken: mse codes of 2 or 4 bits (one index field over every coordinate), ``D`` a multiple
    of ``32 / width`` so that rows are whole 32-bit words.
    """
    layout = codec.layout
    fields = layout.index_fields
    width = fields[0].width if len(fields) == 1 else 0
    if width not in (2, 4) or layout.sign_field is not None or layout.extra_coords:
        raise ValueError(f"the int8 scan takes mse codes of 2 or 4 bits, got {codec.config.bits} bits, {codec.config.variant}")
    if layout.dim % (32 // width):
        raise ValueError(f"the int8 scan needs a rotated dimension that is a multiple of {32 // width} at {width} bits, got {layout.dim}")
    return width


def level_scale(codec: TurboQuantCodec) -> tuple[float, torch.Tensor]:
    """``s_c`` and the int8 levels ``L`` ``(2^bits,)``."""
    levels = codec.levels.to(torch.float64)
    scale = float(levels.abs().max()) / _INT8_MAX
    return scale, torch.round(levels / scale).to(torch.int8)


def table_constants(codec: TurboQuantCodec) -> tuple[int, int, int, int]:
    """The int8 levels as four int32 table words (byte ``b`` of word ``w``: level ``4 w + b``; 0-padded)."""
    _, levels = level_scale(codec)
    padded = torch.zeros(16, dtype=torch.int8)
    padded[: levels.numel()] = levels
    return tuple(int(word) for word in padded.view(torch.int32).tolist())


def lookup_asm(codec: TurboQuantCodec) -> str:
    """PTX of `level_words` for ``codec``: one 32-bit word of codes (``$`` last) -> ``8 / width``
    words of int8 levels (``$0`` ...), the table words as immediates (`triton_unpack.lookup_asm`)."""
    return triton_unpack.lookup_asm(table_constants(codec), check_layout(codec))


def query_order(dim: int, width: int) -> torch.Tensor:
    """int64 ``(dim,)``: the coordinate of each query byte, so that byte ``4 i + b`` of the query
    meets the level that the look-ups put in byte ``b`` of their ``i``-th result word."""
    if width == 4:
        return torch.arange(dim)
    return (torch.arange(dim // 16)[:, None] * 16 + torch.tensor(_ORDER_2BIT)).flatten()


class Int8Plan:
    """What the int8 form needs of a codec, made once: the code ``width``, the levels' scale and
    int8 values, the PTX look-up (``asm``, `lookup_asm`) and its ``tables`` (`table_constants`), and
    the constants of `quantize`, copied to each device once (so a CUDA graph can hold a search)."""

    def __init__(self, codec: TurboQuantCodec):
        self.width = check_layout(codec)
        self.dim = codec.layout.dim
        self.level_scale, self.levels = level_scale(codec)
        self.asm, self.tables = lookup_asm(codec), table_constants(codec)
        exact = codec.levels.to(torch.float64)
        self._host = (exact, self.levels.to(torch.float64) * self.level_scale, query_order(self.dim, self.width))
        self._devices: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._devices:
            self._devices[device] = tuple(t.to(device) for t in self._host)
        return self._devices[device]

    def quantize(self, rotated: torch.Tensor, z: float) -> Int8Queries:
        """Rotated float queries ``(m, D)`` -> `Int8Queries` (on their device; no synchronisation).

        A query of zeros has scale 0; a non-finite one gets non-finite ``terms`` (the caller
        checks). ValueError for another shape.
        """
        if rotated.ndim != 2 or rotated.shape[1] != self.dim:
            raise ValueError(f"rotated queries must be (m, {self.dim}), got {tuple(rotated.shape)}")
        rotated = rotated.to(torch.float32).contiguous()
        exact, rounded, order = self._on(rotated.device)
        amax = rotated.abs().amax(dim=1, keepdim=True)
        q_scale = amax / _INT8_MAX
        steps = torch.where(amax > 0, rotated / q_scale.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        q = torch.round(steps).clamp(-_INT8_MAX, _INT8_MAX)
        blocks = range(0, max(rotated.shape[0], 1), _MARGIN_BLOCK)  # one (empty) block for no queries
        part = [slice(s, s + _MARGIN_BLOCK) for s in blocks]
        margin = torch.cat([self._margins(rotated[at], q[at], q_scale[at], exact, rounded, z) for at in part])
        per_word = 8 // self.width  # query words per code word, stored apart so that each part loads as one vector
        words = q.to(torch.int8)[:, order].contiguous().view(torch.int32)
        words = words.view(-1, words.shape[1] // per_word, per_word).transpose(1, 2).reshape(words.shape)
        terms = torch.stack([(q_scale[:, 0].to(torch.float64) * self.level_scale).to(torch.float32), margin.to(torch.float32)], dim=1)
        return Int8Queries(words, terms, rotated)

    def _margins(
        self, rotated: torch.Tensor, q: torch.Tensor, q_scale: torch.Tensor, exact: torch.Tensor, rounded: torch.Tensor, z: float
    ) -> torch.Tensor:
        """float64 ``(b,)``: each query's error bound (module docstring), with slack for the
        kernel's float32 scoring and for the float32 rescoring (a sum of ``D`` products)."""
        q_scale = q_scale.to(torch.float64)
        err = rotated.to(torch.float64)[:, :, None] * exact - (q.to(torch.float64) * q_scale)[:, :, None] * rounded
        bound = err.abs().amax(dim=2).sum(dim=1)
        if z > 0:
            bound = torch.minimum(bound, z * err.square().mean(dim=2).sum(dim=1).sqrt())
        magnitude = (rotated.abs().to(torch.float64) * exact.abs().max()).sum(dim=1) + bound  # >= sum |q c| of any row
        return bound + (self.dim + _FLOAT_SLACK_OPS) * 2.0**-24 * magnitude + 1e-30


@triton.jit
def dp4a(a, b, c):
    """PTX ``dp4a.s32.s32`` on int32 tensors: ``c`` plus the products of the four signed bytes of ``a`` and of ``b``."""
    if PTX:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1)
    else:
        out = c
        for n in tl.static_range(4):
            out += ((a << (24 - 8 * n)) >> 24) * ((b << (24 - 8 * n)) >> 24)
        return out


@triton.jit
def level_words(words, ASM: tl.constexpr, TABLES: tl.constexpr, WIDTH: tl.constexpr):
    """int32 code words ``[R, W]`` -> ``8 / WIDTH`` int32 tensors ``[R, W]`` of four int8 levels each:
    byte ``i`` of part ``r`` is the level that meets byte ``4 r + i`` of the word's query words
    (`query_order`). Compiled: ``ASM`` (`lookup_asm`); in the interpreter the same steps, ``prmt``
    emulated, from ``TABLES`` (`table_constants`)."""
    if PTX:
        if WIDTH == 4:
            return tl.inline_asm_elementwise(ASM, "=r,=r,r", [words], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [words], dtype=(tl.int32,) * 4, is_pure=True, pack=1)
    else:
        return byte_lookup(words, TABLES, 0, WIDTH)


@triton.jit
def int8_dot(words, words_at, word_ok, q_ptr, ASM: tl.constexpr, TABLES: tl.constexpr, WIDTH: tl.constexpr, DIM: tl.constexpr):
    """Per row, ``sum L Q`` over its code ``words`` (int32 ``[R, W]``: word ``words_at`` ``[W]``
    of each row, ``word_ok`` ``[W]``) with the query words at ``q_ptr`` (``query_order``): int32 ``[R]``."""
    WORDS: tl.constexpr = DIM * WIDTH // 32  # code words per row; the query's part r at r * WORDS
    parts = level_words(words, ASM, TABLES, WIDTH)
    part = tl.zeros_like(words)
    for r in tl.static_range(8 // WIDTH):
        q = tl.load(q_ptr + r * WORDS + words_at, mask=word_ok, other=0)
        part = dp4a(parts[r], q[None, :] + tl.zeros_like(words), part)
    return tl.sum(part, axis=1)


@triton.jit
def int8_levels(words, ASM: tl.constexpr, TABLES: tl.constexpr, WIDTH: tl.constexpr):
    """int32 code words ``[R, W]`` -> ``8 / WIDTH`` int8 level tensors ``[R, 4 W]``: element ``4 w + i``
    of part ``r`` is byte ``i`` of part ``r`` of `level_words` of code word ``w``, the A operands
    of one ``tl.dot`` each."""
    R: tl.constexpr = words.shape[0]
    B: tl.constexpr = words.shape[1] * 4
    parts = level_words(words, ASM, TABLES, WIDTH)
    if WIDTH == 4:
        return _level_bytes(parts[0], R, B), _level_bytes(parts[1], R, B)
    else:
        return _level_bytes(parts[0], R, B), _level_bytes(parts[1], R, B), _level_bytes(parts[2], R, B), _level_bytes(parts[3], R, B)


@triton.jit
def _level_bytes(levels, R: tl.constexpr, B: tl.constexpr):
    """int32 ``[R, B / 4]`` words of four int8 levels -> int8 ``[R, B]``, byte ``i`` of word ``w`` at ``4 w + i``."""
    b0 = ((levels << 24) >> 24).to(tl.int8)
    b1 = ((levels << 16) >> 24).to(tl.int8)
    b2 = ((levels << 8) >> 24).to(tl.int8)
    b3 = (levels >> 24).to(tl.int8)
    return tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), (R, B))  # join stacks on a new last axis
