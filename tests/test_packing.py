import pytest
import torch

from tqindex.packing import BitLayout


@pytest.mark.parametrize("bits", range(0, 9))
@pytest.mark.parametrize("dim", [1, 7, 13, 64, 100])
def test_pack_unpack_round_trip_every_width_and_odd_dims(bits, dim):
    g = torch.Generator().manual_seed(bits * 1000 + dim)
    layout = BitLayout(dim, bits)
    indices = torch.randint(0, 2**bits, (9, dim), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = layout.pack(indices)
    assert packed.shape == (9, layout.code_bytes)
    assert layout.code_bytes == sum(-(-dim * w // 8) for w in ([8] if bits == 8 else [w for w in (4, 2, 1) if bits & w]))
    assert torch.equal(layout.unpack_indices(packed), indices)


@pytest.mark.parametrize("base_bits,extra", [(2, 5), (3, 17), (0, 9), (7, 1)])
def test_fractional_layout_round_trip(base_bits, extra):
    dim = 37
    layout = BitLayout(dim, base_bits, extra)
    g = torch.Generator().manual_seed(extra)
    indices = torch.randint(0, 2**base_bits, (6, dim), generator=g).to(torch.uint8)
    indices[:, :extra] = torch.randint(0, 2 ** (base_bits + 1), (6, extra), generator=g).to(torch.uint8)
    assert torch.equal(layout.unpack_indices(layout.pack(indices)), indices)
    assert layout.code_bytes * 8 < dim * (base_bits + 1) + 8 * len(layout.index_fields)


def test_signs_round_trip_and_sit_after_the_indices():
    layout = BitLayout(19, 3, signs=True)
    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 8, (5, 19), generator=g).to(torch.uint8)
    signs = torch.rand(5, 19, generator=g) > 0.5
    packed = layout.pack(indices, signs)
    assert torch.equal(layout.unpack_indices(packed), indices)
    assert torch.equal(layout.unpack_signs(packed), signs)
    assert layout.sign_field.offset == layout.code_bytes - 3


def test_documented_byte_layout_of_a_four_bit_row():
    # coordinate j of a 4-bit field lives in byte j // 2 at bit 4 * (j % 2)
    layout = BitLayout(4, 4)
    packed = layout.pack(torch.tensor([[1, 2, 3, 15]], dtype=torch.uint8))
    assert packed.tolist() == [[0x21, 0xF3]]


def test_three_bit_row_is_a_two_bit_field_then_a_one_bit_field():
    layout = BitLayout(4, 3)
    packed = layout.pack(torch.tensor([[0b101, 0b010, 0b111, 0b000]], dtype=torch.uint8))
    # low two bits: 01, 10, 11, 00 -> 0b00_11_10_01; high bit: 1, 0, 1, 0 -> 0b0101
    assert packed.tolist() == [[0b00111001, 0b0101]]


def test_bad_packed_shape_or_dtype_is_refused():
    layout = BitLayout(16, 2)
    with pytest.raises(ValueError, match="uint8"):
        layout.unpack_indices(torch.zeros(3, layout.code_bytes + 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        layout.unpack_indices(torch.zeros(3, layout.code_bytes, dtype=torch.int32))
    with pytest.raises(ValueError, match="signs"):
        layout.pack(torch.zeros(3, 16, dtype=torch.uint8), torch.zeros(3, 16, dtype=torch.bool))
