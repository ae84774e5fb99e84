"""Datasets by name: the standard ann-benchmarks files (downloaded once into a data folder),
synthetic names generated on the fly, or a path to any ann-benchmarks .hdf5 file."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from .annbench import read_hdf5
from .dataset import Dataset
from .synthetic import make_synthetic, parse_synthetic_name

ANN_BENCHMARKS_URL = "http://ann-benchmarks.com/{name}.hdf5"
DATASETS: dict[str, str] = {
    name: ANN_BENCHMARKS_URL.format(name=name)
    for name in (
        "glove-25-angular",
        "glove-50-angular",
        "glove-100-angular",
        "glove-200-angular",
        "sift-128-euclidean",
        "nytimes-256-angular",
        "fashion-mnist-784-euclidean",
        "gist-960-euclidean",
        "deep-image-96-angular",
        "dbpedia-openai-100k-angular",
        "dbpedia-openai-1000k-angular",
    )
}
SYNTHETIC_FORM = "synthetic-{gaussian|anisotropic|clustered|siftlike}-{dim}-{ip|angular|euclidean}[-raw][-n{n}][-q{m}]"


def default_data_dir() -> Path:
    """$TQINDEX_DATA if set, else ~/.cache/tqindex/datasets."""
    return Path(os.environ.get("TQINDEX_DATA") or Path.home() / ".cache" / "tqindex" / "datasets")


def download_file(url: str, dest: Path, *, progress: bool = True) -> Path:
    """Fetch ``url`` into ``dest`` via a ``.part`` file renamed when complete; OSError on failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
        if size is not None and part.stat().st_size != size:
            raise OSError(f"download of {url} stopped after {part.stat().st_size} of {size} bytes")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


def _fetch(name: str, path: Path, allow_download: bool, progress: bool) -> None:
    url = DATASETS[name]
    remedy = (
        f"download {url} on a machine with network and save it as {path} (TQINDEX_DATA or data_dir picks the folder)"
    )
    if not allow_download:
        raise FileNotFoundError(f"{name}: {path} does not exist and download=False; {remedy}")
    try:
        download_file(url, path, progress=progress)
    except OSError as err:
        raise FileNotFoundError(f"{name}: could not download it ({err}); {remedy}") from err


def load_dataset(
    name_or_path: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    progress: bool = True,
) -> Dataset:
    """A `Dataset` from a path to an .hdf5 file, a registered ann-benchmarks name, or a synthetic name.

    A registered name is read from ``data_dir/{name}.hdf5`` (default `default_data_dir()`),
    downloaded there first if missing and ``download`` allows. Synthetic names follow
    `SYNTHETIC_FORM` and are generated with their ground truth.
    """
    text = os.fspath(name_or_path)
    if not isinstance(name_or_path, os.PathLike) and not text.endswith((".hdf5", ".h5")):
        params = parse_synthetic_name(text)
        if params is not None:
            return make_synthetic(**params, progress=progress)
        if text in DATASETS:
            path = Path(data_dir if data_dir is not None else default_data_dir()) / f"{text}.hdf5"
            if not path.is_file():
                _fetch(text, path, download, progress)
            return read_hdf5(path, progress=progress)
        if not Path(text).is_file():
            raise ValueError(
                f"unknown dataset {text!r}: not a file, a synthetic name ({SYNTHETIC_FORM}) "
                f"or a known name: {', '.join(DATASETS)}"
            )
    return read_hdf5(text, progress=progress)
