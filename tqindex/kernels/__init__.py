"""Scan backends: one dispatch function picks the scanner for a codec and a device."""

from __future__ import annotations

import torch

from tqindex.codec import TurboQuantCodec
from tqindex.kernels.cpu import CpuScanner
from tqindex.kernels.scan import Chunk, Scanner, candidate_count, scan_topk

BACKENDS = ("auto", "torch")


def get_scanner(codec: TurboQuantCodec, backend: str = "auto", device: torch.device | str = "cpu") -> Scanner:
    """The scanner for ``backend`` ("auto" or "torch": decode + GEMM in torch)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return CpuScanner(codec)


__all__ = ["BACKENDS", "Chunk", "Scanner", "candidate_count", "get_scanner", "scan_topk"]
