"""Attention over codes equals dense attention over the decoded cache (torch path and Triton kernel)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (transformers does)

from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tqindex.kv import CompressedKV, TurboQuantCache, codes_attention, turboquant_attention

SCALE = 0.125


def compressed_kv(
    batch=2, heads=2, tokens=30, dim=32, bits=(3, 3), variants=("mse", "mse"), window=5, chunk=4, key_mean=0.0, **options
) -> tuple[CompressedKV, CompressedKV]:
    """Keys (plus ``key_mean``) and values of ``tokens`` random vectors as a TurboQuantCache layer holds them."""
    cache = TurboQuantCache(*bits, key_variant=variants[0], value_variant=variants[1], window=window, chunk=chunk, **options)
    g = torch.Generator().manual_seed(tokens)
    keys, values = (torch.randn(batch, heads, tokens, dim, generator=g) for _ in range(2))
    cache.update(keys + key_mean, values, 0)
    return cache.layers[0].states()


def reference(query, keys: CompressedKV, values: CompressedKV, mask=None, causal=False) -> torch.Tensor:
    """sdpa on the decoded cache, ``(B, Hq, L, d)``."""
    if causal:
        length, total = query.shape[2], keys.shape[2]
        mask = torch.ones(length, total, dtype=torch.bool).tril(total - length)
    return torch.nn.functional.scaled_dot_product_attention(
        query, keys.dense(), values.dense(), attn_mask=mask, scale=SCALE, enable_gqa=True
    )


def padding_mask(batch: int, q_len: int, tokens: int) -> torch.Tensor:
    mask = torch.ones(batch, 1, q_len, tokens, dtype=torch.bool)
    mask[0, :, :, :3] = False  # left padding in the codes
    mask[-1, :, :, -2:] = False  # and some window tokens
    return mask


@pytest.mark.parametrize("variants", [("mse", "mse"), ("prod", "prod"), ("mse", "prod")])
@pytest.mark.parametrize("heads, groups", [(2, 1), (2, 3), (1, 4)])  # MHA, GQA, MQA
def test_codes_attention_equals_attention_on_decoded_cache(variants, heads, groups):
    keys, values = compressed_kv(heads=heads, variants=variants, bits=(3, 2.5))
    assert keys.encoded_len == 24 and keys.window.shape[2] == 6
    query = torch.randn(2, heads * groups, 3, 32)
    for mask in (None, padding_mask(2, 3, 30)):
        torch.testing.assert_close(
            codes_attention(query, keys, values, mask, scaling=SCALE), reference(query, keys, values, mask), atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(
        codes_attention(query, keys, values, scaling=SCALE, causal=True),
        reference(query, keys, values, causal=True),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "options",
    [
        dict(center_keys=True, factor_dtype=torch.float16),
        dict(center_keys=False, factor_dtype="log8"),
        dict(center_keys=True, factor_dtype="log8"),
    ],
)
@pytest.mark.parametrize("variants", [("mse", "mse"), ("prod", "prod")])
def test_codes_attention_with_centred_keys_and_log_factors_equals_decoded_attention(options, variants):
    keys, values = compressed_kv(heads=2, variants=variants, key_mean=torch.linspace(-3, 3, 32), **options)
    assert (keys.offset is not None) == options["center_keys"]
    query = torch.randn(2, 6, 3, 32)
    for mask in (None, padding_mask(2, 3, 30)):
        torch.testing.assert_close(
            codes_attention(query, keys, values, mask, scaling=SCALE), reference(query, keys, values, mask), atol=1e-5, rtol=1e-5
        )


def test_codes_attention_without_window_with_float_mask_and_half_precision():
    keys, values = compressed_kv(window=0, chunk=1, bits=(4, 4))
    assert keys.window.shape[2] == 0
    query = torch.randn(2, 4, 2, 32)
    additive = torch.randn(2, 1, 2, 30)
    torch.testing.assert_close(
        codes_attention(query, keys, values, additive, scaling=SCALE), reference(query, keys, values, additive), atol=1e-5, rtol=1e-5
    )
    half = codes_attention(query.half(), keys, values, scaling=SCALE)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), reference(query, keys, values), atol=2e-3, rtol=2e-3)


def test_interface_function_returns_transformers_layout_and_falls_back_to_sdpa():
    keys, values = compressed_kv(heads=2)
    module = SimpleNamespace(is_causal=False, num_key_value_groups=2, training=False)
    query = torch.randn(2, 4, 3, 32)
    out, weights = turboquant_attention(module, query, keys, values, None, scaling=SCALE)
    assert weights is None and out.shape == (2, 3, 4, 32)
    torch.testing.assert_close(out, reference(query, keys, values).transpose(1, 2), atol=1e-5, rtol=1e-5)
    # plain tensors and unsupported options run sdpa on dense tensors
    dense_k, dense_v = keys.dense(), values.dense()
    expected, _ = sdpa_attention_forward(module, query, dense_k, dense_v, None, scaling=SCALE)
    for k, v, kwargs in ((dense_k, dense_v, {}), (keys, values, {"softcap": None, "s_aux": torch.zeros(4)})):
        out, _ = turboquant_attention(module, query, k, v, None, scaling=SCALE, **kwargs)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_unknown_backend_is_refused():
    keys, values = compressed_kv()
    with pytest.raises(ValueError, match="backend"):
        codes_attention(torch.randn(2, 2, 1, 32), keys, values, scaling=SCALE, backend="cuda")


def test_codes_attention_never_decodes_the_cache(monkeypatch):
    keys, values = compressed_kv()

    def refuse(*args, **kwargs):
        raise AssertionError("the codes path decoded a token")

    for codec in (keys.codec, values.codec):
        monkeypatch.setattr(codec, "decode", refuse)
    out = codes_attention(torch.randn(2, 2, 1, 32), keys, values, scaling=SCALE)
    assert torch.isfinite(out).all()
