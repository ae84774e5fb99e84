"""Host time of a decode attention call over codes and of a resident index search, without a GPU:
Python, torch's CPU work and Triton's JIT launch path (argument binding, specialisation, cache
key), which a GPU run pays on top of its kernels whenever it is not replayed from a CUDA graph (a
transformers decode step calls the attention once per layer).

Triton's driver is replaced by a stand-in (device 0, stream 0, target sm_90), the kernels are
compiled for sm_90 as on the GPU, and only the final C launch is a no-op; the tensors stay on the
CPU, so torch operations run there instead of being queued (the rotation's small matrix product
among them). The scan is told it runs interpreted, which lets CPU tensors through its device check
and aims its grid at a few programs; the kernels writing nothing, their row outputs are zeroed
for the index to map. Per case: the whole call, and each Triton launch alone, in microseconds, the best of
``--rounds`` rounds of ``--calls`` calls. Relies on Triton internals (``driver.set_active``,
``CompiledKernel``): for comparing forms of the host code on one machine, not a public figure.

Usage: python benchmarks/launch_overhead.py [--calls 2000] [--rounds 3]   (TRITON_INTERPRET must be 0 or unset)
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
import torch
import triton.compiler.compiler as compiler
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

import tqindex.kernels.triton_scan as triton_scan
import tqindex.kv.triton_attention as triton_attention
from _common import markdown_table
from kv_kernel_resources import _Recorder
from tqindex import TurboQuantIndex
from tqindex.kv import TurboQuantCache


class _Driver:
    """What `JITFunction.run` asks of the driver, and no more."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def _no_launch() -> None:
    """Compiled kernels load nothing and launch nothing."""
    compiler.CompiledKernel._init_handles = lambda self: None
    compiler.CompiledKernel.run = property(lambda self: lambda *args, **kwargs: None)
    compiler.CompiledKernel.function = None
    compiler.CompiledKernel.packed_metadata = None


def best_time(run: Callable[[], object], calls: int, rounds: int) -> float:
    """Microseconds a call, the best round."""
    best = float("inf")
    for _ in range(rounds):
        began = time.perf_counter()
        for _ in range(calls):
            run()
        best = min(best, (time.perf_counter() - began) / calls)
    return best * 1e6


def measure(label: str, run: Callable[[], object], module, names: tuple[str, ...], args) -> list[list]:
    """The call, then each of ``module``'s kernels ``names`` launched alone with the call's arguments."""
    calls: dict = {}
    real = {name: getattr(module, name) for name in names}
    for name, kernel in real.items():
        setattr(module, name, _Recorder(kernel, calls, forward=True))
    try:
        run()  # compiles; records the launches
    finally:
        for name, kernel in real.items():
            setattr(module, name, kernel)
    rows = [[label, "whole call", f"{best_time(run, args.calls, args.rounds):.1f}"]]
    for name, kernel in real.items():
        grid, launch_args, launch_kwargs = calls[name]
        arguments = len(launch_args) + len(launch_kwargs)
        us = best_time(lambda: kernel[grid](*launch_args, **launch_kwargs), args.calls, args.rounds)
        rows.append([label, f"{name} launch ({arguments} arguments)", f"{us:.1f}"])
    return rows


def _search() -> Callable[[], object]:
    """A resident index's search of one query, with the scanner's row outputs zeroed (the kernels write nothing)."""
    triton_scan._INTERPRETED = True
    scanner = triton_scan.TritonScanner
    candidates, rescore = scanner.candidates, scanner.rescore

    def zeroed_candidates(self, *args, **kwargs):
        bounds, rows, overflow = candidates(self, *args, **kwargs)
        return bounds, rows.zero_(), overflow.zero_()

    def zeroed_rescore(self, *args, **kwargs):
        scores, rows = rescore(self, *args, **kwargs)
        return scores.zero_(), rows.zero_()

    scanner.candidates, scanner.rescore = zeroed_candidates, zeroed_rescore
    rng = np.random.default_rng(0)
    index = TurboQuantIndex(768, 4, backend="triton").to("cpu")
    index.add(rng.standard_normal((2000, 768)).astype(np.float32))
    queries = rng.standard_normal((1, 768)).astype(np.float32)
    return lambda: index.search(queries, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        raise SystemExit("unset TRITON_INTERPRET: this times the compiled kernels' launch path")
    torch.set_num_threads(1)
    driver.set_active(_Driver())
    _no_launch()

    cache = TurboQuantCache(4, 4, window=128, chunk=32)
    cache.update(torch.randn(1, 8, 4096, 128).half(), torch.randn(1, 8, 4096, 128).half(), 0)
    keys, values = cache.layers[0].states()
    query = torch.randn(1, 32, 1, 128).half()

    def attention():
        return triton_attention.triton_codes_attention(query, keys, values, None, scaling=128**-0.5, causal=False)

    rows = measure("decode attention, 4k tokens, 32/8 heads", attention, triton_attention, ("_split_kernel", "_merge_kernel"), args)

    rows += measure("index.search, 1 query, 2,000 x 768, 4 bits", _search(), triton_scan, ("_scan_kernel", "_rescore_kernel"), args)
    print(f"\nhost time, microseconds (best of {args.rounds} rounds of {args.calls} calls; Triton launches faked, torch on the CPU):\n")
    print(markdown_table(["case", "part", "us"], rows))


if __name__ == "__main__":
    main()
