"""Per-vector factors of the KV cache in one byte each: a logarithmic code.

At head_dim 32 a float16 scale costs half a bit per coordinate; one byte holds it to within
±2.2% (1/16 of an octave) and gives the other quarter bit to the codes. Byte 0 is 0.0; byte
``q`` in 1..255 is ``2 ** (low + (q - 1) / 16)``: 15.9 octaves, placed per layer and role by the
first factors it sees (8 octaves either side of their median, moved to take in their smallest
and largest where 15.9 octaves can). `encode` clamps factors outside the range to its ends, so
callers check `fits` first: the cache keeps a layer's factors in float32 once any do not fit.
"""

from __future__ import annotations

import math

import torch

STEPS_PER_OCTAVE = 16
_LEVELS = 255  # bytes 1..255
_WIDTH = (_LEVELS - 1) / STEPS_PER_OCTAVE  # octaves from byte 1 to byte 255


class LogByteFactors:
    """Encode non-negative float factors as uint8 log codes, and back; ``low`` is log2 of byte 1."""

    def __init__(self, low: float):
        self.low = float(low)

    @classmethod
    def fit(cls, factors: torch.Tensor) -> "LogByteFactors":
        """A range centred on the median log2 of the positive ``factors`` (any shape)."""
        return cls.fitted(*log_range(factors).tolist())

    @classmethod
    def fitted(cls, smallest: float, largest: float, median: float) -> "LogByteFactors":
        """`fit` from `log_range`'s three numbers."""
        if math.isnan(median):  # no positive factor
            return cls(-_WIDTH / 2)
        low = min(median - _WIDTH / 2, smallest)  # take in the smallest,
        return cls(max(low, largest - _WIDTH))  # and the largest (if the span allows both)

    def fits(self, factors: torch.Tensor) -> bool:
        """Whether `encode` holds every factor of ``factors`` (any shape) within half a step: none clamped."""
        smallest, largest, _ = log_range(factors, median=False).tolist()
        return self.holds(smallest, largest)

    def holds(self, smallest: float, largest: float) -> bool:
        """`fits` for positive factors whose log2 lie in ``[smallest, largest]`` (`log_range`; none if empty)."""
        if smallest > largest:
            return True
        return (smallest - self.low) * STEPS_PER_OCTAVE >= -0.5 and (largest - self.low) * STEPS_PER_OCTAVE <= _LEVELS - 0.5

    def encode(self, factors: torch.Tensor) -> torch.Tensor:
        """float factors ``(...)`` >= 0 -> uint8 ``(...)``."""
        steps = (torch.log2(factors.float().clamp_min(torch.finfo(torch.float32).tiny)) - self.low) * STEPS_PER_OCTAVE
        codes = steps.round().clamp(0, _LEVELS - 1) + 1
        return torch.where(factors > 0, codes, torch.zeros_like(codes)).to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """uint8 ``(...)`` -> float32 ``(...)``."""
        values = torch.exp2(self.low + (codes.float() - 1) / STEPS_PER_OCTAVE)
        return torch.where(codes > 0, values, torch.zeros_like(values))


def log_range(factors: torch.Tensor, *, median: bool = True) -> torch.Tensor:
    """float64 ``(3,)`` on ``factors``' device, computed there (no transfer either way): the smallest, the
    largest and (with ``median``, else NaN) the median log2 of the positive ``factors`` (any
    shape); ``(inf, -inf, nan)`` where none is positive."""
    positive = factors.reshape(-1) > 0
    logs = torch.log2(torch.where(positive, factors.reshape(-1).float(), 1.0))
    if not logs.numel():
        return torch.tensor([math.inf, -math.inf, math.nan], dtype=torch.float64, device=factors.device)
    middle = torch.nanmedian(torch.where(positive, logs, math.nan)) if median else torch.full((), math.nan, device=logs.device)
    return torch.stack([torch.where(positive, logs, math.inf).min(), torch.where(positive, logs, -math.inf).max(), middle]).double()
