"""TurboQuantCodec: rotate, quantize each coordinate with a Lloyd-Max codebook, keep a scale.

One codec serves the index and the KV cache. For a vector ``x`` with norm ``n`` and
rotated unit vector ``y = P x / n``:

* ``variant="mse"``: ``b``-bit indices ``idx`` of the nearest levels ``c[idx]``, and one
  per-vector factor, the scale ``s``: ``<q, x> ~ s * <P q, c[idx]>``. ``scale="norm"`` stores
  ``s = n`` (the paper; shrinks inner products); ``scale="unbiased"`` stores the
  length-corrected ``s = n / <y, c[idx]>`` (EDEN/DRIVE), which makes the estimate unbiased
  and a vector's estimate of itself exact.
* ``variant="prod"``: ``(b-1)``-bit indices, plus the signs ``sign(S r)`` of the residual
  ``r = y - c[idx]`` under a Gaussian ``S``, and two factors ``(n, n ||r|| sqrt(pi/2) / D)``:
  ``<q, x> ~ n <P q, c[idx]> + n ||r|| sqrt(pi/2)/D * <S P q, sign(S r)>`` (unbiased, QJL).

Shapes: ``d`` = ``dim`` (input), ``D`` = ``rotated_dim`` (``d``, or the next power of two
for the Hadamard rotation). See DESIGN.md section 1 and ``packing.py`` for the byte layout.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from tqindex._arrays import as_float_rows, is_torch, like, power_of_two_scaled, times_power_of_two
from tqindex.codebook import lloyd_max_codebook
from tqindex.packing import BitLayout
from tqindex.quantize import SEARCH_TIE, quantize_rows, quantize_rows_search, search_grid
from tqindex.rotation import ROTATIONS, make_rotation, rotation_from_state
from tqindex.trellis import SCALES as TRELLIS_SCALES
from tqindex.trellis import STARTS as TRELLIS_STARTS
from tqindex.trellis import WINDOW_BITS, TrellisDecoder, trellis_encode, trellis_table

VARIANTS = ("mse", "prod")
SCALES = ("norm", "unbiased")
QUANTIZERS = ("scalar", "trellis")
_ENCODE_CHUNK = 1 << 13  # rows per step: keeps the temporaries in cache
_QJL_SEED_STREAM = 0x514A4C  # "QJL": independent of the rotation's stream and of default_rng(seed)


@dataclass(frozen=True)
class CodecConfig:
    """Everything that defines a codec; with the seed, it rebuilds the codec exactly."""

    dim: int
    bits: float
    variant: str
    rotation: str
    scale: str
    seed: int
    search: bool = False  # code search (quantize.py); configs saved before it existed load without it
    quantizer: str = "scalar"  # "trellis": trellis.py; configs saved before it existed are scalar

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, (int, np.integer)) or self.dim < 2:
            raise ValueError(f"dim must be an integer >= 2, got {self.dim!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, float, np.integer, np.floating)):
            raise TypeError(f"bits must be a number, got {type(self.bits).__name__}")
        if not 1 <= self.bits <= 8 or float(self.bits) * 8 != round(float(self.bits) * 8):
            raise ValueError(f"bits must be in [1, 8] in steps of 1/8, got {self.bits!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.scale!r}")
        if self.variant == "prod" and self.scale != "norm":
            raise ValueError("variant='prod' is unbiased by construction and takes scale='norm' only")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.search, (bool, np.bool_)):
            raise TypeError(f"search must be a bool, got {self.search!r}")
        if self.search and self.variant == "mse" and self.scale != "unbiased":
            raise ValueError("search=True picks codes by their direction: variant='mse' needs scale='unbiased' with it")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.quantizer == "trellis":
            if self.variant != "mse" or self.scale != "unbiased":
                raise ValueError("quantizer='trellis' takes variant='mse' and scale='unbiased' only")
            if self.search:
                raise ValueError("search=True is the scalar quantizer's code search; trellis codes search their own scale")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "dim": int(self.dim), "bits": float(self.bits), "seed": int(self.seed), "search": bool(self.search)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CodecConfig":
        return cls(**values)


@dataclass(frozen=True)
class Codes:
    """Encoded vectors: ``packed`` uint8 ``(n, code_bytes)`` and ``factors`` float32 ``(n, F)``.

    ``F`` is 1 for ``mse`` (the scale) and 2 for ``prod`` (scale, QJL coefficient). Both are
    numpy arrays or both torch tensors, matching what was encoded.
    """

    packed: Any
    factors: Any

    def __len__(self) -> int:
        return int(self.packed.shape[0])

    def __getitem__(self, rows: Any) -> "Codes":
        return Codes(self.packed[rows], self.factors[rows])

    @property
    def nbytes(self) -> int:
        return int(self.packed.nbytes + self.factors.nbytes)


def _resolve_rotation(rotation: str, dim: int) -> str:
    """"auto": Hadamard where it costs no padding (power-of-two dims), else dense."""
    if rotation == "auto":
        return "hadamard" if dim & (dim - 1) == 0 else "dense"
    return rotation


def _resolve_scale(scale: str, variant: str) -> str:
    """"auto": the length-corrected scale for mse (it ranks better: docs/benchmarks.md), norm for prod."""
    if scale == "auto":
        return "unbiased" if variant == "mse" else "norm"
    return scale


def _resolve_search(search: bool | str) -> bool | str:
    """"auto": off (no recall gain on real embeddings, slower encode: docs/benchmarks.md, "Code search");
    otherwise as given (``CodecConfig`` validates it)."""
    if isinstance(search, str) and search == "auto":
        return False
    return search


class TurboQuantCodec:
    """Encode float vectors to TurboQuant codes, decode them, and estimate inner products.

    Args:
        dim: vector dimension ``d`` (>= 2).
        bits: bits per coordinate, 1..8, in steps of 1/8 (2.5 gives half the coordinates 3 bits).
        variant: "mse" (all bits to the Lloyd-Max index) or "prod" (one bit to QJL signs).
        rotation: "hadamard", "dense", or "auto" (Hadamard for power-of-two ``d``, else dense).
        scale: "unbiased", "norm", or "auto" ("unbiased" for mse, "norm" for prod).
        seed: seeds the rotation and the QJL matrix.
        search: code search: of the codes ``nearest(t y)`` for scalings ``t`` in [0.6, 1.5], keep
            the one whose levels point closest to ``y`` (largest cosine); same format and decoder,
            lower error, slower encode. ``True``, ``False`` or "auto" (off); for mse it needs
            scale "unbiased"; for prod the stored ``c`` is rescaled by least squares.
        quantizer: "scalar" (Lloyd-Max levels per coordinate) or "trellis" (``trellis.py``: the
            same bits read as a bitshift trellis path, found by Viterbi; 36-50% lower error at
            3.25-3.375 bits, ~1000x the encode work, encoded on the CPU; mse with scale "unbiased"
            only, without ``search``).
    """

    def __init__(
        self,
        dim: int,
        bits: float = 4,
        *,
        variant: str = "mse",
        rotation: str = "auto",
        scale: str = "auto",
        seed: int = 0,
        search: bool | str = "auto",
        quantizer: str = "scalar",
    ):
        if isinstance(dim, (int, np.integer)) and not isinstance(dim, bool):
            rotation = _resolve_rotation(rotation, int(dim))
        scale = _resolve_scale(scale, variant)
        config = CodecConfig(dim, bits, variant, rotation, scale, seed, _resolve_search(search), quantizer)
        self._build(config, state=None)

    @classmethod
    def from_config(cls, config: CodecConfig, state: dict[str, np.ndarray] | None = None) -> "TurboQuantCodec":
        """A codec for ``config``; with ``state`` (from ``state()``), bit-identical to the one saved."""
        codec = cls.__new__(cls)
        codec._build(config, state)
        return codec

    def _build(self, config: CodecConfig, state: dict[str, np.ndarray] | None) -> None:
        self.config = config
        dim, seed = int(config.dim), int(config.seed)
        if state is not None:  # own writable copies: the caller's may be read-only or change later
            state = {name: np.array(array) for name, array in state.items()}
        if state is None:
            self.rotation = make_rotation(config.rotation, dim, seed)
        else:
            self.rotation = rotation_from_state(config.rotation, dim, np.asarray(state["rotation"]))
        rotated_dim = self.rotation.rotated_dim
        index_bits = float(config.bits) - (1 if config.variant == "prod" else 0)
        base_bits = int(math.floor(index_bits))
        extra_coords = int(round((index_bits - base_bits) * rotated_dim))
        self.layout = BitLayout(rotated_dim, base_bits, extra_coords, signs=config.variant == "prod")

        if state is None:
            levels_lo = lloyd_max_codebook(rotated_dim, base_bits).astype(np.float32)
            levels_hi = lloyd_max_codebook(rotated_dim, base_bits + 1).astype(np.float32) if extra_coords else np.zeros(0, np.float32)
            levels = np.concatenate([levels_lo, levels_hi])
        else:
            levels = np.asarray(state["levels"], dtype=np.float32)
        n_lo = 1 << base_bits
        expected_levels = n_lo + ((2 * n_lo) if extra_coords else 0)
        if levels.shape != (expected_levels,):
            raise ValueError(f"codec state has {levels.shape} levels, expected ({expected_levels},)")
        self._levels_np = levels
        #: all levels, float32 ``(L,)``: the ``2^b`` base levels, then the ``2^(b+1)`` levels of extra-bit coordinates
        self.levels = torch.from_numpy(levels)
        #: per-coordinate offset into ``levels``, int64 ``(D,)``
        self.level_offsets = torch.zeros(rotated_dim, dtype=torch.int64)
        self.level_offsets[:extra_coords] = n_lo
        levels_lo, levels_hi = levels[:n_lo], levels[n_lo:]
        self._bounds_lo = torch.from_numpy(0.5 * (levels_lo[1:] + levels_lo[:-1]))
        self._bounds_hi = torch.from_numpy(0.5 * (levels_hi[1:] + levels_hi[:-1]))
        #: code search's scalings ``t``, float32 ``(T,)``, and the index of ``t = 1``
        self._search_grid, self._search_start = search_grid()
        self._search_grid_t = torch.from_numpy(self._search_grid)
        self.trellis: TrellisDecoder | None = None
        if config.quantizer == "trellis":
            table = trellis_table(rotated_dim, seed) if state is None else np.asarray(state["table"], dtype=np.float32)
            if table.shape != (1 << WINDOW_BITS,):
                raise ValueError(f"codec state has a trellis table of shape {table.shape}, expected ({1 << WINDOW_BITS},)")
            bit_counts = np.full(rotated_dim, base_bits, np.int64)
            bit_counts[:extra_coords] += 1
            #: reads the codes as trellis windows (``trellis.py``)
            self.trellis = TrellisDecoder(bit_counts, table)

        self.qjl: torch.Tensor | None = None
        if config.variant == "prod":
            if state is None:
                rng = np.random.default_rng([seed, _QJL_SEED_STREAM])
                qjl = rng.standard_normal((rotated_dim, rotated_dim)).astype(np.float32)
            else:
                qjl = np.asarray(state["qjl"], dtype=np.float32)
            if qjl.shape != (rotated_dim, rotated_dim):
                raise ValueError(f"codec state QJL matrix has shape {qjl.shape}, expected {(rotated_dim, rotated_dim)}")
            #: the QJL matrix ``S``, float32 ``(D, D)``
            self.qjl = torch.from_numpy(qjl)

    # ---- sizes -------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.config.dim)

    @property
    def rotated_dim(self) -> int:
        return self.rotation.rotated_dim

    @property
    def code_bytes(self) -> int:
        """Bytes of packed indices (and signs) per vector."""
        return self.layout.code_bytes

    @property
    def n_factors(self) -> int:
        """float32 factors stored per vector: 1 for mse, 2 for prod."""
        return 2 if self.config.variant == "prod" else 1

    @property
    def bytes_per_vector(self) -> int:
        """Stored bytes per vector, factors included."""
        return self.code_bytes + 4 * self.n_factors

    def state(self) -> dict[str, np.ndarray]:
        """The codec's fixed arrays (rotation, levels, QJL matrix), for ``from_config``."""
        state = {"rotation": self.rotation.state(), "levels": self._levels_np}
        if self.qjl is not None:
            state["qjl"] = self.qjl.numpy()
        if self.trellis is not None:
            state["table"] = self.trellis.table.numpy()
        return state

    # ---- encode / decode ---------------------------------------------------------------
    def encode(self, x: Any) -> Codes:
        """Encode ``(n, d)`` (or ``(d,)``) float vectors into ``Codes`` (numpy in, numpy out)."""
        rows = as_float_rows(x, self.dim, "x")
        chunks = [self._encode_rows(rows[i : i + _ENCODE_CHUNK]) for i in range(0, rows.shape[0], _ENCODE_CHUNK)]
        if chunks:
            packed, factors = (torch.cat(parts) for parts in zip(*chunks))
        else:
            packed, factors = self._encode_rows(rows)
        finite = torch.isfinite(factors).all(dim=1)
        if not bool(finite.all()):
            row = int(torch.nonzero(~finite)[0, 0])
            raise ValueError(f"x row {row}: its norm overflows float32 (> {torch.finfo(torch.float32).max:.3g}): scale the vectors down")
        return Codes(like(packed, is_torch(x)), like(factors, is_torch(x)))

    def _encode_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, exponents = power_of_two_scaled(rows)  # exact; keeps the norm finite and nonzero near the ends of float32
        norms = torch.linalg.vector_norm(rows, dim=1)
        prod = self.config.variant == "prod"
        indices, alignment, residual, energy = self._quantize(self.rotation.forward(rows), norms, keep_residual=prod)
        signs = self.qjl_signs(residual) if prod else None
        return self.layout.pack(indices, signs), self.factors(times_power_of_two(norms, exponents), alignment, residual, energy)

    def qjl_signs(self, residual: torch.Tensor) -> torch.Tensor:
        """QJL signs of residuals ``(n, D)`` (prod): bool ``(n, D)``, True where ``S r >= 0``."""
        return residual @ self._on(self.qjl, residual.device).t() >= 0

    def factors(
        self, norms: torch.Tensor, alignment: torch.Tensor, residual: torch.Tensor | None, energy: torch.Tensor | None
    ) -> torch.Tensor:
        """The stored per-vector factors, float32 ``(n, F)``, from the pieces of ``_quantize``.

        ``norms`` ``(n,)``, ``alignment`` ``<u, c[idx]>`` ``(n,)``, the residual ``(n, D)`` (prod), and
        ``energy`` ``|c[idx]|^2`` ``(n,)`` (searched codes; None otherwise). Shared with the fused GPU
        encoder (``kernels.triton_encode``), which computes the same pieces in one kernel.
        """
        if self.config.variant != "prod":
            if self.config.scale == "unbiased":
                scale = torch.where(norms > 0, norms / alignment.clamp_min(1e-30), torch.zeros_like(norms))
            else:
                scale = norms
            return scale[:, None]
        coefficient = norms * torch.linalg.vector_norm(residual, dim=1) * math.sqrt(math.pi / 2) / self.rotated_dim
        if energy is not None:  # searched codes: the levels scaled by least squares, u ~ a c + residual
            norms = norms * alignment / energy.clamp_min(1e-30)
        return torch.stack([norms, coefficient], dim=1)

    def _quantize(
        self, rotated: torch.Tensor, norms: torch.Tensor, keep_residual: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Rotated rows ``(n, D)`` and their norms -> indices uint8 ``(n, D)``, ``<u, c[idx]>`` ``(n,)``,
        residual ``(n, D)`` (or None), energy ``|c[idx]|^2`` ``(n,)`` (None without search).

        The residual is ``u - c[idx]``, or with search ``u - a c[idx]``, ``a = <u, c> / |c|^2``.
        On the CPU one fused numba pass (``quantize.py``); on other devices the same in torch ops.
        """
        inverse_norms = 1 / norms.clamp_min(torch.finfo(torch.float32).tiny)
        extra = self.layout.extra_coords
        if self.trellis is not None:
            return self._quantize_trellis(rotated, inverse_norms)
        if rotated.device.type == "cpu":
            n_lo = 1 << self.layout.base_bits
            indices = torch.empty(rotated.shape, dtype=torch.uint8)
            alignment = torch.empty(rotated.shape[0], dtype=torch.float32)
            residual = torch.empty(rotated.shape if keep_residual else (0, rotated.shape[1]), dtype=torch.float32)
            if self.config.search:
                energy = torch.empty(rotated.shape[0], dtype=torch.float32)
                quantize_rows_search(
                    rotated.contiguous().numpy(), inverse_norms.numpy(), self._bounds_lo.numpy(), self._levels_np[:n_lo],
                    self._bounds_hi.numpy(), self._levels_np[n_lo:], extra, self._search_grid, self._search_start,
                    indices.numpy(), alignment.numpy(), energy.numpy(), residual.numpy(),
                )  # fmt: skip
                return indices, alignment, residual if keep_residual else None, energy
            quantize_rows(
                rotated.contiguous().numpy(), inverse_norms.numpy(), self._bounds_lo.numpy(), self._levels_np[:n_lo],
                self._bounds_hi.numpy(), self._levels_np[n_lo:], extra, indices.numpy(), alignment.numpy(), residual.numpy(),
            )  # fmt: skip
            return indices, alignment, residual if keep_residual else None, None
        return self._quantize_torch(rotated, inverse_norms, keep_residual)

    def _quantize_trellis(self, rotated: torch.Tensor, inverse_norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, torch.Tensor]:
        """``_quantize`` for trellis codes: numba on the CPU (rows from other devices go there and back)."""
        unit = (rotated * inverse_norms[:, None]).to("cpu", torch.float32).contiguous()
        indices = torch.empty(unit.shape, dtype=torch.uint8)
        alignment, energy = torch.empty(unit.shape[0]), torch.empty(unit.shape[0])
        trellis = self.trellis
        trellis_encode(
            unit.numpy(), trellis.ks, trellis.visit, trellis.table.numpy(), trellis.window_bits, TRELLIS_SCALES, TRELLIS_STARTS,
            indices.numpy(), alignment.numpy(), energy.numpy(),
        )  # fmt: skip
        device = rotated.device
        return indices.to(device), alignment.to(device), None, energy.to(device)

    def _quantize_torch(
        self, rotated: torch.Tensor, inverse_norms: torch.Tensor, keep_residual: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``_quantize`` in torch ops, for any device (the GPU's encode path)."""
        unit = rotated * inverse_norms[:, None]
        if not self.config.search:
            indices = self._nearest_torch(unit)
            levels = self._levels_of(indices)
            return indices, (unit * levels).sum(dim=1), unit - levels if keep_residual else None, None
        grid = self._on(self._search_grid_t, unit.device)
        # the cosine of nearest(t u) for every t of the grid, a group of t at a time: (n, T) in float64
        group = max(1, (1 << 24) // max(1, unit.numel()))
        unit64 = unit.to(torch.float64)
        keys = []
        for first in range(0, grid.shape[0], group):
            scaled = grid[first : first + group, None, None] * unit  # (G, n, D): the float32 products numba makes
            levels = self._levels_of(self._nearest_torch(scaled.reshape(-1, unit.shape[1])), torch.float64).view(scaled.shape)
            dot = (levels * unit64).sum(dim=2)
            keys.append((dot * dot.abs() / (levels * levels).sum(dim=2).clamp_min(1e-300)).t())
        keys = torch.cat(keys, dim=1)
        best_key = keys.max(dim=1).values
        tied = keys >= (best_key - SEARCH_TIE * best_key.abs())[:, None]  # as numba's _tied_best: the plain codes
        best = torch.where(tied[:, self._search_start], self._search_start, tied.to(torch.uint8).argmax(dim=1))  # if tied, else the first
        indices = self._nearest_torch(grid[best][:, None] * unit)
        levels = self._levels_of(indices)
        alignment, energy = (unit * levels).sum(dim=1), (levels * levels).sum(dim=1)
        residual = unit - (alignment / energy.clamp_min(1e-30))[:, None] * levels if keep_residual else None
        return indices, alignment, residual, energy

    def _nearest_torch(self, unit: torch.Tensor) -> torch.Tensor:
        """Indices of the nearest levels of rows ``(n, D)`` in rotated space: uint8 ``(n, D)``."""
        extra = self.layout.extra_coords
        indices = torch.empty(unit.shape, dtype=torch.uint8, device=unit.device)
        indices[:, extra:] = torch.bucketize(unit[:, extra:].contiguous(), self._on(self._bounds_lo, unit.device)).to(torch.uint8)
        if extra:
            indices[:, :extra] = torch.bucketize(unit[:, :extra].contiguous(), self._on(self._bounds_hi, unit.device)).to(torch.uint8)
        return indices

    def _levels_of(self, indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Level values of indices: uint8 ``(n, D)`` -> ``dtype`` ``(n, D)``."""
        if self.trellis is not None:
            return self.trellis.levels(indices, dtype)
        table = self._on(self.levels, indices.device).to(dtype)[:, None]
        offsets = self._on(self.level_offsets, indices.device).to(torch.int32)
        return torch.nn.functional.embedding(indices.to(torch.int32) + offsets, table).squeeze(-1)

    def dequantize(self, packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Packed rows ``(..., C)`` -> unscaled levels ``c[idx]`` in rotated space, ``dtype`` ``(..., D)``."""
        rows = packed.reshape(-1, packed.shape[-1])
        return self._levels_of(self.layout.unpack_indices(rows), dtype).view(*packed.shape[:-1], self.rotated_dim)

    def signs(self, packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Packed rows ``(..., C)`` -> QJL signs as +-1, ``dtype`` ``(..., D)`` (prod only)."""
        rows = packed.reshape(-1, packed.shape[-1])
        return (self.layout.unpack_signs(rows).to(dtype) * 2 - 1).view(*packed.shape[:-1], self.rotated_dim)

    def scaled_rows(self, packed: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """The stored vectors in rotated space, float32 ``(..., n, W)``: ``f0 c[idx]``, and for prod ``f1 sign`` after it.

        ``W = D`` (mse) or ``2 D`` (prod). Every estimate is a product with these rows:
        ``score`` = queries @ rows^T, ``accumulate`` = weights @ rows, ``decode`` = ``finish(rows)``.
        """
        factors = factors.to(torch.float32)
        rows = self.dequantize(packed) * factors[..., :1]
        if self.qjl is None:
            return rows
        return torch.cat([rows, self.signs(packed) * factors[..., 1:2]], dim=-1)

    def finish(self, rotated: torch.Tensor) -> torch.Tensor:
        """Rows in rotated space ``(..., W)`` (sums of ``scaled_rows``) -> vectors in the input space ``(..., d)``."""
        dim = self.rotated_dim
        base = rotated[..., :dim]
        if self.qjl is not None:
            base = base + rotated[..., dim:] @ self._on(self.qjl, rotated.device)
        return self.rotation.inverse(base.reshape(-1, dim)).view(*rotated.shape[:-1], self.dim)

    def finish_matrix(self, device: torch.device | str) -> torch.Tensor:
        """``finish`` as a matrix: float32 ``(W, d)`` on ``device``, ``finish(r) == r @ finish_matrix``
        (to float32 rounding): the inverse rotation, and for prod below it the QJL matrix times it.
        For kernels that fold ``finish`` into their last step (the KV cache's merge)."""
        if "_finish_cpu" not in self.__dict__:
            inverse = self.rotation.inverse(torch.eye(self.rotated_dim))
            self._finish_cpu = inverse if self.qjl is None else torch.cat([inverse, self.qjl @ inverse])
        return self._on(self._finish_cpu, torch.device(device))

    def accumulate(self, weights: torch.Tensor, packed: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """``sum_j weights[..., i, j] x_j`` in rotated space: weights ``(..., m, n)`` -> float32 ``(..., m, W)``.

        ``finish`` of the result is the weighted sum of the decoded vectors, without decoding them
        one by one (the value side of attention over codes).
        """
        return weights.to(torch.float32) @ self.scaled_rows(packed, factors)

    def decode(self, codes: Codes) -> Any:
        """``Codes`` -> reconstructed float32 vectors ``(n, d)``, same kind as the codes."""
        packed, factors = self._check_codes(codes)
        return like(self.finish(self.scaled_rows(packed, factors)), is_torch(codes.packed))

    # ---- inner products ----------------------------------------------------------------
    def rotate_queries(self, q: Any) -> torch.Tensor:
        """Queries ``(m, d)`` (or ``(d,)``) -> rotated float32 ``(m, D)``; with prod, ``(m, 2D)``: ``[P q, S P q]``."""
        return self.rotate_rows(as_float_rows(q, self.dim, "queries"))

    def rotate_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """``rotate_queries`` of rows already checked: float32 torch ``(m, d)``, finite."""
        rotated = self.rotation.forward(rows)
        if self.qjl is None:
            return rotated
        return torch.cat([rotated, rotated @ self._on(self.qjl, rotated.device).t()], dim=1)

    def inner_products(self, q: Any, codes: Codes) -> Any:
        """Estimated ``<q_i, x_j>``: queries ``(m, d)``, codes of n vectors -> float32 ``(m, n)``."""
        packed, factors = self._check_codes(codes)
        queries = self.rotate_queries(q).to(packed.device)
        return like(self.score(queries, packed, factors), is_torch(q))

    def score(self, queries: torch.Tensor, packed: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """The estimator on rotated queries (from ``rotate_queries``).

        queries float32 ``(..., m, W)``, packed ``(..., n, C)``, factors ``(..., n, F)`` -> float32 ``(..., m, n)``.
        """
        return queries @ self.scaled_rows(packed, factors).transpose(-1, -2)

    def _check_codes(self, codes: Codes) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(codes, Codes):
            raise TypeError(f"expected Codes from encode(), got {type(codes).__name__}")
        try:
            packed, factors = (torch.as_tensor(a) for a in (codes.packed, codes.factors))
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"codes.packed and codes.factors must be numpy arrays or torch tensors ({error})") from error
        if packed.dtype != torch.uint8 or packed.ndim != 2 or packed.shape[1] != self.code_bytes:
            raise ValueError(f"codes.packed must be uint8 (n, {self.code_bytes}), got {packed.dtype} {tuple(packed.shape)}")
        if factors.shape != (packed.shape[0], self.n_factors):
            raise ValueError(f"codes.factors must have shape ({packed.shape[0]}, {self.n_factors}), got {tuple(factors.shape)}")
        return packed, factors.to(torch.float32)

    def _on(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A fixed tensor on ``device`` (cached, so GPU callers do not copy it every call). The cache
        holds the source too: an id is unique only while its object lives."""
        if tensor.device == device:
            return tensor
        cache = self.__dict__.setdefault("_device_cache", {})
        key = (id(tensor), device)
        if key not in cache or cache[key][0] is not tensor:
            cache[key] = (tensor, tensor.to(device))
        return cache[key][1]

    def __getstate__(self) -> dict[str, Any]:
        """Pickled and copied without the device cache (its keys are ids of this object's tensors), ``finish_matrix``'s
        and the fused encoder's (derived, made again when needed)."""
        return {key: value for key, value in self.__dict__.items() if key not in ("_device_cache", "_finish_cpu", "_encode_bounds")}

    def __repr__(self) -> str:
        c = self.config
        return (
            f"TurboQuantCodec(dim={c.dim}, bits={c.bits}, variant={c.variant!r}, rotation={c.rotation!r}, "
            f"scale={c.scale!r}, seed={c.seed}, search={c.search}, quantizer={c.quantizer!r}, bytes_per_vector={self.bytes_per_vector})"
        )
