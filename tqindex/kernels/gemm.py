"""The batched scan: decode a chunk of codes to bf16/fp16/fp32 and score all queries with one GEMM.

Runs on any torch device; on the CPU it is the path for many queries at once.
"""

from __future__ import annotations

import torch

from tqindex.codec import TurboQuantCodec
from tqindex.kernels.decode import ChunkDecoder


def fast_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16 / AMX), so bf16 GEMMs beat fp32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class GemmScanner:
    """Scores a chunk of packed rows against a batch of rotated queries.

    ``dtype`` is the GEMM precision: bf16 runs ~3.5x faster than fp32 here and only picks
    candidates; the final ranking is rescored exactly in fp32 (``kernels.scan``).
    """

    def __init__(self, codec: TurboQuantCodec, dtype: torch.dtype | None = None):
        self.dtype = dtype or (torch.bfloat16 if fast_bf16() else torch.float32)
        self.decode = ChunkDecoder(codec, self.dtype)

    def prepare(self, rotated_queries: torch.Tensor) -> torch.Tensor:
        """Rotated float32 queries ``(m, W)`` -> the GEMM operand ``(m, W)``."""
        return rotated_queries.to(self.dtype)

    def chunk_topk(
        self,
        queries: torch.Tensor,
        packed: torch.Tensor,
        factors: torch.Tensor,
        valid: torch.Tensor | None,
        k: int,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Best ``k`` rows of the chunk per query by score + ``bias`` (float32 ``(n,)`` or None):
        scores float32 ``(m, k)``, chunk-local rows int64 ``(m, k)``."""
        scores = (queries @ self.decode(packed, factors).t()).to(torch.float32)
        if bias is not None:
            scores += bias
        if valid is not None:
            scores.masked_fill_(~valid, float("-inf"))
        k = min(k, scores.shape[1])
        return scores.topk(k, dim=1)
