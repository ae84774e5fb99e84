"""Integer helpers for Triton launches on the host: ``triton.cdiv`` and ``triton.next_power_of_2``
without their ``constexpr_function`` wrapper, which costs ~1.6 us a call from Python (Triton
3.6-3.9, measured on the project's CPU); a KV decode call made 17 of them per layer."""

from __future__ import annotations


def cdiv(x: int, y: int) -> int:
    """``ceil(x / y)`` for ints, as ``triton.cdiv``."""
    return -(-x // y)


def next_power_of_2(n: int) -> int:
    """The least power of two ``>= n`` (0 for 0), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


__all__ = ["cdiv", "next_power_of_2"]
