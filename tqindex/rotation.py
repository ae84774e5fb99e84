"""Random orthogonal rotations made from a seed: dense (Haar) and randomized Hadamard.

A rotation maps ``(n, dim)`` float32 rows to ``(n, rotated_dim)`` rows and back. The
randomized Hadamard transform pads ``dim`` to a power of two, so its ``rotated_dim`` may
exceed ``dim``; the dense rotation keeps ``rotated_dim == dim``.
Each rotation's fixed state is one plain array, so it reloads bit-identically.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

ROTATIONS = ("dense", "hadamard")
# a seed stream of its own ("ROT"), so data drawn from default_rng(seed) is independent of it
_SEED_STREAM = 0x524F54


def _matrix_on(matrix: torch.Tensor, copies: dict[torch.device, torch.Tensor], device: torch.device) -> torch.Tensor:
    """``matrix`` on ``device``, copied there once and kept in ``copies``."""
    if matrix.device == device:
        return matrix
    if device not in copies:
        copies[device] = matrix.to(device)
    return copies[device]


class Rotation(Protocol):
    kind: str
    dim: int
    rotated_dim: int

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...
    def inverse(self, y: torch.Tensor) -> torch.Tensor: ...
    def state(self) -> np.ndarray: ...


class DenseRotation:
    """``y = x P^T`` with ``P`` Haar-distributed: QR of a Gaussian matrix, signs of R folded in."""

    kind = "dense"

    def __init__(self, matrix: np.ndarray):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"dense rotation needs a square matrix, got shape {matrix.shape}")
        self.dim = self.rotated_dim = matrix.shape[0]
        self._matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        self._transposed = torch.from_numpy(self._matrix).t().contiguous()
        self._copies: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_seed(cls, dim: int, seed: int) -> "DenseRotation":
        gaussian = np.random.default_rng([seed, _SEED_STREAM]).standard_normal((dim, dim))
        q, r = np.linalg.qr(gaussian)
        return cls(q * np.sign(np.diag(r)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, dim)`` float32 -> ``(n, dim)`` float32."""
        return x @ _matrix_on(self._transposed, self._copies, x.device)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``(n, dim)`` float32 -> ``(n, dim)`` float32."""
        return y @ _matrix_on(self._transposed, self._copies, y.device).t()

    def state(self) -> np.ndarray:
        """The rotation matrix ``P``, float32 ``(dim, dim)``."""
        return self._matrix


def _hadamard_matrix(size: int) -> np.ndarray:
    """Sylvester Hadamard matrix, float64 ``(size, size)``, entries +-1."""
    h = np.ones((1, 1))
    while h.shape[0] < size:
        h = np.block([[h, h], [h, -h]])
    return h


class HadamardRotation:
    """``y = H diag(signs) [x, 0]`` with ``H`` the normalised Walsh-Hadamard matrix.

    ``dim`` is zero-padded to the next power of two. The transform is applied as one
    matrix product with the materialised ``H diag(signs)``: on CPUs a BLAS product beats a
    ``log2(n)``-pass butterfly in torch at the sizes used here (see docs/benchmarks.md).
    """

    kind = "hadamard"

    def __init__(self, dim: int, signs: np.ndarray):
        rotated_dim = 1 << max(0, int(dim - 1).bit_length())
        if signs.shape != (rotated_dim,) or not np.all(np.abs(signs) == 1):
            raise ValueError(f"hadamard rotation needs {rotated_dim} signs of +-1, got shape {signs.shape}")
        self.dim, self.rotated_dim = dim, rotated_dim
        self._signs = np.ascontiguousarray(signs, dtype=np.int8)
        matrix = _hadamard_matrix(rotated_dim) * self._signs[None, :] / np.sqrt(rotated_dim)
        # forward keeps only the first `dim` input columns: the padding is zero
        self._forward = torch.from_numpy(np.ascontiguousarray(matrix[:, :dim].T, dtype=np.float32))
        self._copies: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_seed(cls, dim: int, seed: int) -> "HadamardRotation":
        rotated_dim = 1 << max(0, int(dim - 1).bit_length())
        signs = np.random.default_rng([seed, _SEED_STREAM]).integers(0, 2, rotated_dim) * 2 - 1
        return cls(dim, signs.astype(np.int8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, dim)`` float32 -> ``(n, rotated_dim)`` float32."""
        return x @ _matrix_on(self._forward, self._copies, x.device)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``(n, rotated_dim)`` float32 -> ``(n, dim)`` float32 (the padding is dropped)."""
        return y @ _matrix_on(self._forward, self._copies, y.device).t()

    def state(self) -> np.ndarray:
        """The random signs, int8 ``(rotated_dim,)``."""
        return self._signs


def make_rotation(kind: str, dim: int, seed: int) -> Rotation:
    """A rotation of ``kind`` ("dense" or "hadamard") for ``dim``, made from ``seed``."""
    if kind == "dense":
        return DenseRotation.from_seed(dim, seed)
    if kind == "hadamard":
        return HadamardRotation.from_seed(dim, seed)
    raise ValueError(f"rotation must be one of {ROTATIONS}, got {kind!r}")


def rotation_from_state(kind: str, dim: int, state: np.ndarray) -> Rotation:
    """Rebuild a rotation from ``state()`` output, bit-identically."""
    if kind == "dense":
        if state.shape != (dim, dim):
            raise ValueError(f"dense rotation state must have shape {(dim, dim)}, got {state.shape}")
        return DenseRotation(state)
    if kind == "hadamard":
        return HadamardRotation(dim, state)
    raise ValueError(f"rotation must be one of {ROTATIONS}, got {kind!r}")
