"""KV cache on the GPU: decode attention over codes vs sdpa over fp16, and end-to-end decode and prefill vs DynamicCache.

Every figure is also given as a ratio to the uncompressed baseline of the same run.

1. Attention, one decode step (32 query heads, 8 KV heads, head_dim 128, fp16) at each context
   ``T`` (--contexts) and batch (--batches): ``codes_attention`` (Triton: split-K over the codes,
   merge with the 128-token window) on a ``TurboQuantCache`` layer holding ``T`` random keys and
   values, against ``scaled_dot_product_attention(..., enable_gqa=True)`` over the same keys and
   values in fp16. Times are medians of ``triton.testing.do_bench`` (L2 flushed between runs):
   "eager" (every launch from Python, as a model runs it) and "graph" (the same call captured in a
   CUDA graph and replayed: kernels only). Bytes read per step (codes, factors, window vs fp16
   K/V) and the bandwidth they imply. Checks: max |codes - sdpa on the decoded cache| (T <= 32k)
   and the output cosine against exact attention.
2. Kernel variants (--variants): the same step at the first two contexts, batch 1, with other
   ``KernelOptions`` (tensor cores, splits per SM, tokens per block, warps), each checked against
   the default's output.
3. End to end: a Llama-shaped model with random weights (8B shapes: hidden 4096, 32/8 heads,
   head_dim 128, MLP 14336, vocab 128256; --layers of them, bf16): prefill of a random prompt of
   each --e2e-contexts length (``logits_to_keep=1``), then greedy decode, with ``DynamicCache``
   (sdpa) and with ``TurboQuantCache`` ("turboquant" attention). Prefill time (the cache's includes
   encoding the prompt once), decode tokens/s from the median of the timed steps (each
   synchronised; after --warmup-steps, so every kernel variant is compiled) and the slowest step
   (a chunk flush falls inside the timed steps in proportion), bytes the cache holds, and the
   peak GPU memory above the weights during decode.

Usage: python benchmarks/bench_kv_gpu.py [--contexts T ...] [--batches B ...] [--e2e-contexts T ...]
       [--layers N] [--decode-steps N] [--no-variants] [--json PATH]
``--smoke`` runs tiny sizes on the CPU under TRITON_INTERPRET=1 (set before triton is imported): it
checks the script, its timings mean nothing.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before anything imports triton
    os.environ["TRITON_INTERPRET"] = "1"

import argparse
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from _common import markdown_table
from tqindex.kv import CompressedKV, TurboQuantCache, codes_attention
from tqindex.kv.triton_attention import KernelOptions, plan, sm_count, triton_codes_attention

warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)

VARIANTS = {
    "default": KernelOptions(),
    "CUDA cores": KernelOptions(dot=False),
    "CUDA cores, 8 warps": KernelOptions(dot=False, num_warps=8),
    "tensor cores": KernelOptions(dot=True),
    "tensor cores, 4 warps": KernelOptions(dot=True, num_warps=4),
    "tensor cores, block_t 128": KernelOptions(dot=True, block_t=128),
    "tensor cores, register look-ups": KernelOptions(dot=True, register_tables=True),
    "token slots": KernelOptions(dot=False, slots=True),
    "token slots, 8 warps, block_t 32": KernelOptions(dot=False, slots=True, num_warps=8, block_t=32),
    "token slots, block_t 16": KernelOptions(dot=False, slots=True, block_t=16),
    "tl.load gather": KernelOptions(gather_asm=False),
    "merge: 4 rows a program": KernelOptions(merge_rows=4),
}
SMOKE = dict(
    contexts=[64, 200], batches=[1, 2], q_heads=4, kv_heads=2, head_dim=32, e2e_contexts=[96], layers=2, decode_steps=3,
    warmup_steps=2, window=16, chunk=8, hidden=128, intermediate=256, vocab=128, prefill_repeats=1, backend="triton",
)  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072], help="attention: tokens in the cache")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="attention: batch sizes")
    parser.add_argument("--bits", type=float, default=4, help="key and value code bits (default 4)")
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--window", type=int, default=128, help="the cache's dense window (default 128)")
    parser.add_argument("--chunk", type=int, default=32, help="the cache's chunk (default 32)")
    parser.add_argument("--backend", default="auto", help="the cache's attention backend (default auto: Triton on CUDA)")
    parser.add_argument("--no-variants", dest="variants", action="store_false", help="skip the kernel variants")
    parser.add_argument("--e2e-contexts", type=int, nargs="+", default=[4096, 32768], help="end to end: prompt lengths")
    parser.add_argument("--e2e-batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--decode-steps", type=int, default=64, help="timed decode steps")
    parser.add_argument("--warmup-steps", type=int, default=40, help="untimed decode steps first (compiles, a flush)")
    parser.add_argument("--prefill-repeats", type=int, default=3, help="timed prefills per cache (median)")
    parser.add_argument("--json", default="results/bench_kv_gpu.json", help="where the full results go")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU in the Triton interpreter")
    args = parser.parse_args()
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    return args


# ---- timing ---------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` on a GPU (L2 flushed), wall clock otherwise."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def graph_ms(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Median milliseconds of ``fn`` captured in a CUDA graph and replayed; None off the GPU or if capture fails."""
    if device.type != "cuda":
        return None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return bench_ms(graph.replay, device)
    except RuntimeError as error:  # recorded, not fatal: the eager figure stands
        print(f"  CUDA graph capture failed: {error}", flush=True)
        return None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fmt(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"


# ---- 1, 2: attention per decode step --------------------------------------------------------


def cache_layer(args: argparse.Namespace, batch: int, tokens: int, device: torch.device, dtype: torch.dtype):
    """Random keys (with a mean) and values ``(B, H, T, d)``, and a TurboQuantCache layer's view of them."""
    g = torch.Generator(device=device).manual_seed(tokens + batch)
    shape = (batch, args.kv_heads, tokens, args.head_dim)
    keys = (torch.randn(shape, generator=g, device=device) + 0.5 * torch.randn(args.head_dim, generator=g, device=device)).to(dtype)
    values = torch.randn(shape, generator=g, device=device).to(dtype)
    cache = new_cache("turboquant", args)
    cache.update(keys, values, 0)
    sync(device)
    return keys, values, cache.layers[0].states()


def stored_bytes(kv: CompressedKV) -> int:
    """Bytes one decode step reads from a CompressedKV: codes, factors, the key offset and the window."""
    offset = kv.offset.nbytes if kv.offset is not None else 0
    return kv.codes.packed.nbytes + kv.codes.factors.nbytes + kv.window.nbytes + offset


def attention_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[list[dict], list[dict]]:
    rows, variants = [], []
    scale = 1 / math.sqrt(args.head_dim)
    sms = sm_count(device)
    for tokens in args.contexts:
        for batch in args.batches:
            try:
                rows.append(attention_row(args, tokens, batch, device, dtype, scale, sms, variants))
            except Exception as failure:  # noqa: BLE001 - recorded, and the other sizes still run
                rows.append(dict(tokens=tokens, batch=batch, error=repr(failure)[:500]))
                print(f"attention T={tokens} B={batch} failed: {failure!r}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows, variants


def attention_row(
    args: argparse.Namespace, tokens: int, batch: int, device: torch.device, dtype: torch.dtype, scale: float, sms: int, variants: list[dict]
) -> dict[str, Any]:
    """One (context, batch) of part 1, and its kernel variants (part 2) appended to ``variants``."""
    keys, values, (k_codes, v_codes) = cache_layer(args, batch, tokens, device, dtype)
    query = torch.randn(batch, args.q_heads, 1, args.head_dim, device=device).to(dtype)

    def ours() -> torch.Tensor:
        return codes_attention(query, k_codes, v_codes, scaling=scale)

    def sdpa() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=True)

    out, exact = ours(), sdpa()
    row: dict[str, Any] = dict(tokens=tokens, batch=batch, encoded=k_codes.encoded_len, window=k_codes.window.shape[2])
    d_pad = max(16, 1 << (args.head_dim - 1).bit_length())
    row["plan"] = asdict(plan(batch * args.kv_heads, args.q_heads // args.kv_heads, k_codes.encoded_len, d_pad, sms))
    row["cosine_vs_exact"] = float(torch.nn.functional.cosine_similarity(out.float().flatten(1), exact.float().flatten(1)).min())
    if tokens <= 32768:
        decoded = torch.nn.functional.scaled_dot_product_attention(
            query.float(), k_codes.dense().float(), v_codes.dense().float(), scale=scale, enable_gqa=True
        )  # fmt: skip
        row["max_abs_vs_decoded"] = float((out.float() - decoded).abs().max())
    row["ours_ms"], row["sdpa_ms"] = bench_ms(ours, device), bench_ms(sdpa, device)
    row["ours_graph_ms"], row["sdpa_graph_ms"] = graph_ms(ours, device), graph_ms(sdpa, device)
    row["ours_bytes"] = stored_bytes(k_codes) + stored_bytes(v_codes)
    row["sdpa_bytes"] = keys.nbytes + values.nbytes
    row["speedup"] = ratio(row["sdpa_ms"], row["ours_ms"])
    row["speedup_graph"] = ratio(row["sdpa_graph_ms"], row["ours_graph_ms"])
    best = row["ours_graph_ms"] or row["ours_ms"]
    row["ours_gbps"] = row["ours_bytes"] / best / 1e6
    row["sdpa_gbps"] = row["sdpa_bytes"] / (row["sdpa_graph_ms"] or row["sdpa_ms"]) / 1e6
    print(f"attention T={tokens} B={batch}: {json.dumps({k: v for k, v in row.items() if k != 'plan'})}", flush=True)
    if args.variants and batch == 1:
        variants += variant_rows(query, k_codes, v_codes, scale, out, device, tokens)
    return row


def variant_rows(
    query: torch.Tensor, k_codes: CompressedKV, v_codes: CompressedKV, scale: float, reference: torch.Tensor, device: torch.device, tokens: int
) -> list[dict]:
    """Part 2: the same step under each of `VARIANTS`, checked against the default's output."""
    rows = []
    for name, options in VARIANTS.items():
        def run(options=options) -> torch.Tensor:
            return triton_codes_attention(query, k_codes, v_codes, None, scaling=scale, causal=False, options=options)

        try:
            error = float((run().float() - reference.float()).abs().max())
            rows.append(dict(tokens=tokens, variant=name, options=asdict(options), ms=bench_ms(run, device), graph_ms=graph_ms(run, device), max_abs_vs_default=error))
        except Exception as failure:  # noqa: BLE001 - a variant that does not compile is a result, not a crash
            rows.append(dict(tokens=tokens, variant=name, options=asdict(options), error=repr(failure)[:300]))
        print(f"variant T={tokens} {name}: {json.dumps(rows[-1])}", flush=True)
    return rows


# ---- 3: end to end --------------------------------------------------------------------------


def llama(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.q_heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        max_position_embeddings=max(args.e2e_contexts) + args.warmup_steps + args.decode_steps + 8, rope_theta=500000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def kv_bytes(cache: Any) -> int:
    if isinstance(cache, TurboQuantCache):
        return cache.nbytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def new_cache(kind: str, args: argparse.Namespace) -> Any:
    if kind == "dynamic":
        return DynamicCache()
    return TurboQuantCache(args.bits, args.bits, window=args.window, chunk=args.chunk, backend=args.backend)


def end_to_end(args: argparse.Namespace, model: LlamaForCausalLM, tokens: int, device: torch.device) -> dict[str, Any]:
    prompt = torch.randint(0, args.vocab, (args.e2e_batch, tokens), generator=torch.Generator().manual_seed(tokens)).to(device)
    row: dict[str, Any] = dict(tokens=tokens, batch=args.e2e_batch)
    for kind, attention in (("dynamic", "sdpa"), ("turboquant", "turboquant")):
        model.set_attn_implementation(attention)
        with torch.no_grad():
            prefill = []
            for _ in range(args.prefill_repeats + 1):  # the first compiles and warms up
                cache = new_cache(kind, args)
                sync(device)
                start = time.perf_counter()
                logits = model(input_ids=prompt, past_key_values=cache, logits_to_keep=1).logits
                sync(device)
                prefill.append(time.perf_counter() - start)
                del logits, cache
            cache = new_cache(kind, args)
            token = model(input_ids=prompt, past_key_values=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(args.warmup_steps):
                token = model(input_ids=token, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)
            sync(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            steps = []  # each step timed alone (synchronised): the median is the steady state, the sum shows stalls
            for _ in range(args.decode_steps):
                start = time.perf_counter()
                token = model(input_ids=token, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)
                sync(device)
                steps.append(time.perf_counter() - start)
        weights = sum(p.nbytes for p in model.parameters())
        row[kind] = dict(
            prefill_s=statistics.median(prefill[1:]),
            decode_tokens_per_s=args.e2e_batch / statistics.median(steps),
            decode_tokens_per_s_mean=args.decode_steps * args.e2e_batch / sum(steps),
            decode_step_ms_max=1e3 * max(steps),
            kv_bytes=kv_bytes(cache),
            decode_peak_above_weights=(torch.cuda.max_memory_allocated(device) - weights) if device.type == "cuda" else None,
            held_before_decode_above_weights=base - weights if device.type == "cuda" else None,
        )
        print(f"end to end T={tokens} {kind}: {json.dumps(row[kind])}", flush=True)
        del cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dyn, ours = row["dynamic"], row["turboquant"]
    row["prefill_overhead"] = ours["prefill_s"] / dyn["prefill_s"] - 1
    row["decode_speed_ratio"] = ours["decode_tokens_per_s"] / dyn["decode_tokens_per_s"]
    row["kv_memory_ratio"] = dyn["kv_bytes"] / ours["kv_bytes"]
    row["decode_peak_ratio"] = ratio(dyn["decode_peak_above_weights"], ours["decode_peak_above_weights"])
    return row


# ---- report ---------------------------------------------------------------------------------


def describe(device: torch.device) -> dict[str, Any]:
    packages = {name: _version(name) for name in ("torch", "triton", "transformers", "numpy")}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return dict(device=str(device), gpu=gpu, sms=sm_count(device), packages=packages, date=time.strftime("%Y-%m-%d %H:%M:%S"))


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def tables(results: dict[str, Any]) -> str:
    attention = markdown_table(
        ["T", "batch", "codes ms", "sdpa ms", "sdpa/codes", "codes ms (graph)", "sdpa ms (graph)", "sdpa/codes (graph)", "bytes codes/fp16", "codes GB/s", "cos vs exact"],
        [
            [r["tokens"], r["batch"], fmt(r["ours_ms"]), fmt(r["sdpa_ms"]), fmt(r["speedup"]), fmt(r["ours_graph_ms"]),
             fmt(r["sdpa_graph_ms"]), fmt(r["speedup_graph"]), fmt(r["ours_bytes"] / r["sdpa_bytes"]), fmt(r["ours_gbps"]),
             f"{r['cosine_vs_exact']:.4f}"]
            for r in results["attention"] if "error" not in r
        ] + [[r["tokens"], r["batch"], r["error"]] + [""] * 8 for r in results["attention"] if "error" in r],
    )  # fmt: skip
    parts = [f"Attention per decode step, {results['config']['bits']}-bit codes ({results['machine']['gpu'] or 'CPU, interpreter'}):", attention]
    if results["variants"]:
        parts += ["Kernel variants (batch 1):", markdown_table(
            ["T", "variant", "ms", "ms (graph)", "max abs vs default"],
            [[r["tokens"], r["variant"], fmt(r.get("ms")), fmt(r.get("graph_ms")), r.get("error") or fmt(r.get("max_abs_vs_default"))]
             for r in results["variants"]],
        )]  # fmt: skip
    parts += ["End to end (random Llama-shaped model):", markdown_table(
        ["T", "prefill s dynamic", "prefill s cache", "prefill overhead", "decode tok/s dynamic", "decode tok/s cache",
         "cache/dynamic speed", "slowest step ms dynamic / cache", "KV bytes dynamic/cache", "decode peak dynamic/cache"],
        [[r["tokens"], fmt(r["dynamic"]["prefill_s"]), fmt(r["turboquant"]["prefill_s"]), f"{100 * r['prefill_overhead']:.1f}%",
          fmt(r["dynamic"]["decode_tokens_per_s"]), fmt(r["turboquant"]["decode_tokens_per_s"]), fmt(r["decode_speed_ratio"]),
          f"{fmt(r['dynamic']['decode_step_ms_max'])} / {fmt(r['turboquant']['decode_step_ms_max'])}",
          fmt(r["kv_memory_ratio"]), fmt(r["decode_peak_ratio"])] for r in results["end_to_end"] if "error" not in r]
        + [[r["tokens"], r["error"]] + [""] * 8 for r in results["end_to_end"] if "error" in r],
    )]  # fmt: skip
    return "\n\n".join(parts)


def main() -> None:
    args = parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke for the CPU interpreter check")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part: a run cut short keeps what it measured
        path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")

    results: dict[str, Any] = dict(config=vars(args), machine=describe(device), attention=[], variants=[], end_to_end=[])
    results["attention"], results["variants"] = attention_rows(args, device, torch.float32 if args.smoke else torch.float16)
    save()
    model = llama(args, device, torch.float32 if args.smoke else torch.bfloat16)
    for tokens in args.e2e_contexts:
        try:
            results["end_to_end"].append(end_to_end(args, model, tokens, device))
        except Exception as failure:  # noqa: BLE001 - recorded; the table shows what ran
            results["end_to_end"].append(dict(tokens=tokens, error=repr(failure)[:500]))
            print(f"end to end T={tokens} failed: {failure!r}", flush=True)
        save()
    print(f"\nwrote {path}\n")
    print(tables(results))


if __name__ == "__main__":
    main()
