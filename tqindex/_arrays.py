"""Checking and converting user arrays: numpy or torch in, float32 torch inside, same kind out."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_torch(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def as_float_rows(x: Any, dim: int, name: str, *, allow_1d: bool = True) -> torch.Tensor:
    """``x`` as a float32 torch tensor of shape ``(n, dim)``, after checking it.

    Accepts numpy arrays and torch tensors of float16, bfloat16, float32 or float64 (a 1-D
    vector of length ``dim`` is one row when ``allow_1d``). Raises TypeError for other kinds
    and dtypes, ValueError for a wrong shape or non-finite values.
    """
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"{name} must hold floats, got numpy dtype {x.dtype}")
        tensor = torch.from_numpy(np.require(x, requirements=["C", "W"]))  # copies read-only (memmapped) input only
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
    converted = tensor.to(torch.float32)
    # one reduction instead of a full boolean mask: NaN and inf propagate into the sum; a finite
    # sum that overflowed is told apart by the exact check
    if not bool(torch.isfinite(converted.sum())) and not bool(torch.isfinite(converted).all()):
        if bool(torch.isfinite(tensor).all()):  # finite float64 values beyond float32's range
            raise ValueError(f"{name} holds values beyond the float32 range (|x| > {torch.finfo(torch.float32).max:.3g})")
        raise ValueError(f"{name} contains NaN or inf")
    return converted


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
