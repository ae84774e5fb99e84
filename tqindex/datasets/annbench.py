"""The ann-benchmarks HDF5 format: datasets train, test, neighbors, distances; attrs distance, dimension.

Files written here are what ann-benchmarks writes (neighbors int32, distances float32,
attrs type="dense", distance, dimension, point_type="float"), so they read back with its code too.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from tqindex._arrays import as_float32

from ._optional import require
from .dataset import DISTANCE_TO_METRIC, Dataset
from .groundtruth import exact_knn

ARRAYS = ("train", "test", "neighbors", "distances")
READ_ROWS = 65536  # rows of train read per step


def _h5py():
    return require("h5py", "datasets")


def write_hdf5(
    path: str | os.PathLike,
    train: np.ndarray,
    test: np.ndarray,
    *,
    distance: str,
    neighbors: np.ndarray | None = None,
    distances: np.ndarray | None = None,
    k: int = 100,
    progress: bool = True,
) -> Path:
    """Write train (n, d) and test (m, d) with their ground truth as an ann-benchmarks file.

    distance: "angular", "euclidean" or "dot" (ann-benchmarks' names). neighbors int (m, K)
    and distances (m, K) are computed with `exact_knn` (K = min(k, n)) unless both are given.
    The file is written beside ``path`` (its folder created where missing) and renamed over it
    when complete. Returns the path.
    """
    if distance not in DISTANCE_TO_METRIC:
        raise ValueError(f"distance must be one of {sorted(DISTANCE_TO_METRIC)}, got {distance!r}")
    if (neighbors is None) != (distances is None):
        raise ValueError("give both neighbors and distances, or neither (to compute them)")
    train, test = as_float32(train, "train"), as_float32(test, "test")  # ValueError naming a row that float32 cannot hold
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(f"train (n, d) and test (m, d) must share d; got {train.shape}, {test.shape}")
    if neighbors is None:
        metric = DISTANCE_TO_METRIC[distance]
        distances, neighbors = exact_knn(train, test, min(k, len(train)), metric, progress=progress)
    if neighbors.shape != distances.shape or neighbors.shape[0] != len(test):
        raise ValueError(f"neighbors {neighbors.shape} and distances {distances.shape} must both be (m={len(test)}, K)")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    h5py = _h5py()
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["type"] = "dense"
            f.attrs["distance"] = distance
            f.attrs["dimension"] = train.shape[1]
            f.attrs["point_type"] = "float"
            f.create_dataset("train", data=train)
            f.create_dataset("test", data=test)
            f.create_dataset("neighbors", data=np.asarray(neighbors, dtype=np.int32))
            f.create_dataset("distances", data=np.asarray(distances, dtype=np.float32))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _read_train(dataset, progress: bool) -> np.ndarray:
    """The whole (n, d) train dataset as float32, read in row blocks behind a progress bar."""
    out = np.empty(dataset.shape, dtype=np.float32)
    for start in tqdm(range(0, len(out), READ_ROWS), desc="reading train", unit="block", disable=not progress):
        out[start : start + READ_ROWS] = dataset[start : start + READ_ROWS]
    return out


def read_hdf5(path: str | os.PathLike, *, progress: bool = True) -> Dataset:
    """Read an ann-benchmarks file; ValueError naming the file if it is not one we can use."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, not an HDF5 file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    h5py = _h5py()
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path}: not a readable HDF5 file ({err})") from err
    with f:
        missing = [name for name in ARRAYS if name not in f]
        if missing:
            raise ValueError(f"{path}: missing dataset(s) {missing}; an ann-benchmarks file has {list(ARRAYS)}")
        if "distance" not in f.attrs:
            raise ValueError(f"{path}: missing attribute 'distance'")
        distance = _text(f.attrs["distance"])
        if distance not in DISTANCE_TO_METRIC:
            raise ValueError(f"{path}: distance {distance!r} is not supported (only {sorted(DISTANCE_TO_METRIC)})")
        if _text(f.attrs.get("point_type", "float")) != "float":
            raise ValueError(f"{path}: point_type {_text(f.attrs['point_type'])!r} is not supported (only 'float')")
        shapes = {name: f[name].shape for name in ARRAYS}
        n_d, m_d = shapes["train"], shapes["test"]
        if len(n_d) != 2 or len(m_d) != 2 or n_d[1] != m_d[1]:
            raise ValueError(f"{path}: train {n_d} and test {m_d} must be (n, d) and (m, d)")
        if "dimension" in f.attrs and int(f.attrs["dimension"]) != n_d[1]:
            raise ValueError(f"{path}: attribute dimension={int(f.attrs['dimension'])} but train has d={n_d[1]}")
        for name in ("neighbors", "distances"):
            if len(shapes[name]) != 2 or shapes[name][0] != m_d[0]:
                raise ValueError(f"{path}: {name} {shapes[name]} must be (m={m_d[0]}, K)")
        if shapes["neighbors"] != shapes["distances"]:
            raise ValueError(f"{path}: neighbors {shapes['neighbors']} and distances {shapes['distances']} differ")
        neighbors = f["neighbors"][...].astype(np.int64)
        if neighbors.size and (neighbors.min() < 0 or neighbors.max() >= n_d[0]):
            raise ValueError(f"{path}: neighbors hold ids outside [0, n={n_d[0]})")
        return Dataset(
            name=path.stem,
            train=_read_train(f["train"], progress),
            test=f["test"][...].astype(np.float32),
            neighbors=neighbors,
            distances=f["distances"][...].astype(np.float32),
            distance=distance,
        )
