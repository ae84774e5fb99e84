"""Trellis codes (tqindex/trellis.py) and TurboQuantCodec(quantizer="trellis")."""

import numpy as np
import pytest
import torch

from tqindex.codec import CodecConfig, TurboQuantCodec
from tqindex.trellis import WINDOW_BITS, TrellisDecoder, trellis_table, visiting_order


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def brute_force_windows(codes: np.ndarray, bit_counts: np.ndarray, window_bits: int) -> np.ndarray:
    """Each coordinate's window from an explicit cyclic bit stream, built code by code in visiting order."""
    visit = visiting_order(bit_counts)
    windows = np.empty(codes.shape, np.int64)
    for r, row in enumerate(codes):
        stream, starts = [], {}
        for coord in visit:
            starts[coord] = len(stream)
            k = int(bit_counts[coord])
            stream += [(int(row[coord]) >> (k - 1 - i)) & 1 for i in range(k)]
        for coord, start in starts.items():
            value = 0
            for i in range(window_bits):
                value = (value << 1) | stream[(start + i) % len(stream)]
            windows[r, coord] = value
    return windows


@pytest.mark.parametrize("dim, base, extra", [(16, 3, 0), (24, 2, 5), (32, 3, 8), (12, 1, 12), (10, 4, 3)])
def test_windows_are_the_cyclic_bit_stream(dim, base, extra):
    counts = np.full(dim, base)
    counts[:extra] += 1
    rng = np.random.default_rng(dim)
    codes = (rng.integers(0, 256, (20, dim)) & ((1 << counts) - 1)).astype(np.uint8)
    decoder = TrellisDecoder(counts, trellis_table(dim, 0))
    expected = brute_force_windows(codes, counts, WINDOW_BITS)
    np.testing.assert_array_equal(decoder.windows(torch.from_numpy(codes)).numpy(), expected)
    np.testing.assert_array_equal(decoder.levels(torch.from_numpy(codes)).numpy(), decoder.table.numpy()[expected])


def test_visiting_order_spreads_the_extra_bits():
    counts = np.array([4] * 4 + [3] * 12)
    order = visiting_order(counts)
    assert sorted(order.tolist()) == list(range(16))
    assert np.flatnonzero(counts[order] == 4).tolist() == [0, 4, 8, 12]
    np.testing.assert_array_equal(visiting_order(np.full(8, 3)), np.arange(8))


def test_table_is_seeded_gaussian_quantiles():
    table = trellis_table(64, 3)
    assert table.shape == (1 << WINDOW_BITS,) and table.dtype == np.float32
    np.testing.assert_array_equal(table, trellis_table(64, 3))
    assert not np.array_equal(table, trellis_table(64, 4))
    np.testing.assert_allclose(np.sort(table), np.sort(trellis_table(64, 4)))
    assert abs(np.std(table) * 8 - 1) < 0.01  # N(0, 1/D) with D = 64


@pytest.mark.parametrize("dim, bits", [(32, 3.25), (64, 3.375), (64, 2)])
def test_trellis_codes_beat_searched_scalar_codes(dim, bits):
    x = torch.from_numpy(unit_rows(400, dim, seed=1)) * 3.0
    errors = {}
    for name, options in {"scalar": dict(search=True), "trellis": dict(quantizer="trellis")}.items():
        codec = TurboQuantCodec(dim, bits, seed=0, **options)
        decoded = codec.decode(codec.encode(x))
        errors[name] = ((decoded - x).pow(2).sum(1) / x.pow(2).sum(1)).mean().item()
        # the unbiased scale: each vector's estimate of its own squared norm is exact
        torch.testing.assert_close(codec.inner_products(x[:20], codec.encode(x[:20])).diagonal(), x[:20].pow(2).sum(1), rtol=1e-4, atol=1e-4)
    # measured 36-46% lower at these shapes (benchmarks/bench_trellis.py, docs/kv-cache.md)
    assert errors["trellis"] < 0.75 * errors["scalar"], errors


def test_trellis_codec_round_trips_its_config_and_state():
    codec = TurboQuantCodec(48, 3.5, quantizer="trellis", seed=5)
    assert codec.config.quantizer == "trellis" and codec.config.scale == "unbiased"
    x = np.random.default_rng(2).standard_normal((30, 48)).astype(np.float32)
    codes = codec.encode(x)
    again = TurboQuantCodec.from_config(CodecConfig.from_dict(codec.config.to_dict()), codec.state())
    np.testing.assert_array_equal(again.encode(x).packed, codes.packed)
    np.testing.assert_array_equal(again.decode(codes), codec.decode(codes))
    old = {k: v for k, v in TurboQuantCodec(48, 3).config.to_dict().items() if k != "quantizer"}
    assert CodecConfig.from_dict(old).quantizer == "scalar"  # configs saved before trellis codes


def test_zero_vector_and_encode_of_a_single_row():
    codec = TurboQuantCodec(32, 3, quantizer="trellis")
    x = np.zeros((2, 32), np.float32)
    x[1, 3] = 2.0
    decoded = codec.decode(codec.encode(x))
    np.testing.assert_array_equal(decoded[0], 0)
    assert np.argmax(np.abs(decoded[1])) == 3
    assert codec.encode(x[1]).packed.shape == (1, codec.code_bytes)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(quantizer="vq"), "quantizer must be one of"),
        (dict(quantizer="trellis", variant="prod"), "variant='mse'"),
        (dict(quantizer="trellis", scale="norm"), "scale='unbiased'"),
        (dict(quantizer="trellis", search=True), "search=True"),
    ],
)
def test_bad_trellis_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TurboQuantCodec(32, 3, **kwargs)


def test_too_few_bits_for_a_window_are_refused():
    with pytest.raises(ValueError, match=f"at least {WINDOW_BITS} bits"):
        TurboQuantCodec(8, 1, quantizer="trellis")
    TurboQuantCodec(12, 1, quantizer="trellis")  # exactly one window of bits


def test_index_refuses_a_store_of_trellis_codes(tmp_path):
    import json

    from tqindex import TurboQuantIndex
    from tqindex.errors import CorruptIndexError
    from tqindex.storage import _manifest_checksum

    path = tmp_path / "idx"
    index = TurboQuantIndex(16, bits=3, path=path)
    index.add(np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32))
    index.close()
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["meta"]["codec"].update(quantizer="trellis", scale="unbiased")
    manifest["checksum"] = _manifest_checksum(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptIndexError, match="trellis codes"):
        TurboQuantIndex.open(path)
