"""Static cost of the fused GPU encoder (``tqindex.kernels.triton_encode``) on an NVIDIA GPU, compiled without one.

The quantize kernel is compiled ahead of time (default sm_90, the H100/H200) for the arguments of a
real ``quantize`` call on CPU tensors, whose launch is recorded instead of run (as
``scan_kernel_sass.py``). Its SASS loops are told apart by nesting: with code search, the loop over
coordinate blocks of `_add_crossings` holds the loop over crossing rounds, which holds the loop that
settles each crossing's grid point; then come the two sweeps over the grid (`_best_scaling`) and
the loop of the last pass (nearest levels and packing). Each loop's instructions, times 32 threads times the warps, are spread over the ``BLOCK_R x
BLOCK_D`` elements one pass covers; the round loop runs as often as the most level moves of any
element of a block (measured here on Gaussian rows, the same rotation), the settling loop once per
round (an estimate off by one; ``--settle`` changes it). The sweeps over the 91 grid points, and
straight-line code, run once per program: spread over its ``BLOCK_R x D`` elements. The result is what every
thread of the GPU issues per coordinate encoded; it ranks kernel forms, it times nothing. The H200
issues ~3.3e13 thread-instructions/s.

Usage: python benchmarks/encode_kernel_sass.py [--arch 90] [--rows 4096] [--cases NAME ...]   (TRITON_INTERPRET must be 0 or unset)
"""

from __future__ import annotations

import argparse
import collections
import os
import re

import torch
import triton

import tqindex.kernels.triton_encode as enc
from _common import markdown_table
from kv_kernel_resources import _Recorder, compile_for, parse_arguments, resource_usage, sass
from tqindex.codec import TurboQuantCodec

CASES = {  # name: (dim, bits, search)
    "d = 128, 4 bits, code search (the KV cache's default)": (128, 4, True),
    "d = 128, 2 bits, code search": (128, 2, True),
    "d = 768, 4 bits, code search": (768, 4, True),
    "d = 128, 4 bits, nearest levels": (128, 4, False),
    "d = 768, 4 bits, nearest levels (the index's default)": (768, 4, False),
}


def recorded_launch(codec: TurboQuantCodec, x: torch.Tensor):
    """The quantize kernel's launch for ``x``'s rows."""
    calls: dict = {}
    real = enc._quantize_kernel
    enc._quantize_kernel = _Recorder(real, calls)
    try:
        enc.quantize(codec, codec.rotation.forward(x), torch.linalg.vector_norm(x, dim=1), False)
    finally:
        enc._quantize_kernel = real
    return calls[real.__name__]


def loops(code: list[tuple[int, str, str]]) -> list[tuple[int, int, int]]:
    """``(start, stop, depth)`` of every loop (a backward branch and its target), depth 0 outermost."""
    spans = []
    for address, opcode, operands in code:
        target = re.search(r"0x([0-9a-f]+)", operands)
        if opcode.startswith("BRA") and target and int(target.group(1), 16) < address:
            spans.append((int(target.group(1), 16), address))
    return [(a, b, sum(c <= a and b <= d and (c, d) != (a, b) for c, d in spans)) for a, b in sorted(spans)]


def rounds_per_block(codec: TurboQuantCodec, x: torch.Tensor, block_r: int, block_d: int) -> float:
    """Mean over blocks of ``block_r x block_d`` elements of the most level moves of one element."""
    unit = codec.rotation.forward(x) / torch.linalg.vector_norm(x, dim=1, keepdim=True)
    grid, bounds = codec._search_grid_t, codec._bounds_lo
    moves = (torch.bucketize(grid[-1] * unit, bounds) - torch.bucketize(grid[0] * unit, bounds)).abs()
    rows, dim = moves.shape
    moves = torch.nn.functional.pad(moves, (0, -dim % block_d))
    blocks = moves[: rows - rows % block_r].reshape(-1, block_r, moves.shape[1] // block_d, block_d)
    return float(blocks.amax(dim=(1, 3)).float().mean())


def main() -> None:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--rows", type=int, default=4096, help="Gaussian rows for the round counts")
        parser.add_argument("--settle", type=float, default=1.0, help="settling-loop passes per round")

    args = parse_arguments(__doc__, CASES, not isinstance(enc._quantize_kernel, triton.runtime.JITFunction), options)
    table = []
    for case in args.cases:
        dim, bits, search = CASES[case]
        codec = TurboQuantCodec(dim, bits, search=search)
        x = torch.randn(args.rows, dim, generator=torch.Generator().manual_seed(0))
        _, call_args, call_kwargs = recorded_launch(codec, x)
        compiled, warps = compile_for(enc._quantize_kernel, call_args, call_kwargs, args.arch)
        path = os.path.join(args.scratch, "encode.cubin")
        usage = resource_usage(compiled, path)
        code = sass(compiled.asm["cubin"], path)
        spans = loops(code)
        size = {(a, b): sum(a <= address <= b for address, _, _ in code) for a, b, _ in spans}
        threads = 32 * warps
        block_r, block_d = enc.TILES[search]
        per_pass = threads / (block_r * block_d)  # a loop pass over one block of elements
        last = max((s for s in spans if s[2] == 0), key=lambda s: s[0])  # the last pass: nearest levels, packing
        total = size[last[:2]] * per_pass
        rounds = rounds_per_block(codec, x, block_r, block_d) if search else 0.0
        per_program = threads / (block_r * dim)  # code a program runs once over its rows
        if search:  # top level: the crossings' coordinate blocks, the sweeps over the grid (best key; choice), the last pass
            outer, *sweeps, _ = (s[:2] for s in spans if s[2] == 0)
            inner, settle = (next(s[:2] for s in spans if s[2] == depth) for depth in (1, 2))
            total += (size[outer] - size[inner]) * per_pass + rounds * ((size[inner] - size[settle]) + args.settle * size[settle]) * per_pass
            total += sum(size[sweep] for sweep in sweeps) * len(codec._search_grid) * per_program
        straight = len(code) - sum(size[s[:2]] for s in spans if s[2] == 0)
        total += straight * per_program
        mix = collections.Counter(opcode.split(".")[0] for _, opcode, _ in code).most_common(6)
        table.append([case, usage["REG"], usage["STACK"], " / ".join(str(size[s[:2]]) for s in spans), f"{rounds:.1f}", f"{total:.0f}",
                      f"{total / len(codec._search_grid) if search else total:.1f}", " ".join(f"{o} {c}" for o, c in mix)])  # fmt: skip
        print(table[-1], flush=True)
    tiles = ", ".join(f"{r} rows x {d} coordinates a pass {'with' if search else 'without'} code search" for search, (r, d) in enc.TILES.items())
    print(f"\nsm_{args.arch}, triton {triton.__version__}; {tiles}; settling passes a round: {args.settle}:\n")
    headers = ["case", "registers", "stack bytes", "loop instructions", "rounds a block", "instructions / coordinate", "per coordinate and scaling", "top opcodes (whole kernel)"]
    print(markdown_table(headers, table))


if __name__ == "__main__":
    main()
