"""The shared Triton unpack helper against ``codec.dequantize`` and ``codec.signs``, for every layout.

Interpreter on CPU tensors (``TRITON_INTERPRET=1``, conftest), or a GPU when the environment sets
``TRITON_INTERPRET=0`` and CUDA is present. Tiny shapes: the interpreter is slow.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import triton
import triton.language as tl

from triton_device import DEVICE
from tqindex.codec import TurboQuantCodec
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

pytestmark = pytest.mark.triton


@triton.jit
def _unpack_kernel(
    packed_ptr, levels_ptr, out_levels_ptr, out_signs_ptr, n_rows, stride_p,
    FIELDS: tl.constexpr, LEVELS: tl.constexpr, N_LO: tl.constexpr, EXTRA: tl.constexpr, SIGN_OFFSET: tl.constexpr,
    DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, OUT_D: tl.constexpr, GATHER_ASM: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    row_mask = rows < n_rows
    row_ptrs = packed_ptr + rows * stride_p
    for d0 in range(0, OUT_D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)[None, :]
        levels = unpack_levels(row_ptrs, row_mask, d0, levels_ptr, FIELDS, LEVELS, N_LO, EXTRA, DIM, BLOCK_D, GATHER_ASM)
        tl.store(out_levels_ptr + rows * OUT_D + cols, levels, mask=row_mask)
        if SIGN_OFFSET >= 0:
            tl.store(out_signs_ptr + rows * OUT_D + cols, unpack_signs(row_ptrs, row_mask, d0, SIGN_OFFSET, DIM, BLOCK_D), mask=row_mask)


def unpacked(codec: TurboQuantCodec, packed: torch.Tensor, block_d: int, select: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The helper's level and sign tiles of every row, float32 ``(n, D)`` each (past D: must be 0)."""
    n, dim = packed.shape[0], codec.rotated_dim
    out_d = triton.cdiv(dim, block_d) * block_d
    levels = torch.full((n, out_d), float("nan"), device=DEVICE)  # poisoned: every entry must be written
    signs = torch.full((n, out_d), float("nan"), device=DEVICE)
    constants = unpack_constants(codec, select)
    _unpack_kernel[(triton.cdiv(n, 8),)](
        packed, levels_table(codec, DEVICE), levels, signs, n, packed.stride(0),
        **{name: constants[name] for name in ("FIELDS", "LEVELS", "N_LO", "EXTRA", "SIGN_OFFSET", "DIM", "GATHER_ASM")},
        BLOCK_R=8, BLOCK_D=block_d, OUT_D=out_d,
    )  # fmt: skip
    assert (levels[:, dim:] == 0).all()
    return levels[:, :dim], signs


# every field width (1, 2, 4, 8) alone and combined (3, 5, 6, 7), fractional (2.5, 3.5: the extra-bit
# field over a prefix, two codebooks), prod (signs; 0-bit indices at 1 bit); dims not multiples of the block
CASES = [
    (1, "mse", 48, 32),
    (2, "mse", 100, 32),
    (2.5, "mse", 64, 16),
    (3, "mse", 48, 32),
    (3.5, "mse", 100, 64),
    (4, "mse", 64, 32),
    (5, "mse", 48, 16),
    (6, "mse", 100, 32),
    (7, "mse", 64, 64),
    (8, "mse", 48, 32),
    (1.25, "mse", 48, 16),
    (1, "prod", 64, 32),
    (1.5, "prod", 48, 32),
    (3, "prod", 100, 64),
    (5.5, "prod", 64, 16),
]


@pytest.mark.parametrize("bits, variant, dim, block_d", CASES)
def test_unpack_equals_the_codec(bits, variant, dim, block_d):
    codec = TurboQuantCodec(dim, bits, variant=variant, seed=int(bits * 4) + dim)
    x = torch.from_numpy(np.random.default_rng(dim).standard_normal((19, dim)).astype(np.float32))
    packed = codec.encode(x).packed.to(DEVICE)
    levels, signs = unpacked(codec, packed, block_d)
    assert torch.equal(levels.cpu(), codec.dequantize(packed.cpu()))  # bit for bit: the same float32 table
    if variant == "prod":
        out_d = signs.shape[1]
        assert torch.equal(signs[:, :dim].cpu(), codec.signs(packed.cpu()))
        assert (signs[:, dim:out_d] == 0).all()


@pytest.mark.parametrize("select", [True, False])
def test_every_index_value_is_looked_up(select):
    """Rows holding each index value in turn: both lookups (select tree, gather) over every entry,
    both codebooks of a fractional layout."""
    for bits in (1.5, 2, 3.5):  # 2 levels: a select (unless select=False); 4, 8, 16: gather
        codec = TurboQuantCodec(32, bits)
        layout = codec.layout
        high = 1 << (layout.base_bits + 1)
        indices = (torch.arange(high)[:, None] + torch.arange(32)[None, :]) % high
        indices[:, layout.extra_coords :] %= 1 << layout.base_bits
        packed = layout.pack(indices.to(torch.uint8)).to(DEVICE)
        levels, _ = unpacked(codec, packed, 16, select)
        assert torch.equal(levels.cpu(), codec.dequantize(packed.cpu()))


@triton.jit
def _half_kernel(
    packed_ptr, out_ptr, n_rows, stride_p,
    TABLES: tl.constexpr, ASM: tl.constexpr, WIDTH: tl.constexpr, DIM: tl.constexpr, BLOCK_D: tl.constexpr, OUT_D: tl.constexpr,
    DTYPE: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * 8 + tl.arange(0, 8)[:, None]
    row_mask = rows < n_rows
    for d0 in range(0, OUT_D, BLOCK_D):
        levels = unpack_half_levels(packed_ptr + rows * stride_p, row_mask, d0, TABLES, ASM, WIDTH, DIM, BLOCK_D, DTYPE)
        tl.store(out_ptr + rows * OUT_D + d0 + tl.arange(0, BLOCK_D)[None, :], levels, mask=row_mask)


@pytest.mark.parametrize("bits, dim, block_d, dtype", [(4, 64, 32, torch.float16), (4, 40, 32, torch.bfloat16), (2, 80, 64, torch.float16), (2, 48, 16, torch.bfloat16)])
def test_register_lookups_give_the_levels_in_16_bits(bits, dim, block_d, dtype):
    """`unpack_half_levels` (byte permutes, no gather) equals the float32 levels rounded to float16 or
    bfloat16 for every index value at every position, blocks past the dim included (0 there)."""
    codec = TurboQuantCodec(dim, bits)
    width = register_width(codec)
    assert width == bits
    levels = 1 << bits
    indices = ((torch.arange(2 * levels)[:, None] * 7 + torch.arange(dim)[None, :] * 3) % levels).to(torch.uint8)
    packed = codec.layout.pack(indices).to(DEVICE)
    out_d = triton.cdiv(dim, block_d) * block_d
    out = torch.full((packed.shape[0], out_d), float("nan"), dtype=dtype, device=DEVICE)
    tables = half_tables(codec, dtype)
    _half_kernel[(triton.cdiv(packed.shape[0], 8),)](
        packed, out, packed.shape[0], packed.stride(0), TABLES=tables, ASM=half_asm(tables, width), WIDTH=width, DIM=dim,
        BLOCK_D=block_d, OUT_D=out_d, DTYPE=tl.float16 if dtype == torch.float16 else tl.bfloat16,
    )  # fmt: skip
    assert torch.equal(out[:, :dim].cpu(), codec.levels.to(dtype)[indices.long()])
    assert (out[:, dim:] == 0).all()


def test_register_lookups_take_whole_words_of_one_field_only():
    """2 and 4 bits over every coordinate on 32-bit words; not 3 bits (two fields), fractional
    budgets (two codebooks), prod (a sign field after the indices is fine: it starts on a word), rows
    of a partial word, or 1 and 8 bits."""
    assert [register_width(TurboQuantCodec(64, bits)) for bits in (1, 2, 3, 4, 8, 2.5)] == [0, 2, 0, 4, 0, 0]
    assert register_width(TurboQuantCodec(64, 3, variant="prod")) == 2
    assert register_width(TurboQuantCodec(44, 4)) == 0  # 22 bytes a row
    assert half_tables(TurboQuantCodec(64, 4), torch.float32) == ()


def test_host_grid_helpers_equal_triton_s():
    """`kernels.grid` replaces ``triton.cdiv`` / ``triton.next_power_of_2`` on the host (their
    constexpr_function wrapper costs ~1.6 us a call): the same values."""
    from tqindex.kernels.grid import cdiv, next_power_of_2

    for n in range(0, 2100):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        for d in (1, 3, 16, 64, 1000):
            assert cdiv(n, d) == triton.cdiv(n, d)
