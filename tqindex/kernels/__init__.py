"""Scan backends, chosen by one dispatch function from the backend, the device and the batch size."""

from __future__ import annotations

import importlib.util
import weakref
from typing import Any

import torch

from tqindex.codec import Codes, TurboQuantCodec
from tqindex.kernels import fastscan, lut
from tqindex.kernels.gemm import GemmScanner
from tqindex.kernels.scan import Chunk, QueryChunk, Scanner, candidate_count, scan_groups_topk, scan_topk, search_resident

BACKENDS = ("auto", "torch", "lut", "fastscan", "triton")

#: the Triton scan's form by batch size: CUDA-core FMAs (``triton_scan.FMA``) up to this many
#: queries, the tensor-core dequantize-GEMM form (``triton_scan.MMA``) above. Measured on an H200
#: over 10M x 768 4-bit codes (benchmarks/bench_gpu.py): FMAs 2.6 ms for 1 query, 6.3 for 2;
#: tensor cores 4.0 for 2.
TRITON_FMA_MAX_QUERIES = 1
#: the Triton scan reads float16 queries; queries whose norm reaches this (rotated coordinates are at
#: most the norm; float16 holds 65504) get its float32 form instead (l2 queries, which are not rescaled)
HALF_QUERY_NORM = 2.0**15

#: "auto" on the CPU scans with look-up tables (where the layout allows) while queries x bits
#: <= this, else decodes + GEMMs. Table work grows with the code bytes per query, decode work
#: does not: measured at 100k x 384 on 2 cores, tables win up to 8 queries at 2 bits and up to 4
#: at 4 bits (benchmarks/bench_backends.py, docs/benchmarks.md)
LUT_MAX_QUERY_BITS = 16


# scanners keep only tables derived from the codec, so one per (codec, backend) serves every search
_SCANNERS: "weakref.WeakKeyDictionary[TurboQuantCodec, dict[str, Scanner]]" = weakref.WeakKeyDictionary()


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def get_scanner(
    codec: TurboQuantCodec, backend: str = "auto", device: torch.device | str = "cpu", queries: int = 1, query_norm: float = 0.0
) -> Scanner:
    """The scanner for ``backend`` on ``device`` for a batch of ``queries`` whose largest norm is ``query_norm``.

    "torch": decode + GEMM in torch (any device). "lut": per-byte look-up tables (CPU, numba;
    layouts of 1, 2, 4 or 8 index bits). "fastscan": the compiled SIMD fast-scan (CPU, every
    scalar layout; ``kernels.fastscan``). "triton": the fused Triton kernel (CUDA tensors, or CPU
    tensors under ``TRITON_INTERPRET=1``), its FMA form up to ``TRITON_FMA_MAX_QUERIES`` queries
    and its tensor-core form above, both with float16 queries below `HALF_QUERY_NORM` and float32
    ones from there. "auto": triton on a CUDA device where triton is installed; on
    the CPU, fastscan where the extension is built, else (with a warning) lut while
    ``queries * bits <= LUT_MAX_QUERY_BITS`` where the layout allows, else torch.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = torch.device(device).type == "cuda"
    if backend == "auto":
        if on_cuda:
            backend = "triton" if _triton_available() else "torch"
        elif fastscan.supports(codec):
            backend = "fastscan"
        else:
            fastscan.warn_if_missing()
            few = queries * float(codec.config.bits) <= LUT_MAX_QUERY_BITS
            backend = "lut" if few and lut.supports(codec.layout) else "torch"
    if backend in ("lut", "fastscan") and on_cuda:
        raise ValueError(f"backend={backend!r} runs on the CPU only")
    if backend == "triton":
        backend = "triton-fma" if queries <= TRITON_FMA_MAX_QUERIES else "triton-mma"
        backend += "-fp32" if query_norm >= HALF_QUERY_NORM else ""
    made = _SCANNERS.setdefault(codec, {})
    if backend not in made:
        made[backend] = _make_scanner(codec, backend)
    return made[backend]


def encode(codec: TurboQuantCodec, x: Any, *, check: bool = True) -> Codes:
    """``codec.encode(x)``; for tensors on a CUDA device where triton is installed, the fused GPU
    encoder (``triton_encode``: rotation GEMM + one quantize-and-pack kernel, the same packed bytes).
    ``check=False`` lets a GPU caller skip the encoder's finiteness checks, which wait for the
    device, and check the factors itself (non-finite input gives non-finite factors); the
    other paths check as ``codec.encode`` does."""
    if isinstance(x, torch.Tensor) and x.device.type == "cuda" and codec.trellis is None and _triton_available():
        from tqindex.kernels import triton_encode

        return triton_encode.encode(codec, x, check=check)
    return codec.encode(x)


def _make_scanner(codec: TurboQuantCodec, backend: str) -> Scanner:
    if backend.startswith("triton"):
        from tqindex.kernels import triton_scan  # imported here: `import tqindex` never needs triton

        config = triton_scan.FMA if backend.startswith("triton-fma") else triton_scan.MMA
        return triton_scan.TritonScanner(codec, config, torch.float32 if backend.endswith("-fp32") else torch.float16)
    if backend == "lut":
        return lut.LutScanner(codec)
    if backend == "fastscan":
        return fastscan.FastScanner(codec)
    return GemmScanner(codec)


__all__ = [
    "BACKENDS", "HALF_QUERY_NORM", "LUT_MAX_QUERY_BITS", "TRITON_FMA_MAX_QUERIES", "Chunk", "QueryChunk", "Scanner", "candidate_count", "encode",
    "get_scanner", "scan_groups_topk", "scan_topk", "search_resident",
]  # fmt: skip
