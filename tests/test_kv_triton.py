"""The Triton attention kernels (split-K decode + merge) against the torch path, in the interpreter or on a GPU.

On a CPU-only machine these run under TRITON_INTERPRET=1 on small shapes; with a GPU and
TRITON_INTERPRET=0 the same tests run compiled on CUDA tensors, and the GPU-only test runs too.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (transformers does)

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from tqindex.kv import TurboQuantCache, codes_attention  # noqa: E402
from tqindex.kv import attention as torch_attention  # noqa: E402
from tqindex.kv.triton_attention import DEFAULT_SMS, FMA_MAX_ROWS, KernelOptions, plan, triton_codes_attention  # noqa: E402
from triton_device import DEVICE  # noqa: E402

pytestmark = pytest.mark.triton
ON_GPU = DEVICE.type == "cuda"


def layer_states(batch=2, heads=2, tokens=40, dim=32, bits=(3, 3), variants=("mse", "mse"), window=4, chunk=4, seed=0, **options):
    """What a TurboQuantCache layer holds after ``tokens`` random keys (with a mean) and values."""
    cache = TurboQuantCache(*bits, key_variant=variants[0], value_variant=variants[1], window=window, chunk=chunk, **options)
    g = torch.Generator().manual_seed(seed)
    keys, values = (torch.randn(batch, heads, tokens, dim, generator=g) for _ in range(2))
    cache.update((keys + torch.linspace(-2, 2, dim)).to(DEVICE), values.to(DEVICE), 0)
    return cache.layers[0].states()


def padding_mask(batch: int, q_len: int, tokens: int) -> torch.Tensor:
    mask = torch.ones(batch, 1, q_len, tokens, dtype=torch.bool)
    mask[0, :, :, :3] = False  # left padding in the codes
    mask[-1, :, :, -2:] = False  # and some window tokens
    return mask.to(DEVICE)


CASES = {
    # GQA decode, batch 2, padding mask, float16 factors, 2 splits of 2 blocks (the last one partly past the end)
    "mse4-mse2.5": (dict(bits=(4, 2.5), factor_dtype=torch.float16), 6, 1, "padding", KernelOptions(block_t=16, splits=2)),
    # prod keys and values, log factors, centred keys, no window: all 40 tokens are codes; causal reaches into them
    "prod3-prod3": (dict(bits=(3, 3), variants=("prod", "prod"), window=0, chunk=1, factor_dtype="log8"), 4, 3, "causal", KernelOptions(block_t=16)),
    # the same, 3 rows (one query head per KV head): causal masking in the token-slot decode
    "prod3-prod3-3rows": (dict(bits=(3, 3), variants=("prod", "prod"), window=0, chunk=1, factor_dtype="log8"), 2, 3, "causal", KernelOptions(block_t=16)),
    # 1-bit keys (8 coordinates per byte), 8-bit values (one per byte), additive float mask, one split
    "mse1-mse8": (dict(bits=(1, 8), center_keys=False), 4, 2, "float", KernelOptions(block_t=32, splits=1)),
    # fractional keys with their extra-bit field, prod 2-bit values, head dim 48 (dense rotation, padded to 64)
    "mse3.5-prod2": (dict(bits=(3.5, 2), variants=("mse", "prod"), dim=48), 2, 1, None, KernelOptions(block_t=16, splits=3)),
    # 20 rows on CUDA cores (asked for): 3 row blocks of at most FMA_MAX_ROWS, causal across them
    "mse4-mse4-cuda-cores": (dict(bits=(4, 4)), 4, 10, "causal", KernelOptions(block_t=16, dot=False)),
}  # fmt: skip


@pytest.mark.parametrize("slots", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_kernels_equal_the_torch_path(case, slots):
    """Each case with the token-slot decode (`_split_slots`, where it has at most 4 rows) and without."""
    options, q_heads, q_len, masking, kernel_options = CASES[case]
    kernel_options = dataclasses.replace(kernel_options, slots=slots)
    keys, values = layer_states(**options)
    batch, dim, tokens = keys.shape[0], keys.shape[-1], keys.shape[2]
    query = torch.randn(batch, q_heads, q_len, dim, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = None
    if masking == "padding":
        mask = padding_mask(batch, q_len, tokens)
    elif masking == "float":
        mask = torch.randn(1, 1, q_len, tokens, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    causal = masking == "causal"
    scaling = 1 / math.sqrt(dim)
    expected = codes_attention(query, keys, values, mask, scaling=scaling, causal=causal, backend="torch")
    got = triton_codes_attention(query, keys, values, mask, scaling=scaling, causal=causal, options=kernel_options)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


def test_many_rows_run_on_tensor_cores_and_agree_to_float16_rounding():
    keys, values = layer_states(batch=1, bits=(4, 4), window=0, chunk=1, dense_prefill=False)  # 40 codes
    query = torch.randn(1, 4, 12, 32).to(DEVICE)  # 24 rows per KV head: tl.dot on blocks of 32
    assert plan(2, 24, 40, 32, DEFAULT_SMS).dot
    expected = codes_attention(query, keys, values, scaling=0.2, causal=True, backend="torch")
    got = triton_codes_attention(query, keys, values, None, scaling=0.2, causal=True, options=KernelOptions(block_t=32, splits=2))
    assert float((got - expected).norm() / expected.norm()) < 3e-3  # float16 operands, float32 sums
    decode = query[:, :, -1:]  # and one position, forced onto tensor cores
    forced = triton_codes_attention(decode, keys, values, None, scaling=0.2, causal=True, options=KernelOptions(dot=True, block_t=32))
    assert float((forced - expected[:, :, -1:]).norm() / expected[:, :, -1:].norm()) < 3e-3
    assert not plan(2, 2, 40, 32, DEFAULT_SMS, KernelOptions(dot=True)).merge_dot  # its merge: CUDA cores, 2 rows
    with pytest.raises(ValueError, match="tensor-core blocks need block_t >= 32"):  # wrong on an H200 (Triton 3.6)
        triton_codes_attention(decode, keys, values, None, scaling=0.2, causal=True, options=KernelOptions(dot=True, block_t=16))


@pytest.mark.parametrize("case", ["mse4-mse2.5", "prod3-prod3"])
def test_a_merge_program_per_row_equals_one_per_row_block(case):
    """A decode's merge: one program per query row (the default) or all rows in one (3 and 6 rows here)."""
    options, q_heads, q_len, masking, kernel_options = CASES[case]
    keys, values = layer_states(**options)
    query = torch.randn(keys.shape[0], q_heads, q_len, keys.shape[-1], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = padding_mask(keys.shape[0], q_len, keys.shape[2]) if masking == "padding" else None
    kwargs = dict(scaling=0.3, causal=masking == "causal")
    per_row = triton_codes_attention(query, keys, values, mask, options=kernel_options, **kwargs)
    together = dataclasses.replace(kernel_options, merge_rows=8)
    rows = q_heads // keys.shape[1] * q_len
    assert plan(4, rows, 40, 32, DEFAULT_SMS, kernel_options).merge_m == 1 and plan(4, rows, 40, 32, DEFAULT_SMS, together).merge_m > 2
    torch.testing.assert_close(triton_codes_attention(query, keys, values, mask, options=together, **kwargs), per_row, atol=1e-6, rtol=1e-6)


def test_plan_fills_the_sms_with_whole_power_of_two_splits():
    for pairs, tokens in ((8, 4096), (8, 131072), (64, 32768), (1, 100)):
        launch = plan(pairs, 4, tokens, 128, 132)
        programs = pairs * launch.splits
        assert launch.splits * launch.split_blocks * launch.block_t >= tokens  # every token is in a split
        assert (launch.splits - 1) * launch.split_blocks * launch.block_t < tokens  # and no split is empty
        assert launch.split_blocks & (launch.split_blocks - 1) == 0
        assert programs <= 4 * 132 or launch.splits == 1
        assert programs * 2 > 4 * 132 or launch.split_blocks == 1  # at least half the target, unless splits are one block
    assert not plan(8, 4, 4096, 128, 132).dot and plan(8, 64, 4096, 128, 132).dot
    assert plan(8, 4, 32768, 128, 132).dot  # long decode: tensor cores (measured faster from 32k tokens)
    assert plan(8, 4, 4096, 128, 132).num_warps == 4 and plan(8, 4, 32768, 128, 132).num_warps == 8
    long = plan(8, 4, 32768, 128, 132, KernelOptions(merge_rows=4))  # a decode's merge: CUDA cores, not padded to the split's 16
    assert (long.block_m, long.merge_m, long.merge_dot) == (16, 4, False)
    extend = plan(8, 24, 32768, 128, 132, KernelOptions(merge_rows=4))  # more rows: the split's blocks, tensor cores
    assert (extend.merge_m, extend.merge_dot) == (extend.block_m, True)
    assert not plan(8, 24, 4096, 128, 132, KernelOptions(dot=False)).merge_dot  # CUDA cores asked for: the merge too
    assert plan(8, 100_000, 4096, 128, 132, KernelOptions(dot=False)).block_m == FMA_MAX_ROWS  # rows unrolled one by one: bounded
    with pytest.raises(ValueError, match="merge_rows must be at least 1"):
        KernelOptions(merge_rows=0)
    slots = KernelOptions(slots=True)  # the token-slot decode: CUDA cores, at most 4 rows
    assert plan(8, 4, 4096, 128, 132, slots).slots and plan(8, 3, 4096, 128, 132, slots).slots
    assert not plan(8, 6, 4096, 128, 132, slots).slots and not plan(8, 4, 4096, 128, 132, KernelOptions(slots=True, dot=True)).slots
    assert plan(8, 4, 4096, 128, 132, KernelOptions(splits=1)).splits == 1
    assert 2 <= plan(8, 4, 4096, 128, 132, KernelOptions(splits=3)).splits <= 3


def test_torch_path_in_blocks_of_query_positions_equals_one_block(monkeypatch):
    keys, values = layer_states(batch=1, bits=(3, 3), window=6, chunk=2, dense_prefill=False, tokens=24)
    query = torch.randn(1, 4, 7, 32).to(DEVICE)
    whole = codes_attention(query, keys, values, scaling=0.2, causal=True, backend="torch")
    monkeypatch.setattr(torch_attention, "_QUERY_BLOCK", 3)
    monkeypatch.setattr(torch_attention, "_TOKEN_BLOCK", 5)
    torch.testing.assert_close(codes_attention(query, keys, values, scaling=0.2, causal=True, backend="torch"), whole, atol=1e-5, rtol=1e-5)


def test_kernels_compile_for_a_real_gpu(tmp_path):
    """The interpreter accepts code the compiler rejects: compile both kernels for sm_90 (no GPU needed)
    on CUDA-core decode with log factors, prod codes, a tensor-core extend with a causal mask, and one
    at head_dim 8 (the interpreter's tl.dot takes K = 8, the compiler wants 16)."""
    pytest.importorskip("triton.backends.nvidia")
    root = Path(__file__).resolve().parents[1]
    cases = ["decode 4/4 bits (defaults)", "decode prod 3/3 bits", "extend 64 positions", "extend 4 positions, head_dim 8"]
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path), "PYTHONPATH": f"{root}{os.pathsep}{root / 'benchmarks'}"}
    script = [sys.executable, str(root / "benchmarks" / "kv_kernel_resources.py"), "--scratch", str(tmp_path), "--cases", *cases]
    done = subprocess.run(script, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| split |") == done.stdout.count("| merge |") == len(cases), done.stdout[-2000:]


class _HostReads(TorchDispatchMode):
    """The aten operations that read a tensor's values back to the host, or make a tensor of host data
    (``torch.tensor``, ``new_tensor``: a copy to the device there): on a GPU each waits for it."""

    READS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "_unique2", "unique_consecutive", "lift_fresh"}

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        boolean_index = name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if name in self.READS or boolean_index:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("factor_dtype", ["log8", torch.float16])
def test_a_flush_reads_back_from_the_device_once(monkeypatch, factor_dtype):
    """Keys and values of a flush, their encoding (the GPU's fused encoder), the log8 range fitted at the
    first flush and its check at the next: one read back to the host (``tolist``) a flush, no other."""
    import tqindex.kv.cache as cache_module
    from tqindex.kernels import triton_encode

    if not ON_GPU:
        monkeypatch.setattr(cache_module, "encode", triton_encode.encode)  # on CUDA tensors kernels.encode picks it
    transfers = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: transfers.append(self.shape) or real_tolist(self))
    cache = TurboQuantCache(4, 4, window=8, chunk=8, factor_dtype=factor_dtype)
    keys, values = (torch.randn(1, 2, 40, 32, generator=torch.Generator().manual_seed(i)).to(DEVICE) for i in range(2))
    reference = TurboQuantCache(4, 4, window=8, chunk=8, factor_dtype=factor_dtype)  # the CPU encoder, its own checks
    cache.update(keys[:, :, :0], values[:, :, :0], 0)  # no tokens: the layer and its codecs (CPU constants from numpy) made before counting
    log, counted = _HostReads(), 0
    for steps in [slice(0, 24)] + [slice(t, t + 1) for t in range(24, 32)]:  # a prefill encodes 16 tokens, the 8th step 8 more
        reference.update(keys[:, :, steps].cpu(), values[:, :, steps].cpu(), 0)
        before = len(transfers)
        with log:
            cache.update(keys[:, :, steps], values[:, :, steps], 0)
        counted += len(transfers) - before
    assert log.reads == [] and counted == 2, (log.reads, counted)
    assert cache.layers[0].encoded_len == 24
    for got, want in zip((cache.layers[0].key_codes, cache.layers[0].value_codes), (reference.layers[0].key_codes, reference.layers[0].value_codes)):
        assert torch.equal(got.packed.cpu(), want.packed)
        torch.testing.assert_close(got.factors.cpu().float(), want.factors.float(), atol=0, rtol=2e-3)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (torch's synchronisation debug mode)")
def test_a_flush_synchronises_with_the_gpu_once():
    cache = TurboQuantCache(4, 4, window=8, chunk=8)
    keys, values = torch.randn(1, 2, 40, 32, device=DEVICE), torch.randn(1, 2, 40, 32, device=DEVICE)
    cache.update(keys[:, :, :24], values[:, :, :24], 0)  # the first flush fits the log8 ranges
    for t in range(24, 31):
        cache.update(keys[:, :, t : t + 1], values[:, :, t : t + 1], 0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as caught:
            cache.update(keys[:, :, 31:32], values[:, :, 31:32], 0)  # flushes 8 tokens
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cache.layers[0].encoded_len == 24
    assert sum("synchroniz" in str(w.message) for w in caught) == 1, [str(w.message) for w in caught]


def test_a_flush_refuses_non_finite_states_before_storing_anything(monkeypatch):
    import tqindex.kv.cache as cache_module
    from tqindex.kernels import triton_encode

    if not ON_GPU:
        monkeypatch.setattr(cache_module, "encode", triton_encode.encode)
    cache = TurboQuantCache(4, 4, window=4, chunk=4)
    keys, values = torch.randn(1, 2, 16, 32).to(DEVICE), torch.randn(1, 2, 16, 32).to(DEVICE)
    cache.update(keys[:, :, :8], values[:, :, :8], 0)
    layer = cache.layers[0]
    before = (layer.key_codes.packed.clone(), layer.value_codes.factors.clone(), layer.keys.clone())
    bad = values[:, :, 8:].clone()
    bad[0, 1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="value states hold a non-finite value"):
        cache.update(keys[:, :, 8:], bad, 0)
    assert torch.equal(layer.key_codes.packed, before[0]) and torch.equal(layer.value_codes.factors, before[1])
    assert torch.equal(layer.keys, before[2])


def test_the_launch_overhead_tool_times_both_calls(tmp_path):
    """`benchmarks/launch_overhead.py` (Triton's driver faked, kernels compiled for sm_90) runs both cases."""
    pytest.importorskip("triton.backends.nvidia")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path), "PYTHONPATH": f"{root}{os.pathsep}{root / 'benchmarks'}"}
    script = [sys.executable, str(root / "benchmarks" / "launch_overhead.py"), "--calls", "5", "--rounds", "1"]
    done = subprocess.run(script, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for part in ("_split_kernel launch", "_merge_kernel launch", "_scan_kernel launch", "_rescore_kernel launch"):
        assert part in done.stdout, done.stdout[-2000:]


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval().to(DEVICE)


def test_decode_steps_in_a_model_equal_the_torch_backend(model):
    model.set_attn_implementation("turboquant")
    ids = torch.randint(0, 32, (2, 24), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    logits = {}
    for backend in ("torch", "triton"):
        cache = TurboQuantCache(4, 3.5, window=4, chunk=4, backend=backend)
        steps = [model(ids[:, :20], past_key_values=cache).logits[:, -1]]  # prefill: dense, encodes 16 tokens
        for position in range(20, 22):  # decode over the codes and the window
            steps.append(model(ids[:, position : position + 1], past_key_values=cache).logits[:, -1])
        logits[backend] = torch.stack(steps)
    torch.testing.assert_close(logits["triton"], logits["torch"], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (compiled Triton)")
def test_8bit_cache_generates_the_dynamic_cache_tokens_on_the_gpu(model):
    ids = torch.randint(0, 32, (1, 40), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    outputs = {}
    for name, attention, cache in (("exact", "sdpa", DynamicCache()), ("codes", "turboquant", TurboQuantCache(8, 8, window=8, chunk=4))):
        model.set_attn_implementation(attention)
        outputs[name] = model.generate(
            ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=48, min_new_tokens=48,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip
    assert torch.equal(outputs["codes"], outputs["exact"])


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (CUDA graphs)")
def test_decode_attention_replays_in_a_cuda_graph():
    """No host synchronisation inside a decode call: it is captured in a CUDA graph, and replays
    follow new query values (how serving engines run decode)."""
    keys, values = layer_states(batch=2, bits=(4, 4), window=8, chunk=4, tokens=300)
    static = torch.randn(2, 4, 1, 32, device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        codes_attention(static, keys, values, scaling=0.2)  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = codes_attention(static, keys, values, scaling=0.2)
    for seed in (1, 2):
        fresh = torch.randn(2, 4, 1, 32, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
        static.copy_(fresh)
        graph.replay()
        torch.testing.assert_close(out, codes_attention(fresh, keys, values, scaling=0.2), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bits, variants", [((4, 2), ("mse", "mse")), ((3, 3.5), ("prod", "mse"))])
def test_register_lookups_on_tensor_cores_equal_the_gathers(bits, variants):
    """`KernelOptions(register_tables=True)`: 4- and 2-bit levels (2-bit prod indices beside their sign
    field too) looked up by byte permutes give the tensor cores the same float16 operands as the
    gathers, so the same outputs bit for bit; a layout without the look-up (3.5 bits) keeps gathering."""
    keys, values = layer_states(batch=1, bits=bits, variants=variants, window=4, chunk=4, tokens=72)
    query = torch.randn(1, 4, 2, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    options = KernelOptions(dot=True, block_t=32, splits=2)
    want = triton_codes_attention(query, keys, values, None, scaling=0.2, causal=True, options=options)
    got = triton_codes_attention(query, keys, values, None, scaling=0.2, causal=True, options=dataclasses.replace(options, register_tables=True))
    assert torch.equal(got, want)
    expected = codes_attention(query, keys, values, scaling=0.2, causal=True, backend="torch")
    assert float((got - expected).norm() / expected.norm()) < 3e-3  # float16 operands, float32 sums
