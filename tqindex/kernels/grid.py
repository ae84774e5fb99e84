"""Host-side helpers of every Triton launch here.

``cdiv`` and ``next_power_of_2``: ``triton.cdiv`` and ``triton.next_power_of_2`` without their
``constexpr_function`` wrapper, which costs ~1.6 us a call from Python (Triton 3.6-3.9, measured
on the project's CPU); a KV decode call made 17 of them per layer. ``on_device``: the device a
launch runs on.
"""

from __future__ import annotations

import contextlib

import torch


def cdiv(x: int, y: int) -> int:
    """``ceil(x / y)`` for ints, as ``triton.cdiv``."""
    return -(-x // y)


def next_power_of_2(n: int) -> int:
    """The least power of two ``>= n`` (0 for 0), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The context a launch over tensors on ``device`` runs in: ``device`` made the current CUDA device.

    Triton launches on the current CUDA device and its current stream, whatever device the tensors
    are on: over ``cuda:1`` tensors while ``cuda:0`` is current, it refuses the pointers ("Pointer
    argument cannot be accessed from Triton"), or, with peer access, runs on GPU 0 unordered with
    the work queued on ``cuda:1``. A no-op off CUDA (CPU tensors under the interpreter).
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


__all__ = ["cdiv", "next_power_of_2", "on_device"]
