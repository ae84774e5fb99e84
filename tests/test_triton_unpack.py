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
from tqindex.kernels.triton_unpack import levels_table, unpack_constants, unpack_levels, unpack_signs

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
