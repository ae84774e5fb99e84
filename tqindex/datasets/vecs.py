"""The TEXMEX ``.fvecs`` / ``.ivecs`` / ``.bvecs`` formats (SIFT1M, GIST1M, BIGANN, ...).

Each vector is one record: its dimension ``d`` as a little-endian int32, then ``d`` values:
float32 (``.fvecs``), int32 (``.ivecs``, e.g. ground-truth ids) or uint8 (``.bvecs``). Every
record of a file has the same ``d``. The format is chosen by the file's suffix.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tqindex._arrays import as_float32

#: suffix -> the dtype of one value
VECS_DTYPES: dict[str, np.dtype] = {".fvecs": np.dtype("<f4"), ".ivecs": np.dtype("<i4"), ".bvecs": np.dtype("u1")}
_DIM = np.dtype("<i4")


def _value_dtype(path: Path) -> np.dtype:
    try:
        return VECS_DTYPES[path.suffix.lower()]
    except KeyError:
        raise ValueError(f"{path}: not a {'/'.join(VECS_DTYPES)} file (the suffix picks the format)") from None


def read_vecs(path: str | os.PathLike, *, mmap: bool = True) -> np.ndarray:
    """The vectors of a .fvecs / .ivecs / .bvecs file as an ``(n, d)`` array.

    dtype float32, int32 or uint8 by suffix. ``mmap=True`` returns a read-only view of the file
    (rows are read from disk when touched; not C-contiguous, copy slices of it as needed);
    ``mmap=False`` reads it into a C-contiguous array. An empty file gives shape ``(0, 0)``.
    ValueError naming the file when it is not one: a size that is not a whole number of
    records, or records of different dimensions.
    """
    path = Path(path)
    values = _value_dtype(path)
    size = path.stat().st_size  # FileNotFoundError names the file
    if size == 0:
        return np.empty((0, 0), dtype=values)
    if size < _DIM.itemsize:
        raise ValueError(f"{path}: {size} bytes is too short for a {path.suffix} file (truncated?)")
    with open(path, "rb") as f:
        dim = int(np.frombuffer(f.read(_DIM.itemsize), dtype=_DIM)[0])
    if dim <= 0:
        raise ValueError(f"{path}: the first record's dimension is {dim}; not a {path.suffix} file")
    record = np.dtype([("dim", _DIM), ("vec", values, (dim,))])
    if size % record.itemsize:
        raise ValueError(
            f"{path}: {size} bytes is not a whole number of {record.itemsize}-byte records "
            f"(d={dim}); the file is truncated or not a {path.suffix} file"
        )
    n = size // record.itemsize
    rows = np.memmap(path, dtype=record, mode="r", shape=(n,)) if mmap else np.fromfile(path, dtype=record, count=n)
    dims = np.asarray(rows["dim"])
    bad = np.flatnonzero(dims != dim)
    if len(bad):
        raise ValueError(f"{path}: record {bad[0]} has dimension {dims[bad[0]]}, but the first has {dim}; the file is corrupt")
    vectors = rows["vec"]
    return vectors if mmap else np.ascontiguousarray(vectors)


def write_vecs(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` ``(n, d)`` as a .fvecs / .ivecs / .bvecs file (format by suffix); returns the path.

    Values are converted to the file's type: numbers to float32 for .fvecs (ValueError naming
    the row for a finite value beyond the float32 range, which would become inf); .ivecs and
    .bvecs take integers that fit int32 / uint8 (ValueError otherwise). Written beside ``path``
    (its folder created where missing) and renamed over it when complete.
    """
    path = Path(path)
    values = _value_dtype(path)
    array = np.asarray(array)
    if array.ndim != 2 or array.shape[1] < 1:
        raise ValueError(f"{path}: need an (n, d) array with d >= 1, got shape {array.shape}")
    if values.kind in "iu":
        if array.dtype.kind not in "iub":
            raise ValueError(f"{path}: {path.suffix} holds integers, got dtype {array.dtype}")
        info = np.iinfo(values)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise ValueError(f"{path}: values span {array.min()}..{array.max()}, outside {values} range {info.min}..{info.max}")
    elif array.dtype.kind not in "fiub":
        raise ValueError(f"{path}: .fvecs holds numbers, got dtype {array.dtype}")
    records = np.empty(len(array), dtype=[("dim", _DIM), ("vec", values, (array.shape[1],))])
    records["dim"] = array.shape[1]
    records["vec"] = as_float32(array, str(path), finite=False) if values.kind == "f" else array
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        records.tofile(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
