"""TurboQuantCache inside a tiny random-weight Llama with GQA (4 query heads, 2 KV heads, head_dim 64)."""

import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (transformers does)

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from tqindex.codec import TurboQuantCodec
from tqindex.kv import CompressedKV, TurboQuantCache, TurboQuantLayer, cache_keyword
from tqindex.kv.compressed import as_dense

VOCAB = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small to share between threads: one thread is faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def with_cache(model, cache) -> dict:
    """``cache=`` or ``past_key_values=``: the keyword the installed transformers' model takes (`cache_keyword`)."""
    return {cache_keyword(model): cache}


def prompt(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model: LlamaForCausalLM, ids: torch.Tensor, cache, tokens: int = 64) -> torch.Tensor:
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), **with_cache(model, cache), max_new_tokens=tokens,
        min_new_tokens=tokens, do_sample=False, pad_token_id=0,
    )  # fmt: skip


def filled_layer(batch: int = 2, tokens: int = 30, window: int = 8, chunk: int = 4) -> TurboQuantLayer:
    """Layer 0 of a 3-bit cache holding ``tokens`` random keys/values of 2 heads x 32 dims."""
    cache = TurboQuantCache(3, 3, window=window, chunk=chunk)
    g = torch.Generator().manual_seed(1)
    cache.update(torch.randn(batch, 2, tokens, 32, generator=g), torch.randn(batch, 2, tokens, 32, generator=g), 0)
    return cache.layers[0]


def dense_kv(layer: TurboQuantLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's keys and values as attention sees them, dense ``(B, H, T, d)``."""
    return tuple(as_dense(t) for t in layer.states())


@pytest.fixture(scope="module")
def exact_greedy(model) -> torch.Tensor:
    model.set_attn_implementation("sdpa")
    return greedy(model, prompt(40), DynamicCache())


@pytest.mark.parametrize("attention", ["sdpa", "turboquant"])
def test_8bit_greedy_tokens_match_dynamic_cache(model, exact_greedy, attention):
    # 40 prompt + 64 generated tokens, window 8: all but the last 8-11 tokens are attended through codes
    model.set_attn_implementation(attention)
    cache = TurboQuantCache(8, 8, window=8, chunk=4)
    out = greedy(model, prompt(40), cache)
    assert all(layer.encoded_len >= 92 for layer in cache.layers)
    assert torch.equal(out, exact_greedy)


def test_both_cache_keywords_give_the_same_tokens(model):
    """``cache=`` (current transformers) and ``past_key_values=`` (older ones; a FutureWarning on current ones) both work."""
    model.set_attn_implementation("turboquant")
    ids = prompt(12)
    by_keyword = greedy(model, ids, TurboQuantCache(4, 4, window=4, chunk=4), tokens=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        cache = TurboQuantCache(4, 4, window=4, chunk=4)
        old = model.generate(
            ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0
        )
    assert torch.equal(old, by_keyword) and cache.layers[0].key_codes.packed.shape[2] > 0


def test_4bit_logits_close_and_memory_ratio(model):
    model.set_attn_implementation("turboquant")
    ids = prompt(1001)
    with torch.no_grad():
        exact = model(ids, **with_cache(model, DynamicCache())).logits[0]
        relative, kl = {}, {}
        for dense_prefill in (False, True):
            cache = TurboQuantCache(4, 4, window=8, chunk=8, dense_prefill=dense_prefill)
            logits = [model(ids[:, :1000], **with_cache(model, cache)).logits[0]]
            logits.append(model(ids[:, 1000:], **with_cache(model, cache)).logits[0])  # one decode step
            logits = torch.cat(logits)
            centred = exact - exact.mean(dim=-1, keepdim=True)
            relative[dense_prefill] = (logits - exact).norm(dim=-1) / centred.norm(dim=-1)
            kl[dense_prefill] = (exact.log_softmax(-1).exp() * (exact.log_softmax(-1) - logits.log_softmax(-1))).sum(-1)
    # every token through its codes (dense_prefill=False): measured relative error 0.088 mean / 0.120
    # max, KL 3.5e-4 max. A random model attends almost uniformly over 1000 tokens, so its logits move
    # mostly with the 4-bit value error (~9%/vector).
    assert relative[False].mean() < 0.15 and relative[False].max() < 0.25
    assert kl[False].max() < 2e-3
    # dense prefill: the prompt's logits are exact, the decode step reads 992 tokens' codes (measured 0.036)
    assert relative[True][:1000].max() < 1e-4 and 1e-3 < relative[True][1000] < 0.1

    report = cache.memory_report()
    assert report.tokens == 1001 and cache.layers[0].encoded_len == 992  # window 8 + 1 new token
    codes = [c for layer in cache.layers for c in (layer.key_codes, layer.value_codes)]
    windows = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    offsets = [layer.key_offset for layer in cache.layers]
    stored = sum(c.packed.nbytes + c.factors.nbytes for c in codes) + sum(t.nbytes for t in windows + offsets)
    assert report.total_bytes == cache.nbytes() == stored
    assert all(c.factors.dtype == torch.uint8 for c in codes)  # factor_dtype "auto": one log byte below 6 bits
    assert report.reference_bytes == 2 * 2 * 2 * 1001 * (64 + 64)  # fp16 x layers x KV heads x tokens x (k + v)
    # every stored byte: 4-bit codes + one-byte scales, the key means, and the float32 window
    assert report.ratio >= 3.5


def test_tokens_are_encoded_once_in_whole_chunks(monkeypatch):
    encoded_rows = []
    original = TurboQuantCodec.encode

    def counting_encode(self, x):
        encoded_rows.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(TurboQuantCodec, "encode", counting_encode)
    batch, heads, window, chunk = 2, 2, 8, 4
    layer = filled_layer(batch, tokens=37, window=window, chunk=chunk)  # encodes 28 tokens in one flush
    first_codes = layer.key_codes.packed.clone()
    for step in range(30):
        layer.update(torch.randn(batch, heads, 1, 32), torch.randn(batch, heads, 1, 32))
        assert window <= layer.keys.shape[2] < window + chunk
        # codes only grow at the end: what was encoded stays byte for byte
        assert torch.equal(layer.key_codes.packed[:, :, : first_codes.shape[2]], first_codes)
    assert layer.get_seq_length() == 67
    # one encode per flush for keys and one for values, each a whole number of chunks
    assert encoded_rows[:2] == [batch * heads * 28] * 2
    assert all(rows % (batch * heads * chunk) == 0 for rows in encoded_rows)
    assert sum(encoded_rows) == 2 * batch * heads * layer.encoded_len  # no token encoded twice
    assert len(encoded_rows) == 2 * (1 + 7)  # the prefill flush, then one per 4 new tokens


def test_crop_keeps_the_first_tokens_exactly():
    layer = filled_layer(tokens=30)  # 20 tokens encoded, 10 in the window
    keys, values = dense_kv(layer)
    layer.crop(-4)  # inside the window
    assert layer.get_seq_length() == 26 and layer.encoded_len == 20
    cropped_keys, cropped_values = dense_kv(layer)
    assert torch.equal(cropped_keys, keys[:, :, :26]) and torch.equal(cropped_values, values[:, :, :26])
    layer.crop(-10)  # into the codes
    assert layer.get_seq_length() == 16 and layer.encoded_len == 16 and layer.keys.shape[2] == 0
    assert torch.equal(dense_kv(layer)[0], keys[:, :, :16])
    layer.update(torch.randn(2, 2, 3, 32), torch.randn(2, 2, 3, 32))
    assert layer.get_seq_length() == 19 and layer.encoded_len == 16
    with pytest.raises(ValueError, match="negative"):
        layer.crop(3)


def test_generate_crop_through_the_cache(model):
    model.set_attn_implementation("turboquant")
    cache = TurboQuantCache(4, 4, window=4, chunk=4)
    greedy(model, prompt(20), cache, tokens=8)
    assert cache.get_seq_length() == 27  # the last generated token is never fed back
    cache.crop(-5)
    assert cache.get_seq_length() == 22
    assert all(layer.get_seq_length() == 22 and layer.encoded_len == 20 for layer in cache.layers)


def test_reorder_and_batch_ops_gather_codes_and_window():
    layer = filled_layer(batch=3)
    keys, values = dense_kv(layer)
    stored = [layer.key_codes.packed, layer.value_codes.factors, layer.key_offset, layer.keys]

    def same(got, want):  # codes are gathered exactly; decoding a different batch may round differently
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    layer.reorder_cache(torch.tensor([2, 0, 0]))
    now = [layer.key_codes.packed, layer.value_codes.factors, layer.key_offset, layer.keys]
    assert all(torch.equal(a, b[[2, 0, 0]]) for a, b in zip(now, stored))
    same(dense_kv(layer)[0], keys[[2, 0, 0]])
    same(dense_kv(layer)[1], values[[2, 0, 0]])
    layer.batch_repeat_interleave(2)
    same(dense_kv(layer)[0], keys[[2, 2, 0, 0, 0, 0]])
    layer.batch_select_indices(torch.tensor([0, 2]))
    same(dense_kv(layer)[0], keys[[2, 0]])


def test_beam_search_and_padded_batch_run(model):
    model.set_attn_implementation("turboquant")
    ids = prompt(12, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    cache = TurboQuantCache(4, 4, window=4, chunk=4)
    out = model.generate(ids, attention_mask=mask, **with_cache(model, cache), num_beams=3, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 18)
    assert all(layer.key_codes.packed.shape[0] == 6 and layer.keys.shape[0] == 6 for layer in cache.layers)


def test_attention_on_codes_equals_sdpa_on_the_same_codes(model):
    # one model, one cache setting, two attention implementations: only the arithmetic differs
    ids, mask = prompt(40, batch=2), torch.ones(2, 40, dtype=torch.long)
    mask[1, :6] = 0
    logits = {}
    for attention in ("sdpa", "turboquant"):
        model.set_attn_implementation(attention)
        cache = TurboQuantCache(3, 2.5, key_variant="prod", window=4, chunk=4, dense_prefill=False)
        with torch.no_grad():
            logits[attention] = model(ids, attention_mask=mask, **with_cache(model, cache)).logits
    torch.testing.assert_close(logits["turboquant"][:, 6:], logits["sdpa"][:, 6:], atol=1e-5, rtol=1e-5)


def test_trellis_codes_attend_alike_on_codes_and_decoded(model):
    ids = prompt(40, batch=2)
    logits = {}
    for attention in ("sdpa", "turboquant"):
        model.set_attn_implementation(attention)
        cache = TurboQuantCache(3, 3.5, quantizer="trellis", window=4, chunk=4, dense_prefill=False)
        with torch.no_grad():
            logits[attention] = model(ids, **with_cache(model, cache)).logits
        assert all(c.trellis is not None for c in cache._codec_cache.values())
    torch.testing.assert_close(logits["turboquant"], logits["sdpa"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="Triton backend reads scalar codes"):
        with torch.no_grad():
            trellis = TurboQuantCache(3, 3, quantizer="trellis", window=4, chunk=4, backend="triton", dense_prefill=False)
            model(ids, **with_cache(model, trellis))


def test_skip_layers_and_config_layer_types(model):
    cache = TurboQuantCache(skip_layers=[0], window=0)
    with torch.no_grad():
        model(prompt(10), **with_cache(model, cache))
    assert type(cache.layers[0]) is DynamicLayer and isinstance(cache.layers[1], TurboQuantLayer)
    report = cache.memory_report()
    assert report.uncompressed_bytes == 2 * 1 * 2 * 10 * 64 * 4  # layer 0 keys and values, float32
    # float32 states against the 16-bit reference, nothing encoded yet: larger, and said so
    assert report.total_bytes > report.reference_bytes
    assert str(report).endswith(f"{report.total_bytes / report.reference_bytes:.2f}x larger")

    cache = TurboQuantCache(config=model.config, skip_layers=[-1])
    assert isinstance(cache.layers[0], TurboQuantLayer) and type(cache.layers[1]) is DynamicLayer

    hybrid = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        layer_types=["full_attention", "sliding_attention"], sliding_window=16, use_sliding_window=True,
    )  # fmt: skip
    cache = TurboQuantCache(config=hybrid)
    assert isinstance(cache.layers[0], TurboQuantLayer) and isinstance(cache.layers[1], DynamicSlidingWindowLayer)

    with pytest.raises(ValueError, match="config"):
        TurboQuantCache(skip_layers=[-1])
    with pytest.raises(ValueError, match="out of range"):
        TurboQuantCache(config=model.config, skip_layers=[2])


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(key_bits=9), ValueError),
        (dict(value_bits=2.3), ValueError),
        (dict(key_variant="qjl"), ValueError),
        (dict(window=-1), ValueError),
        (dict(chunk=0), ValueError),
        (dict(backend="cuda"), ValueError),
        (dict(factor_dtype=torch.int8), TypeError),
        (dict(quantizer="vq"), ValueError),
        (dict(quantizer="trellis", key_variant="prod"), ValueError),
    ],
)
def test_bad_arguments_are_refused(kwargs, error):
    with pytest.raises(error):
        TurboQuantCache(**kwargs)


def test_scale_overflowing_float16_is_refused_not_stored_as_inf():
    cache = TurboQuantCache(window=0, chunk=1, factor_dtype=torch.float16)
    huge = torch.full((1, 1, 1, 32), 1e5)
    with pytest.raises(OverflowError, match="factor_dtype"):
        cache.update(huge, huge, 0)
    cache = TurboQuantCache(window=0, chunk=1, factor_dtype=torch.float32, dense_prefill=False)
    keys, _ = cache.update(huge, huge, 0)
    assert abs(keys.dense().norm() / huge.norm() - 1) < 0.05


def test_dense_prefill_attends_the_states_at_hand_and_encodes_them_once():
    g = torch.Generator().manual_seed(2)
    keys, values = torch.randn(1, 2, 30, 32, generator=g), torch.randn(1, 2, 30, 32, generator=g)
    cache = TurboQuantCache(4, 4, window=4, chunk=4)
    layer_keys, _ = cache.update(keys[:, :, :20], values[:, :, :20], 0)
    layer = cache.layers[0]
    assert not isinstance(layer_keys, CompressedKV) and torch.equal(layer_keys, keys[:, :, :20])  # prefill: sdpa on the states
    assert layer.encoded_len == 16 and torch.equal(layer.keys, keys[:, :, 16:20])
    codes = layer.key_codes.packed.clone()
    layer_keys, layer_values = cache.update(keys[:, :, 20:], values[:, :, 20:], 0)  # extend by 10: 8 more are encoded
    assert isinstance(layer_keys, CompressedKV) and layer_keys.shape == (1, 2, 30, 32)
    assert layer_keys.encoded_len == 16 and torch.equal(layer_keys.codes.packed, codes)  # the codes from before this call
    assert torch.equal(layer_keys.window, keys[:, :, 16:]) and torch.equal(layer_values.window, values[:, :, 16:])
    assert layer.encoded_len == 24 and torch.equal(layer.key_codes.packed[:, :, :16], codes)
    stored = TurboQuantCache(4, 4, window=4, chunk=4, dense_prefill=False)
    stored.update(keys[:, :, :20], values[:, :, :20], 0)
    stored_keys, _ = stored.update(keys[:, :, 20:], values[:, :, 20:], 0)  # what the cache holds after the update
    assert stored_keys.encoded_len == 24 and torch.equal(stored_keys.window, keys[:, :, 24:])
    with pytest.raises(TypeError, match="dense_prefill"):
        TurboQuantCache(dense_prefill="yes")


def test_compressed_kv_behaves_as_its_dense_tensor():
    layer = filled_layer()
    keys, _ = layer.update(torch.randn(2, 2, 1, 32), torch.randn(2, 2, 1, 32))
    assert isinstance(keys, CompressedKV) and keys.shape == (2, 2, 31, 32) and keys.encoded_len == 20
    dense = keys.dense()
    torch.testing.assert_close(keys * 2, dense * 2)
    torch.testing.assert_close(keys[:, :, 5:], dense[:, :, 5:])
    assert torch.equal(dense[:, :, 20:], layer.keys)  # the window is kept exactly
    assert "encoded=20" in repr(keys)


@pytest.mark.skipif(
    torch.__version__.startswith("2.5."),
    reason="torch 2.5's dynamo returns last_hidden_state=None from transformers 5.x models, DynamicCache too (checked with 2.5.1)",
)
def test_decode_runs_under_torch_compile_with_the_cache_as_an_opaque_call(model):
    # dynamo traces the model around the cache's update and the codes attention (torch.compiler.disable)
    model.set_attn_implementation("turboquant")
    ids = prompt(24)

    def run(forward) -> torch.Tensor:
        cache = TurboQuantCache(4, 4, window=4, chunk=4)
        logits = [forward(input_ids=ids, past_key_values=cache).logits[:, -1]]
        for _ in range(4):  # every step reads codes; the fourth flushes a chunk
            logits.append(forward(input_ids=logits[-1].argmax(-1, keepdim=True), past_key_values=cache).logits[:, -1])
        assert cache.layers[0].encoded_len == 24
        return torch.stack(logits)

    with torch.no_grad():
        eager = run(model.forward)
        compiled = run(torch.compile(model.forward, backend="eager"))
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
