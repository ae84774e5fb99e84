"""Per-vector factors of the KV cache in one byte each: a logarithmic code.

At head_dim 32 a float16 scale costs half a bit per coordinate; one byte holds it to within
±2.2% (1/16 of an octave) and gives the other quarter bit to the codes. Byte 0 is 0.0; byte
``q`` in 1..255 is ``2 ** (low + (q - 1) / 16)``: 15.9 octaves, placed per layer and role by the
first factors it sees (8 octaves either side of their median). Factors outside are clamped to
the range's ends.
"""

from __future__ import annotations


import torch

STEPS_PER_OCTAVE = 16
_LEVELS = 255  # bytes 1..255


class LogByteFactors:
    """Encode non-negative float factors as uint8 log codes, and back; ``low`` is log2 of byte 1."""

    def __init__(self, low: float):
        self.low = float(low)

    @classmethod
    def fit(cls, factors: torch.Tensor) -> "LogByteFactors":
        """A range centred on the median log2 of the positive ``factors`` (any shape)."""
        positive = factors[factors > 0].float()
        middle = float(torch.log2(positive).median()) if positive.numel() else 0.0
        return cls(middle - (_LEVELS - 1) / (2 * STEPS_PER_OCTAVE))

    def encode(self, factors: torch.Tensor) -> torch.Tensor:
        """float factors ``(...)`` >= 0 -> uint8 ``(...)``."""
        steps = (torch.log2(factors.float().clamp_min(torch.finfo(torch.float32).tiny)) - self.low) * STEPS_PER_OCTAVE
        codes = steps.round().clamp(0, _LEVELS - 1) + 1
        return torch.where(factors > 0, codes, torch.zeros_like(codes)).to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """uint8 ``(...)`` -> float32 ``(...)``."""
        values = torch.exp2(self.low + (codes.float() - 1) / STEPS_PER_OCTAVE)
        return torch.where(codes > 0, values, torch.zeros_like(values))
