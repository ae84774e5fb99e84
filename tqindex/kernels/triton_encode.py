"""Fused GPU encode: the rotation as one GEMM, then nearest levels, alignment and packing in one Triton kernel.

``codec.encode`` on a GPU runs a bucketize, a gather, reductions and the bit packing as separate
torch passes over ``(n, D)`` temporaries. Here one kernel reads each rotated row once and writes
its packed index bytes, ``<u, c[idx]>`` and, for ``prod``, the residual. The QJL signs of ``prod``
are one more GEMM on the residual; the factors come from ``TurboQuantCodec.factors``.

Code search (``search=True``) keeps, of the codes ``nearest(t u)`` for the scalings ``t`` of the grid
(``quantize.search_grid``: 91 points), the codes whose levels have the largest cosine with ``u``.
The kernel does what the CPU's ``quantize.quantize_rows_search`` does, not 91 quantizations: per
coordinate, the grid points where its level moves (one boundary a round, about two per coordinate
at 4 bits), with the change of ``<u, c>`` and ``|c|^2`` added there (`_add_crossings`); then per
row, one thread each, a sweep over the points for the best (`_best_scaling`). The changes are int64
fixed point (`_fixed_point_scales`), added by atomics to a scratch of ``2 x rows x 91``: exact, so
the sums do not depend on the order of the atomics. ``benchmarks/encode_kernel_sass.py`` counts
what each form costs per coordinate (sm_90: ~770 instructions per coordinate at d = 128 and 4 bits,
where 91 quantizations took ~5,400).

The codes are bit-identical to ``codec.encode``: ``u = y * (1 / |x|)`` is the same float32
product, the nearest level is the same count of midpoints below ``u`` (``torch.bucketize``), and
a level moves where the same float32 products ``t u`` cross a midpoint. The float32 sums
(alignment, energy) are taken in another order, so the factors agree to float32 rounding. Code
search's keys (cosines) agree to float64 rounding (its fixed-point changes are truncated, at most
one unit, ``2^-58`` at d = 128 and 4 bits, per level move, and compared as cross products); every
encoder treats keys within ``quantize.SEARCH_TIE`` (1e-12) of the best as tied, so exact ties of
proportional codes (common at d <= 4) are resolved alike, and only a key that falls within float64
rounding of that tie margin could be taken differently.

API for callers (the index, the KV cache): ``encode(codec, x) -> Codes`` and, one level down,
``quantize(codec, rotated, norms, keep_residual) -> Quantized`` with the pieces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tqindex._arrays import as_float_rows, power_of_two_scaled, times_power_of_two
from tqindex.codec import Codes, TurboQuantCodec
from tqindex.kernels.grid import cdiv, on_device
from tqindex.quantize import SEARCH_TIE

#: (rows per program, coordinates per step): nearest levels; code search, whose sweep over the grid
#: runs per row, one row a thread (a [16] vector over 128 threads repeats each row's work 8 times)
TILES = {False: (16, 64), True: (128, 8)}
_SEARCH_ROWS = 1 << 16  # code search: rows a launch; its crossings scratch is 2 x rows x T int64 (95 MB at T = 91)


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
def _crossing(bound, unit, active, grid_ptr, grid0, inv_step, LAST: tl.constexpr):
    """First grid index ``g >= 1`` where ``grid[g] * unit > bound`` turns true (``unit > 0``) or false
    (``unit < 0``), as ``quantize._crossing``: a division estimates ``g``, the float32 comparisons
    that ``_nearest`` makes settle it. Inactive elements get 1 (they are not added).

    The predicate is monotone in ``g``, so an estimate is too high or too low, never both: one loop
    moves each element its own way (the numba code's two loops in turn)."""
    rising = unit > 0
    estimate = (tl.fdiv(bound, tl.where(active, unit, 1.0)) - grid0) * inv_step  # approximate: the loop settles it
    g = tl.minimum(tl.maximum(tl.minimum(tl.maximum(estimate, 0.0), LAST).to(tl.int32) + 1, 1), LAST)
    g = tl.where(active, g, 1)
    high = active & (g > 1) & ((tl.load(grid_ptr + g - 1, mask=active & (g > 1), other=0.0) * unit > bound) == rising)
    low = active & (g < LAST) & ((tl.load(grid_ptr + g, mask=active & (g < LAST), other=0.0) * unit > bound) != rising)
    while tl.max((high | low).to(tl.int32)) > 0:
        g = tl.where(high, g - 1, tl.where(low, g + 1, g))
        high = high & (g > 1) & ((tl.load(grid_ptr + g - 1, mask=high & (g > 1), other=0.0) * unit > bound) == rising)
        low = low & (g < LAST) & ((tl.load(grid_ptr + g, mask=low & (g < LAST), other=0.0) * unit > bound) != rising)
    return g


@triton.jit
def _add_crossings(
    rotated_ptr, inverse, rows, row_ok, dot_steps_ptr, energy_steps_ptr, step_rows, bounds_ptr, levels_ptr, grid_ptr, grid0, grid_last, inv_step,
    D: tl.constexpr, BASE_BITS: tl.constexpr, EXTRA: tl.constexpr, GRID: tl.constexpr, DOT_SCALE: tl.constexpr,
    ENERGY_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Code search's first pass (``quantize.quantize_rows_search``) for rows ``(BLOCK_R,)``: ``<u, c>`` and
    ``|c|^2`` of the codes ``nearest(grid[0] u)`` in float64, returned; and, at each grid point where a
    coordinate's level moves, the change of both added to the row's ``steps`` (int64 fixed point,
    ``DOT_SCALE`` / ``ENERGY_SCALE`` units: exact sums, so the result does not depend on the order)."""
    N_LO: tl.constexpr = 1 << BASE_BITS
    dot = tl.zeros((BLOCK_R,), dtype=tl.float64)
    energy = tl.zeros((BLOCK_R,), dtype=tl.float64)
    step_dot = dot_steps_ptr + step_rows[:, None] * GRID
    step_energy = energy_steps_ptr + step_rows[:, None] * GRID
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)[None, :]
        mask = row_ok[:, None] & (cols < D)
        unit = tl.load(rotated_ptr + rows[:, None] * D + cols, mask=mask, other=0.0) * inverse[:, None]
        first, level = _levels_and_index(grid0 * unit, cols, bounds_ptr, levels_ptr, BASE_BITS, EXTRA)
        final, _ = _levels_and_index(grid_last * unit, cols, bounds_ptr, levels_ptr, BASE_BITS, EXTRA)
        level = tl.where(mask, level, 0.0).to(tl.float64)
        unit64 = unit.to(tl.float64)
        dot += tl.sum(unit64 * level, axis=1)
        energy += tl.sum(level * level, axis=1)
        count = tl.where(mask, tl.abs(final - first), 0)
        rising = final > first
        bound_at = tl.where(cols < EXTRA, N_LO - 1, 0)
        level_at = tl.where(cols < EXTRA, N_LO, 0)
        old = level
        m = 0
        rounds = tl.max(count)
        while m < rounds:  # one boundary of each coordinate a round: up from first (unit > 0) or down
            active = m < count
            k = tl.where(rising, first + m, first - 1 - m)
            bound = tl.load(bounds_ptr + bound_at + k, mask=active, other=0.0)
            new = tl.load(levels_ptr + level_at + tl.where(rising, k + 1, k), mask=active, other=0.0).to(tl.float64)
            g = _crossing(bound, unit, active, grid_ptr, grid0, inv_step, GRID - 1)
            tl.atomic_add(step_dot + g, (unit64 * (new - old) * DOT_SCALE).to(tl.int64), mask=active, sem="relaxed")
            tl.atomic_add(step_energy + g, ((new * new - old * old) * ENERGY_SCALE).to(tl.int64), mask=active, sem="relaxed")
            old = new
            m += 1
    return dot, energy


@triton.jit
def _key_parts(dot, energy, moved_dot, moved_energy, DOT_SCALE: tl.constexpr, ENERGY_SCALE: tl.constexpr):
    """A grid point's key ``<u, c> |<u, c>| / |c|^2`` as (numerator, denominator > 0), float64."""
    d = dot + moved_dot.to(tl.float64) * (1.0 / DOT_SCALE)
    return d * tl.abs(d), tl.maximum(energy + moved_energy.to(tl.float64) * (1.0 / ENERGY_SCALE), 1e-300)


@triton.jit
def _best_scaling(
    dot, energy, dot_steps_ptr, energy_steps_ptr, step_rows, row_ok, grid_ptr,
    GRID: tl.constexpr, START: tl.constexpr, DOT_SCALE: tl.constexpr, ENERGY_SCALE: tl.constexpr, TIE: tl.constexpr,
):  # fmt: skip
    """Code search's sweep over the grid, in order, twice: the largest key, then the scaling ``t``
    chosen as ``quantize._tied_best`` does (``grid[START] = 1`` if its key is within ``TIE`` of the
    largest, else the first point that is), float32 ``(rows,)``.

    The changes are summed in int64, exactly. Keys are compared as cross products of their
    numerators and denominators (no float64 division)."""
    step_dot = dot_steps_ptr + step_rows * GRID
    step_energy = energy_steps_ptr + step_rows * GRID
    moved_dot = tl.zeros(dot.shape, dtype=tl.int64)
    moved_energy = tl.zeros(dot.shape, dtype=tl.int64)
    best_num = tl.full(dot.shape, -1.0, dtype=tl.float64)  # below every key: keys are d |d| / e >= -1
    best_den = tl.full(dot.shape, 1.0, dtype=tl.float64)
    for g in range(GRID):
        moved_dot += tl.load(step_dot + g, mask=row_ok, other=0, cache_modifier=".cg")  # past L1: the atomics went to L2
        moved_energy += tl.load(step_energy + g, mask=row_ok, other=0, cache_modifier=".cg")
        num, den = _key_parts(dot, energy, moved_dot, moved_energy, DOT_SCALE, ENERGY_SCALE)
        better = num * best_den > best_num * den
        best_num = tl.where(better, num, best_num)
        best_den = tl.where(better, den, best_den)
    floor = best_num - TIE * tl.abs(best_num)  # key >= floor / best_den: tied with the best
    moved_dot = tl.zeros(dot.shape, dtype=tl.int64)
    moved_energy = tl.zeros(dot.shape, dtype=tl.int64)
    first = tl.full(dot.shape, -1, dtype=tl.int32)
    start_tied = row_ok & False
    for g in range(GRID):
        moved_dot += tl.load(step_dot + g, mask=row_ok, other=0, cache_modifier=".cg")
        moved_energy += tl.load(step_energy + g, mask=row_ok, other=0, cache_modifier=".cg")
        num, den = _key_parts(dot, energy, moved_dot, moved_energy, DOT_SCALE, ENERGY_SCALE)
        tied = num * best_den >= floor * den
        first = tl.where((first < 0) & tied, g, first)
        if g == START:
            start_tied = tied
    return tl.load(grid_ptr + tl.where(start_tied | (first < 0), START, first))


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
    dot_steps_ptr, energy_steps_ptr, row_start, n_rows, grid0, grid_last, inv_step,
    D: tl.constexpr, CODE_BYTES: tl.constexpr, FIELDS: tl.constexpr, BASE_BITS: tl.constexpr, EXTRA: tl.constexpr,
    SEARCH: tl.constexpr, RESIDUAL: tl.constexpr, GRID: tl.constexpr, START: tl.constexpr, DOT_SCALE: tl.constexpr,
    ENERGY_SCALE: tl.constexpr, TIE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Rows ``row_start + [pid * BLOCK_R, ...)``: packed index bytes, alignment, energy (SEARCH), residual (RESIDUAL).

    With SEARCH, ``dot_steps`` / ``energy_steps`` are zeroed int64 ``(rows of this launch, GRID)``
    scratch for the crossings of `_add_crossings`, read back by `_best_scaling` after a barrier."""
    step_rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = row_start + step_rows
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)
    step_rows = step_rows.to(tl.int64)
    inverse = tl.load(inverse_ptr + rows, mask=row_ok, other=0.0)
    t = tl.full((BLOCK_R,), 1.0, dtype=tl.float32)
    if SEARCH:
        dot, energy = _add_crossings(
            rotated_ptr, inverse, rows, row_ok, dot_steps_ptr, energy_steps_ptr, step_rows, bounds_ptr, levels_ptr, grid_ptr,
            grid0, grid_last, inv_step, D, BASE_BITS, EXTRA, GRID, DOT_SCALE, ENERGY_SCALE, BLOCK_R, BLOCK_D,
        )  # fmt: skip
        tl.debug_barrier()  # every crossing of these rows was added by this program's threads
        t = _best_scaling(dot, energy, dot_steps_ptr, energy_steps_ptr, step_rows, row_ok, grid_ptr, GRID, START, DOT_SCALE, ENERGY_SCALE, TIE)
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


def _fixed_point_scales(codec: TurboQuantCodec) -> tuple[float, float]:
    """Units ``2^k`` of code search's crossing sums of ``<u, c>`` and ``|c|^2``, each the largest that
    keeps them below ``2^62`` in int64. Per grid point, and over all of them, a coordinate's level
    moves one way, so a row's sums are at most ``2 max|c| sum|u_j| <= 2 max|c| sqrt(D) |u|``
    (``|u| <= 2`` allowing for float32) and ``2 max|c|^2 D``."""
    top = float(abs(codec._levels_np).max())  # numpy: no device read
    dim = codec.layout.dim
    bounds = (4 * top * math.sqrt(dim), 2 * top * top * dim)
    return tuple(2.0 ** (62 - math.ceil(math.log2(max(bound, 2.0**-60)))) for bound in bounds)


def _bounds(codec: TurboQuantCodec) -> torch.Tensor:
    """The codec's midpoints, base levels' then extra levels', as one CPU tensor kept on the codec
    (so `TurboQuantCodec._on` copies it to a device once)."""
    if "_encode_bounds" not in codec.__dict__:
        codec.__dict__["_encode_bounds"] = torch.cat([codec._bounds_lo, codec._bounds_hi])
    return codec.__dict__["_encode_bounds"]


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
    bounds = codec._on(_bounds(codec), device)
    grid = codec._search_grid  # numpy: its floats are read without a device transfer
    block_r, block_d = TILES[search]
    chunk = block_r * cdiv(min(n, _SEARCH_ROWS) if search else n, block_r)
    steps = torch.zeros((2, chunk, grid.shape[0]), dtype=torch.int64, device=device) if search else None
    dot_scale, energy_scale = _fixed_point_scales(codec)
    with on_device(device):
        for row_start in range(0, n, max(chunk, 1)):
            if steps is not None and row_start:
                steps.zero_()
            _quantize_kernel[(cdiv(min(chunk, n - row_start), block_r),)](
                rotated, inverse, bounds, codec._on(codec.levels, device), codec._on(codec._search_grid_t, device),
                packed, alignment, energy if search else alignment, residual if keep_residual else rotated,
                steps[0] if search else packed, steps[1] if search else packed, row_start, n,
                float(grid[0]), float(grid[-1]), (grid.shape[0] - 1) / float(grid[-1] - grid[0]),
                D=layout.dim, CODE_BYTES=layout.code_bytes, FIELDS=tuple((f.stop, f.width, f.shift, f.offset) for f in layout.index_fields),
                BASE_BITS=layout.base_bits, EXTRA=layout.extra_coords, SEARCH=search, RESIDUAL=keep_residual,
                GRID=grid.shape[0], START=codec._search_start, DOT_SCALE=dot_scale, ENERGY_SCALE=energy_scale, TIE=SEARCH_TIE,
                BLOCK_R=block_r, BLOCK_D=block_d,
            )  # fmt: skip
    return Quantized(packed, alignment, energy, residual)


def _pack_signs(codec: TurboQuantCodec, packed: torch.Tensor, signs: torch.Tensor) -> None:
    """Write QJL signs bool ``(n, D)`` into the sign field of ``packed`` (in place)."""
    field = codec.layout.sign_field
    padded = torch.zeros((signs.shape[0], field.nbytes * 8), dtype=torch.uint8, device=signs.device)
    padded[:, : field.stop] = signs
    weights = 2 ** torch.arange(8, dtype=torch.uint8, device=signs.device)  # made there: no copy from the host
    packed[:, field.offset : field.offset + field.nbytes] = (padded.view(-1, field.nbytes, 8) * weights).sum(dim=2, dtype=torch.uint8)


def encode(codec: TurboQuantCodec, x: torch.Tensor, *, check: bool = True) -> Codes:
    """``codec.encode`` for a tensor on the GPU (or CPU under the interpreter): rotation GEMM + fused kernel.

    ``x`` float ``(n, d)`` or ``(d,)``; returns ``Codes`` of torch tensors on ``x``'s device, packed
    bytes identical to ``codec.encode(x)``. Raises ValueError for non-finite input or norms that
    overflow float32, as ``codec.encode`` does. ``check=False``: no host synchronisation at all
    (the checks wait for the GPU); a row with a non-finite value then gets NaN factors, and the
    caller checks the factors (the KV cache: once a flush, for keys and values together).
    """
    rows = as_float_rows(x, codec.dim, "x", finite=check)
    rows, exponents = power_of_two_scaled(rows, synchronize=check)  # as codec.encode: exact, keeps norms finite and nonzero near the ends of float32
    norms = torch.linalg.vector_norm(rows, dim=1)
    prod = codec.config.variant == "prod"
    parts = quantize(codec, codec.rotation.forward(rows), norms, keep_residual=prod)
    if prod:
        _pack_signs(codec, parts.packed, codec.qjl_signs(parts.residual))
    factors = codec.factors(times_power_of_two(norms, exponents), parts.alignment, parts.residual, parts.energy)
    if not check:  # a NaN row has a NaN norm, but factor 0 (codec.factors maps norms that are not > 0 to 0)
        return Codes(parts.packed, torch.where(torch.isfinite(norms)[:, None], factors, math.nan))
    if not bool(torch.isfinite(factors).all()):
        raise ValueError("x has a vector whose norm overflows float32: scale the vectors down")
    return Codes(parts.packed, factors)
