"""Checking and converting user arrays: numpy or torch in, float32 torch inside, same kind out."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SAFE = 2.0**48  # rows with a largest |x| in [1/_SAFE, _SAFE] have norms (d < 2^31) and products well inside float32


def is_torch(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def as_float_rows(x: Any, dim: int, name: str, *, allow_1d: bool = True, finite: bool = True) -> torch.Tensor:
    """``x`` as a float32 torch tensor of shape ``(n, dim)``, after checking it.

    Accepts numpy arrays and torch tensors of float16, bfloat16, float32 or float64 (a 1-D
    vector of length ``dim`` is one row when ``allow_1d``). Raises TypeError for other kinds
    and dtypes, ValueError for a wrong shape or, with ``finite``, non-finite values (naming the
    first such row; on a GPU that check waits for the device).
    """
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"{name} must hold floats, got numpy dtype {x.dtype}")
        if x.ndim == 1 and allow_1d:
            x = x.reshape(1, -1)
        if not (x.flags.c_contiguous and x.flags.writeable):  # copies read-only (memmapped) input only
            x = np.array(x, order="C")
        tensor = torch.from_numpy(x)
    elif isinstance(x, torch.Tensor):
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must hold floats, got torch dtype {x.dtype}")
        tensor = x.detach()
    else:
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if tensor.ndim == 1 and allow_1d:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2 or tensor.shape[1] != dim:
        expected = f"(n, {dim})" + (f" or ({dim},)" if allow_1d else "")
        raise ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")
    converted = tensor if tensor.dtype == torch.float32 else tensor.to(torch.float32)
    if not finite:
        return converted
    # a reduction instead of a full boolean mask: NaN and inf propagate into it (numpy's on the
    # CPU: each torch call on a small tensor costs microseconds)
    if converted.device.type == "cpu":
        # float32 values cannot overflow a float64 sum: it is finite if and only if they all are
        finite = math.isfinite(converted.numpy().sum(dtype=np.float64))
    else:
        finite = bool(torch.isfinite(converted.sum(dtype=torch.float64)))
    if not finite:
        row = int(torch.nonzero(~torch.isfinite(converted).all(dim=1))[0, 0])
        _refuse_row(name, row, finite=bool(torch.isfinite(tensor[row]).all()))
    return converted


def as_float32(array: Any, name: str, first_row: int = 0, *, finite: bool = True) -> np.ndarray:
    """Rows ``(n, d)`` of real numbers (numpy, memmap, h5py slice) as a float32 numpy array.

    ValueError naming row ``first_row + i`` (its place in the file or dataset) for the first row
    holding a finite value beyond the float32 range (which a plain cast would turn into inf)
    or, with ``finite``, NaN or inf: the same messages as `as_float_rows`.
    """
    array = np.asarray(array)
    with np.errstate(over="ignore", invalid="ignore"):
        converted = array.astype(np.float32)
    if converted.size and not np.isfinite(converted.sum(dtype=np.float64)):
        rows = converted.reshape(converted.shape[0] if converted.ndim else 1, -1)
        source = array.reshape(rows.shape)
        overflowed = np.isinf(rows) & np.isfinite(source) if array.dtype.kind == "f" else np.isinf(rows)
        bad = overflowed.any(axis=1) | (~np.isfinite(rows).all(axis=1) if finite else False)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            _refuse_row(name, first_row + row, finite=bool(overflowed[row].any()))
    return converted


def _refuse_row(name: str, row: int, finite: bool) -> None:
    """ValueError for row ``row`` of ``name``: NaN or inf, or (``finite``) values beyond the float32 range."""
    if finite:
        raise ValueError(f"{name} holds values beyond the float32 range in row {row} (|x| > {torch.finfo(torch.float32).max:.3g})")
    raise ValueError(f"{name} contains NaN or inf in row {row}")


def power_of_two_scaled(rows: torch.Tensor, *, synchronize: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows ``(n, d)`` divided each by a power of two, and those exponents int32 ``(n,)``, or None
    where no row needed it.

    ``rows == ldexp(scaled, exponents)`` exactly. A row whose largest ``|x|`` is outside
    [2^-48, 2^48] (near the ends of the float32 range) is brought to a largest ``|x|`` in [0.5, 1), so its
    norm and its products neither overflow nor underflow; other rows are kept as they are
    (exponent 0), so ordinary input gives bit-identical results. Zero rows stay zero.
    ``synchronize=False`` (rows on a GPU): never wait for the device to tell whether any row needs
    it; every row is scaled, by ``2^0`` where not extreme (the same values).
    """
    exponents = _host_exponents(rows) if rows.device.type == "cpu" else _device_exponents(rows, synchronize)
    if exponents is None:
        return rows, None
    return times_power_of_two(rows, -exponents), exponents


def _host_exponents(rows: torch.Tensor) -> torch.Tensor | None:
    """`power_of_two_scaled`'s exponents of CPU rows, by numpy (each torch call on a small tensor costs microseconds)."""
    values = rows.numpy()
    if len(values) == 1 and values.size:  # one query: one reduction
        top = float(np.abs(values).max())
        if top <= _SAFE and not 0 < top < 1 / _SAFE:
            return None
    largest = np.maximum(values.max(axis=1), -values.min(axis=1)) if values.size else np.zeros(len(values), values.dtype)
    extreme = (largest > _SAFE) | ((largest < 1 / _SAFE) & (largest > 0))
    if not extreme.any():
        return None
    return torch.from_numpy(np.where(extreme, np.frexp(largest)[1], 0).astype(np.int32))


def _device_exponents(rows: torch.Tensor, synchronize: bool) -> torch.Tensor | None:
    """`power_of_two_scaled`'s exponents of rows on a device, by torch there; with ``synchronize``
    None where no row needs scaling (which reads a flag back), else always a tensor."""
    largest = rows.abs().amax(dim=1) if rows.numel() else rows.new_zeros(rows.shape[0])
    extreme = (largest > _SAFE) | ((largest < 1 / _SAFE) & (largest > 0))
    if synchronize and not bool(extreme.any()):
        return None
    return torch.where(extreme, torch.frexp(largest)[1], 0)


def times_power_of_two(values: torch.Tensor, exponents: torch.Tensor | None) -> torch.Tensor:
    """``values`` ``(n, ...)`` times ``2 ** exponents`` (int ``(n,)``, or None: all 0), exactly where the
    result is a normal float; in two steps, so that no factor overflows float32 itself."""
    if exponents is None:
        return values
    exponents = exponents.view(-1, *([1] * (values.ndim - 1)))
    half = torch.div(exponents, 2, rounding_mode="floor")
    return torch.ldexp(torch.ldexp(values, half), exponents - half)


def unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows ``(n, d)`` divided by their norms (zero rows stay zero), exact near the ends of the
    float32 range too: the norm is taken after `power_of_two_scaled`."""
    rows = power_of_two_scaled(rows)[0]
    return rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def as_id_array(ids: Any, name: str = "ids") -> np.ndarray:
    """``ids`` as a 1-D int64 numpy array (numpy, torch, list or scalar in)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    array = np.asarray(ids)
    if array.ndim == 0:
        array = array.reshape(1)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size and array.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got dtype {array.dtype}")
    if array.dtype.kind == "u" and array.size and int(array.max()) > np.iinfo(np.int64).max:  # exact with numpy 1.x too
        raise ValueError(f"{name} must fit int64, got {int(array.max())}")
    return array.astype(np.int64, copy=False)


def like(value: torch.Tensor, as_torch: bool) -> Any:
    """``value`` returned in the caller's kind: the tensor itself, or a numpy array."""
    return value if as_torch else value.cpu().numpy()
