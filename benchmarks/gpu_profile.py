"""Where a GPU call's time goes: CUDA kernel times (torch.profiler) of decode attention over codes and
of a resident index search, next to their uncompressed baselines.

1. One decode step at ``--tokens`` (batch 1, 32 query heads, 8 KV heads, head_dim 128, 4-bit codes)
   under each kernel plan of `PLANS`, and sdpa over the same keys and values in fp16.
2. ``TurboQuantIndex.search`` of one query over ``--rows`` x 768 4-bit codes resident on the GPU,
   eager and through CUDA graphs (`tqindex.kernels.graphs`).
3. The fused encode (`tqindex.kernels.encode`) of ``--rows`` x 768 at 4 bits, without and with code
   search: the rotation GEMM's share against the quantize kernel's (issue 12's encode target).

Prints one torch.profiler table per call (sorted by CUDA time; per call = total / ``--reps``).
Needs a CUDA GPU. Usage: python benchmarks/gpu_profile.py [--tokens T] [--rows N] [--reps R]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from tqindex import TurboQuantCodec, TurboQuantIndex
from tqindex.kernels import encode
from tqindex.kernels.graphs import SearchGraphs
from tqindex.kv import TurboQuantCache
from tqindex.kv.triton_attention import KernelOptions, triton_codes_attention

PLANS = {
    "default": KernelOptions(),
    "tensor cores": KernelOptions(dot=True),
    "token slots": KernelOptions(slots=True),
    "merge: 4 rows a program": KernelOptions(merge_rows=4),
}


def table(run: Callable[[], object], label: str, reps: int) -> None:
    for _ in range(3):  # compiles, warms up
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            run()
        torch.cuda.synchronize()
    print(f"\n== {label} ({reps} calls)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    keys, values = (torch.randn(1, 8, args.tokens, 128, device="cuda", generator=g).half() for _ in range(2))
    cache = TurboQuantCache(4, 4, window=128, chunk=32)
    cache.update(keys, values, 0)
    k_codes, v_codes = cache.layers[0].states()
    query = torch.randn(1, 32, 1, 128, device="cuda", generator=g).half()
    scale = 128**-0.5
    for name, options in PLANS.items():
        def attend(options=options) -> torch.Tensor:
            return triton_codes_attention(query, k_codes, v_codes, None, scaling=scale, causal=False, options=options)

        table(attend, f"decode attention over codes, T={args.tokens}, {name}", args.reps)
    table(lambda: torch.nn.functional.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=True), "sdpa over fp16", args.reps)

    index = TurboQuantIndex(768, 4, backend="triton").to("cuda")
    for start in range(0, args.rows, 1 << 18):
        index.add(torch.randn(min(1 << 18, args.rows - start), 768, device="cuda", generator=g), progress=False)
    q = np.random.default_rng(0).standard_normal((1, 768)).astype(np.float32)
    table(lambda: index.search(q, 10), f"index.search, {args.rows} x 768 4-bit, 1 query, eager", args.reps)
    index._graphs = SearchGraphs(max_queries=1)
    table(lambda: index.search(q, 10), f"index.search, {args.rows} x 768 4-bit, 1 query, CUDA graphs", args.reps)

    x = torch.randn(args.rows, 768, device="cuda", generator=g)
    for search in (False, True):
        codec = TurboQuantCodec(768, 4, search=search)
        table(lambda codec=codec: encode(codec, x), f"encode {args.rows} x 768 4-bit, search={search}", 3)


if __name__ == "__main__":
    main()
