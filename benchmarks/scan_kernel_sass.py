"""Static cost of the Triton scan's inner loop on an NVIDIA GPU, compiled without one.

Each case's kernel is compiled ahead of time (default sm_90, the H100/H200) for the arguments of
a real `TritonScanner.candidates` call on CPU tensors, whose launch is recorded instead of run
(as ``kv_kernel_resources.py``). The SASS (``cuobjdump -sass``) is split at its backward
branches; the innermost loop is the step over ``BLOCK_D`` coordinates of ``BLOCK_N`` rows (or,
where ptxas unrolled those steps, the loop over row tiles: all ``D`` coordinates), and

    instructions per coordinate = loop instructions x 32 threads x warps / (BLOCK_N x BLOCK_D or D)

is what every thread of the GPU issues per code coordinate scanned (for all the queries of a
program: one in the default FMA form, up to 64 on tensor cores), with the loop's opcode mix.
It ranks kernel forms before a GPU times them (``bench_gpu.py``); it does not time anything.
The H200 issues ~3.3e13 thread-instructions/s (132 SMs x 4 schedulers x 32 lanes x 1.98 GHz), so
at 10M x 768 one instruction per coordinate costs ~0.23 ms, and reading the 4-bit codes at the
measured copy bandwidth (4.2 TB/s) ~0.9 ms.

Usage: python benchmarks/scan_kernel_sass.py [--arch 90] [--cases NAME ...]   (TRITON_INTERPRET must be 0 or unset)
"""

from __future__ import annotations

import collections
import os

import torch
import triton

import tqindex.kernels.triton_scan as scan
from _common import markdown_table
from kv_kernel_resources import _Recorder, compile_for, innermost_loop, parse_arguments, resource_usage, sass
from tqindex.codec import TurboQuantCodec

_ONE = scan.FMA
_INT8_128 = scan.ScanConfig(mma=False, max_block_m=4, block_n=128, block_d=128, num_warps=4, programs_per_sm=16)
CASES = {  # name: (bits, config, query dtype, queries, register look-ups on tensor cores)
    "4-bit, FMA (default, 1 query)": (4, _ONE, torch.float16, 1, False),
    "4-bit, FMA, fp32 queries": (4, _ONE, torch.float32, 1, False),
    "4-bit, int8 dp4a": (4, _ONE, torch.int8, 1, False),
    "4-bit, int8 dp4a, 128 coordinates/step": (4, _INT8_128, torch.int8, 1, False),
    "4-bit, int8 dp4a, 4 queries": (4, _ONE, torch.int8, 4, False),
    "2-bit, FMA (default, 1 query)": (2, _ONE, torch.float16, 1, False),
    "2-bit, int8 dp4a": (2, _ONE, torch.int8, 1, False),
    "2-bit, int8 dp4a, 128 coordinates/step": (2, _INT8_128, torch.int8, 1, False),
    "4-bit, tensor cores (default, 32 queries)": (4, scan.MMA, torch.float16, 32, False),
    "4-bit, tensor cores, register look-ups, 32 queries": (4, scan.MMA, torch.float16, 32, True),
    "4-bit, int8 tensor cores, 32 queries": (4, scan.INT8_MMA, torch.int8, 32, False),
    "2-bit, tensor cores (default, 32 queries)": (2, scan.MMA, torch.float16, 32, False),
    "2-bit, tensor cores, register look-ups, 32 queries": (2, scan.MMA, torch.float16, 32, True),
    "2-bit, int8 tensor cores, 32 queries": (2, scan.INT8_MMA, torch.int8, 32, False),
}


def recorded_launch(bits: float, config: scan.ScanConfig, dtype: torch.dtype, queries: int, tables: bool = False, dim: int = 768, n: int = 1 << 20):
    """The scan kernel's launch for ``candidates`` over ``n`` random rows of ``dim`` coordinates, k = 10."""
    codec = TurboQuantCodec(dim, bits)
    packed = torch.randint(0, 256, (n, codec.code_bytes), dtype=torch.uint8)
    factors = torch.ones(n, codec.n_factors)
    scanner = scan.TritonScanner(codec, config, dtype, register_tables=tables)
    prepared = scanner.prepare(codec.rotate_queries(torch.randn(queries, dim)))
    calls: dict = {}
    real, interpreted = scan._scan_kernel, scan._INTERPRETED
    scan._scan_kernel, scan._INTERPRETED = _Recorder(real, calls), True  # CPU tensors pass the device check
    try:
        scanner.candidates(prepared, packed, factors, None, 36)
    finally:
        scan._scan_kernel, scan._INTERPRETED = real, interpreted
    return calls[real.__name__]


def main() -> None:
    args = parse_arguments(__doc__, CASES, scan._INTERPRETED)
    rows = []
    for case in args.cases:
        bits, config, dtype, queries, tables = CASES[case]
        _, call_args, call_kwargs = recorded_launch(bits, config, dtype, queries, tables)
        compiled, warps = compile_for(scan._scan_kernel, call_args, call_kwargs, args.arch)
        path = os.path.join(args.scratch, "scan.cubin")
        usage = resource_usage(compiled, path)
        loop, nested = innermost_loop(sass(compiled.asm["cubin"], path))
        block_m, block_n, block_d = (call_kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_D"))
        per_coordinate = len(loop) * 32 * warps / (block_n * (block_d if nested else call_kwargs["DIM"]))  # for all block_m queries
        mix = collections.Counter(opcode.split(".")[0] for _, opcode, _ in loop).most_common(8)
        loop_name = f"{len(loop)} (a step)" if nested else f"{len(loop)} (a tile: steps unrolled)"
        rows.append([case, f"{block_m}x{block_n}x{block_d}", usage["REG"], loop_name, f"{per_coordinate:.2f}", " ".join(f"{o} {c}" for o, c in mix)])
        print(rows[-1], flush=True)
    print(f"\nsm_{args.arch}, triton {triton.__version__}, d = 768; per code coordinate, for all the queries of a program:\n")
    print(markdown_table(["case", "queries x rows x coordinates a step", "registers", "loop instructions", "instructions / coordinate", "top opcodes"], rows))


if __name__ == "__main__":
    main()
