"""Registers, spills, shared memory and SASS counts of the KV attention kernels for an NVIDIA GPU, compiled without one.

Triton compiles ahead of time for a target (default sm_90, the H100/H200) with its bundled ptxas;
``cuobjdump -res-usage`` reads each cubin. The kernels' arguments come from a real call of
`triton_codes_attention` on CPU tensors whose launches are recorded instead of run. Use it to
choose warps and block sizes where no GPU is at hand (a spill or 255 registers halves the
programs an SM holds); timing still needs the GPU (benchmarks/bench_kv_gpu.py). For the split
kernel it also counts the SASS of its loop over token blocks (``cuobjdump -sass``) per token and
key or value coordinate, for all the rows of a program, and the loads in it (codebook gathers
are LDGs); for the merge kernel, the loop steps a program takes one after another (`merge_steps`).

Usage: python benchmarks/kv_kernel_resources.py [--arch 90] [--cases NAME ...]   (TRITON_INTERPRET must be 0 or unset)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from collections.abc import Callable

import torch
import triton
from triton.backends.compiler import GPUTarget

import tqindex.kv.triton_attention as kernels
from _common import markdown_table
from tqindex.kv import TurboQuantCache

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8", torch.int8: "i8", torch.int32: "i32", torch.int64: "i64"}
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
CASES = {  # name: (cache options (and "head_dim", default 128), query heads, query positions, tokens, kernel options)
    "decode 4/4 bits (defaults)": (dict(), 32, 1, 4096, kernels.KernelOptions()),
    "decode 4/4 bits, 4 warps": (dict(), 32, 1, 4096, kernels.KernelOptions(num_warps=4)),
    "decode 4/4 bits, 32 tokens/block": (dict(), 32, 1, 4096, kernels.KernelOptions(block_t=32)),
    "decode 4/4 bits, tensor cores": (dict(), 32, 1, 4096, kernels.KernelOptions(dot=True)),
    "decode 32k tokens (defaults: tensor cores)": (dict(), 32, 1, 32768, kernels.KernelOptions()),
    "decode 32k tokens, 4 rows a merge program": (dict(), 32, 1, 32768, kernels.KernelOptions(merge_rows=4)),
    "decode 32k tokens, tensor cores, register look-ups": (dict(), 32, 1, 32768, kernels.KernelOptions(register_tables=True)),
    "decode 32k tokens, 2/2 bits (tensor cores)": (dict(key_bits=2, value_bits=2), 32, 1, 32768, kernels.KernelOptions()),
    "decode 32k tokens, 2/2 bits, register look-ups": (dict(key_bits=2, value_bits=2), 32, 1, 32768, kernels.KernelOptions(register_tables=True)),
    "decode 4/4 bits, token slots": (dict(), 32, 1, 4096, kernels.KernelOptions(slots=True)),
    "decode 4/4 bits, token slots, 32 tokens/block": (dict(), 32, 1, 4096, kernels.KernelOptions(slots=True, block_t=32)),
    "decode 4/4 bits, token slots, 8 warps": (dict(), 32, 1, 4096, kernels.KernelOptions(slots=True, num_warps=8)),
    "decode 4/4 bits, token slots, 8 warps, 32 tokens/block": (dict(), 32, 1, 4096, kernels.KernelOptions(slots=True, num_warps=8, block_t=32)),
    "decode 4/4 bits, token slots, 16 tokens/block": (dict(), 32, 1, 4096, kernels.KernelOptions(slots=True, block_t=16)),
    "decode 4/4 bits, token slots, 32k": (dict(), 32, 1, 32768, kernels.KernelOptions(slots=True, num_warps=8, block_t=32)),
    "decode prod 3/3 bits, token slots": (dict(key_bits=3, value_bits=3, key_variant="prod", value_variant="prod"), 32, 1, 4096, kernels.KernelOptions(slots=True)),
    "decode 3.5/3.5 bits, fp16 factors": (dict(key_bits=3.5, value_bits=3.5, factor_dtype=torch.float16), 32, 1, 4096, kernels.KernelOptions()),
    "decode 2/2 bits": (dict(key_bits=2, value_bits=2), 32, 1, 4096, kernels.KernelOptions()),
    "decode 8/8 bits": (dict(key_bits=8, value_bits=8), 32, 1, 4096, kernels.KernelOptions()),
    "decode prod 3/3 bits": (dict(key_bits=3, value_bits=3, key_variant="prod", value_variant="prod"), 32, 1, 4096, kernels.KernelOptions()),
    "decode, 8 query heads per KV head": (dict(), 64, 1, 4096, kernels.KernelOptions()),
    "4 positions (16 rows, tensor cores)": (dict(), 32, 4, 4096, kernels.KernelOptions()),
    "extend 64 positions": (dict(), 32, 64, 2048, kernels.KernelOptions()),
    "extend 64 positions, prod 3/3 bits": (dict(key_bits=3, value_bits=3, key_variant="prod", value_variant="prod"), 32, 64, 2048, kernels.KernelOptions()),
    "extend 64 positions, head_dim 256": (dict(head_dim=256), 32, 64, 2048, kernels.KernelOptions()),
    "extend 4 positions, head_dim 8": (dict(head_dim=8), 32, 4, 2048, kernels.KernelOptions()),
}  # fmt: skip


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the call (its last one, by
    kernel name, in ``calls``), then launches it if ``forward``."""

    def __init__(self, kernel, calls: dict, forward: bool = False):
        self.kernel, self.calls, self.forward = kernel, calls, forward

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls[self.kernel.__name__] = (grid, args, kwargs)
            return self.kernel[grid](*args, **kwargs) if self.forward else None

        return launch


def recorded_launches(cache_options: dict, q_heads: int, q_len: int, tokens: int, options) -> dict:
    """The two kernels' launches for one attention call (8 KV heads, head_dim 128 unless the options say, fp16)."""
    cache_kwargs = dict(key_bits=4, value_bits=4) | cache_options
    head_dim = cache_kwargs.pop("head_dim", 128)
    cache = TurboQuantCache(**cache_kwargs, window=128, chunk=32)
    cache.update(torch.randn(1, 8, tokens, head_dim).half(), torch.randn(1, 8, tokens, head_dim).half(), 0)
    keys, values = cache.layers[0].states()
    calls: dict = {}
    real = kernels._split_kernel, kernels._merge_kernel
    kernels._split_kernel, kernels._merge_kernel = _Recorder(real[0], calls), _Recorder(real[1], calls)
    try:
        kernels.triton_codes_attention(torch.randn(1, q_heads, q_len, head_dim).half(), keys, values, None, scaling=0.09, causal=q_len > 1, options=options)
    except Exception:  # noqa: BLE001 - the host code after the launches reads outputs nothing wrote
        pass
    finally:
        kernels._split_kernel, kernels._merge_kernel = real
    return {name: (kernel, *calls[kernel.__name__]) for name, kernel in zip(("split", "merge"), real)}


def compile_for(kernel, args: tuple, kwargs: dict, arch: int):
    """Compile ``kernel`` for ``args`` as the JIT would specialise them (16-byte divisibility of pointers
    and ints; None and 1 as constants); ``num_warps`` and ``num_stages`` from ``kwargs``."""
    kwargs = dict(kwargs)
    num_warps = kwargs.pop("num_warps", 4)
    launch = {"num_warps": num_warps} | ({"num_stages": kwargs.pop("num_stages")} if "num_stages" in kwargs else {})
    values = dict(zip(kernel.arg_names, args)) | kwargs
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        value = values[name]
        if kernel.params[i].is_constexpr or value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name], attrs[(i,)] = "*" + _DTYPES[value.dtype], [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0 and value:
                attrs[(i,)] = [["tt.divisibility", 16]]
    target = GPUTarget("cuda", arch, 32)
    options = triton.compiler.make_backend(target).parse_options(launch)
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=target, options=options.__dict__), num_warps


def resource_usage(compiled, path: str) -> dict[str, str]:
    with open(path, "wb") as out:
        out.write(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    text = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    return dict(part.split(":") for part in line.split() if ":" in part)


def sass(cubin: bytes, path: str) -> list[tuple[int, str, str]]:
    """``(address, opcode, operands)`` of every instruction of the cubin."""
    with open(path, "wb") as out:
        out.write(cubin)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    text = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    return [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _INSTRUCTION.finditer(text)]


def innermost_loop(code: list[tuple[int, str, str]]) -> tuple[list[tuple[int, str, str]], bool]:
    """The instructions of the largest loop (a backward branch and its target) holding no other
    loop, and whether another loop holds it: then it is the step over coordinates inside the
    loop over row tiles; else ptxas unrolled the steps and it is the row-tile loop, over all coordinates."""
    loops = []
    for address, opcode, operands in code:
        target = re.search(r"0x([0-9a-f]+)", operands)
        if opcode.startswith("BRA") and target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    start, stop = max(inner, key=lambda span: span[1] - span[0])
    nested = any(a <= start and stop <= b and (a, b) != (start, stop) for a, b in loops)
    return [ins for ins in code if start <= ins[0] <= stop], nested


def parse_arguments(doc: str, cases: dict, interpreted: bool, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """``--arch``, ``--scratch`` and ``--cases`` (of ``cases``) of a static-analysis script, and what
    ``extra`` adds to the parser; exits under the interpreter, which compiles nothing."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if extra is not None:
        extra(parser)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    parser.add_argument("--scratch", default="/tmp", help="where the cubins are written")
    parser.add_argument("--cases", nargs="+", choices=list(cases), default=list(cases), help="which cases (default all)")
    args = parser.parse_args()
    if interpreted:
        raise SystemExit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    return args


def split_cost(code: list[tuple[int, str, str]], warps: int, kwargs: dict) -> tuple[float, int]:
    """The split kernel's SASS per token and coordinate (keys and values: ``2 D`` of them), for all the
    rows of a program, and the loads (LDG) per token block: its loop over token blocks, or, with one
    block a split, the whole kernel."""
    spans = []
    for address, opcode, operands in code:
        target = re.search(r"0x([0-9a-f]+)", operands)
        if opcode.startswith("BRA") and target and int(target.group(1), 16) < address:
            spans.append((int(target.group(1), 16), address))
    body = code
    if spans:
        start, stop = max(spans, key=lambda span: span[1] - span[0])
        body = [ins for ins in code if start <= ins[0] <= stop]
    per_token = len(body) * 32 * warps / kwargs["BLOCK_T"]
    return per_token / (2 * kwargs["D"]), sum(opcode.startswith("LDG") for _, opcode, _ in body)


def merge_steps(kwargs: dict) -> int:
    """Loop steps a merge program takes one after another: tiles of split partials, window blocks,
    blocks of the rotation back (`_merge_kernel`'s three loops)."""
    return kwargs["SPLIT_LOOPS"] + kwargs["WINDOW_LOOPS"] + -(-kwargs["DACC"] // kwargs["BLOCK_K"])


def main() -> None:
    args = parse_arguments(__doc__, CASES, kernels.INTERPRETED)
    rows = []
    for case in args.cases:
        cache_options, q_heads, q_len, tokens, options = CASES[case]
        for name, (kernel, grid, call_args, call_kwargs) in recorded_launches(cache_options, q_heads, q_len, tokens, options).items():
            compiled, warps = compile_for(kernel, call_args, call_kwargs, args.arch)
            path = os.path.join(args.scratch, f"kv_{name}.cubin")
            usage = resource_usage(compiled, path)
            cost, loads = split_cost(sass(compiled.asm["cubin"], path), warps, call_kwargs) if name == "split" else (None, None)
            per = f"{cost:.1f}" if cost is not None else ""
            steps = merge_steps(call_kwargs) if name == "merge" else ""
            rows.append([case, name, str(grid), warps, usage["REG"], usage["STACK"], compiled.metadata.shared, per, "" if loads is None else loads, steps])
            print(rows[-1], flush=True)
    print(f"\nsm_{args.arch}, triton {triton.__version__}:\n")
    headers = ["case", "kernel", "grid", "warps", "registers", "stack bytes (spills)", "shared bytes", "instructions / token and coordinate", "LDG a token block", "merge steps"]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
