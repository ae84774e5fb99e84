"""Scan backends, chosen by one dispatch function from the backend, the device and the batch size."""

from __future__ import annotations

import importlib.util
import weakref

import torch

from tqindex.codec import TurboQuantCodec
from tqindex.kernels import lut
from tqindex.kernels.gemm import GemmScanner
from tqindex.kernels.scan import Chunk, QueryChunk, Scanner, candidate_count, scan_groups_topk, scan_topk

BACKENDS = ("auto", "torch", "lut", "triton")

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
    codec: TurboQuantCodec, backend: str = "auto", device: torch.device | str = "cpu", queries: int = 1
) -> Scanner:
    """The scanner for ``backend`` on ``device`` for a batch of ``queries``.

    "torch": decode + GEMM in torch (any device). "lut": per-byte look-up tables (CPU, numba;
    layouts of 1, 2, 4 or 8 index bits). "triton": the fused Triton kernel (CUDA tensors, or CPU
    tensors under ``TRITON_INTERPRET=1``). "auto": triton on a CUDA device where triton is
    installed; on the CPU, lut while ``queries * bits <= LUT_MAX_QUERY_BITS`` where the layout
    allows, else torch.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = torch.device(device).type == "cuda"
    if backend == "auto":
        if on_cuda:
            backend = "triton" if _triton_available() else "torch"
        else:
            few = queries * float(codec.config.bits) <= LUT_MAX_QUERY_BITS
            backend = "lut" if few and lut.supports(codec.layout) else "torch"
    if backend == "lut" and on_cuda:
        raise ValueError("backend='lut' runs on the CPU only")
    made = _SCANNERS.setdefault(codec, {})
    if backend not in made:
        made[backend] = _make_scanner(codec, backend)
    return made[backend]


def _make_scanner(codec: TurboQuantCodec, backend: str) -> Scanner:
    if backend == "triton":
        from tqindex.kernels.triton_scan import TritonScanner  # imported here: `import tqindex` never needs triton

        return TritonScanner(codec)
    if backend == "lut":
        return lut.LutScanner(codec)
    return GemmScanner(codec)


__all__ = [
    "BACKENDS",
    "LUT_MAX_QUERY_BITS",
    "Chunk",
    "QueryChunk",
    "Scanner",
    "candidate_count",
    "get_scanner",
    "scan_groups_topk",
    "scan_topk",
]
