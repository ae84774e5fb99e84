"""One-byte logarithmic factors and key centring in the KV cache: accuracy, memory, exactness."""

import math

import pytest
import torch

from tqindex.kv import TurboQuantCache
from tqindex.kv.factors import STEPS_PER_OCTAVE, LogByteFactors

HALF_STEP = 2 ** (0.5 / STEPS_PER_OCTAVE) - 1  # the largest relative error inside the range


def test_log_bytes_hold_factors_within_half_a_step_over_sixteen_octaves():
    factors = torch.exp2(torch.linspace(-6, 9.8, 5000)) * 3.7
    codec = LogByteFactors.fit(factors)
    codes = codec.encode(factors)
    assert codes.dtype == torch.uint8 and int(codes.min()) >= 1
    relative = (codec.decode(codes) / factors - 1).abs()
    assert float(relative.max()) <= HALF_STEP + 1e-6
    assert float(relative.max()) > 0.5 * HALF_STEP  # a real rounding, not a lossless copy
    assert codec.decode(codec.encode(torch.zeros(3))).eq(0).all()


def test_log_bytes_clamp_factors_beyond_the_range_to_its_ends():
    codec = LogByteFactors.fit(torch.ones(10))  # centred on 2 ** 0
    far = torch.tensor([2.0**-30, 2.0**30])
    assert codec.encode(far).tolist() == [1, 255]
    assert codec.decode(torch.tensor([1, 255], dtype=torch.uint8)).log2().tolist() == pytest.approx([codec.low, codec.low + 254 / 16])
    assert codec.low == pytest.approx(-254 / 32)


def keys_with_a_large_mean(tokens=400, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = 4 * torch.randn(dim, generator=g)
    return mean + torch.randn(1, 2, tokens, dim, generator=g), torch.randn(1, 2, tokens, dim, generator=g)


def test_centred_keys_decode_closer_and_logits_shift_by_a_constant_per_query():
    keys, values = keys_with_a_large_mean()
    plain, _ = TurboQuantCache(3, 3, window=0, chunk=1, center_keys=False, dense_prefill=False).update(keys, values, 0)
    centred, _ = TurboQuantCache(3, 3, window=0, chunk=1, center_keys=True, dense_prefill=False).update(keys, values, 0)
    assert centred.offset.shape == (1, 2, 1, 32) and centred.offset.dtype == torch.bfloat16
    error = {name: float((k.dense() - keys).norm() / keys.norm()) for name, k in (("plain", plain), ("centred", centred))}
    assert error["centred"] < 0.5 * error["plain"]  # the mean no longer spends the code bits
    query = torch.randn(1, 2, 5, 32)
    logits = query @ centred.dense().transpose(-1, -2)
    residual_logits = query @ (centred.dense() - centred.offset.float()).transpose(-1, -2)
    shift = logits - residual_logits
    torch.testing.assert_close(shift, shift[..., :1].expand_as(shift), atol=1e-4, rtol=1e-5)


def test_centring_uses_the_keys_present_at_the_first_flush_and_keeps_it():
    keys, values = keys_with_a_large_mean(tokens=64)
    cache = TurboQuantCache(4, 4, window=8, chunk=8, center_keys=True)
    cache.update(keys[:, :, :40], values[:, :, :40], 0)
    layer = cache.layers[0]
    torch.testing.assert_close(layer.key_offset.float(), keys[:, :, :40].mean(dim=2, keepdim=True), atol=0.05, rtol=0.01)
    first = layer.key_offset.clone()
    cache.update(keys[:, :, 40:], values[:, :, 40:], 0)
    assert layer.encoded_len == 56 and torch.equal(layer.key_offset, first)  # never refitted
    cache.reorder_cache(torch.tensor([0, 0]))
    assert layer.key_offset.shape[0] == 2


def test_log8_factors_store_one_byte_per_vector_and_stay_close_to_float16():
    keys, values = keys_with_a_large_mean(tokens=256)
    caches = {dtype: TurboQuantCache(3, 3, window=0, chunk=1, factor_dtype=dtype, dense_prefill=False) for dtype in ("log8", torch.float16)}
    outs = {dtype: cache.update(keys, values, 0) for dtype, cache in caches.items()}
    layer = caches["log8"].layers[0]
    assert layer.key_codes.factors.dtype == torch.uint8
    report = {dtype: cache.memory_report() for dtype, cache in caches.items()}
    offsets = 2 * 32 * 2  # bfloat16 key mean per head
    assert (report["log8"].factor_bytes - offsets) * 2 == report[torch.float16].factor_bytes - offsets == 2 * 2 * 256 * 2
    for a, b in zip(outs["log8"], outs[torch.float16]):
        relative = (a.dense() - b.dense()).norm(dim=-1) / b.dense().norm(dim=-1)
        assert float(relative.max()) <= HALF_STEP + 1e-3


def test_bad_factor_and_centring_options_are_refused():
    with pytest.raises(TypeError, match="log8"):
        TurboQuantCache(4, 4, factor_dtype="log4")
    with pytest.raises(TypeError, match="center_keys"):
        TurboQuantCache(4, 4, center_keys="yes")
    assert math.isfinite(HALF_STEP)


def test_fit_takes_in_the_smallest_and_largest_factors_where_the_range_allows():
    factors = torch.cat([torch.ones(100), torch.tensor([2.0**12])])  # 12 octaves above the median
    codec = LogByteFactors.fit(factors)
    assert codec.fits(factors)
    assert not LogByteFactors(-254 / 32).fits(factors)  # the range centred on the median alone clamps it
    assert not codec.fits(torch.tensor([2.0**-6]))  # 16.6 octaves below the largest: out of reach


@pytest.mark.parametrize("scale", [1000.0, 1e-3], ids=["large", "small"])
def test_log8_factors_that_would_saturate_fall_back_to_float32(scale):
    """Tokens whose norm is ~2^10 times the first flush's median (above or below) keep the float32
    path's error instead of being clamped to the range's end (which decoded them ~75% off)."""
    g = torch.Generator().manual_seed(3)
    first = [torch.randn(1, 2, 64, 32, generator=g) for _ in range(2)]
    later = [scale * torch.randn(1, 2, 16, 32, generator=g) for _ in range(2)]
    caches = {  # dense_prefill=False: update returns what the codes decode to, this call's tokens included
        dtype: TurboQuantCache(3, 3, window=0, chunk=16, factor_dtype=dtype, center_keys=False, dense_prefill=False) for dtype in ("log8", torch.float32)
    }
    error = {}
    for dtype, cache in caches.items():
        keys, values = cache.update(*first, 0)
        before = [keys.dense().clone(), values.dense().clone()]
        if dtype == "log8":
            with pytest.warns(RuntimeWarning, match="outside the one-byte range .* float32 from now on"):
                keys, values = cache.update(*later, 0)
            assert cache.layers[0].key_codes.factors.dtype == torch.float32
            for old, new in zip(before, (keys.dense(), values.dense())):
                assert torch.equal(new[:, :, :64], old)  # the stored tokens decode exactly as before
        else:
            keys, values = cache.update(*later, 0)
        new = [keys.dense()[:, :, 64:], values.dense()[:, :, 64:]]
        error[dtype] = max(float(((n - x).norm(dim=-1) / x.norm(dim=-1)).mean()) for n, x in zip(new, later))
    assert error["log8"] == pytest.approx(error[torch.float32], rel=1e-5)
    assert error["log8"] < 0.25  # clamped one-byte factors gave ~0.75
    report = caches["log8"].memory_report()
    assert report.factor_bytes == 2 * 2 * 80 * 4  # keys and values, 2 heads, 80 tokens, float32


def test_a_cache_reset_after_a_fallback_stores_log8_again():
    cache = TurboQuantCache(3, 3, window=0, chunk=16, factor_dtype="log8", center_keys=False)
    cache.update(torch.randn(1, 1, 16, 32), torch.randn(1, 1, 16, 32), 0)
    with pytest.warns(RuntimeWarning):
        cache.update(1e4 * torch.randn(1, 1, 16, 32), torch.randn(1, 1, 16, 32), 0)
    cache.reset()
    cache.update(torch.randn(1, 1, 16, 32), torch.randn(1, 1, 16, 32), 0)
    assert cache.layers[0].key_codes.factors.dtype == torch.uint8
