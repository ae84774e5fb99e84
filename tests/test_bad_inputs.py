"""The bad-input matrix: every public function gets the bad inputs a user can produce.

Each case names the exception type and a fragment of the message that names the problem; every
refused call on an index is followed by a check that nothing stored changed (ntotal, search
results, and the bytes of every file of an on-disk index). Case ids start with the function
they exercise; docs/reliability.md counts them per function.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tqindex
from conftest import unit_rows
from tqindex import Codes, TurboQuantCodec, TurboQuantIndex
from tqindex.errors import IndexFormatError, StorageError

D = 16
X = unit_rows(40, D, seed=1)
Q = unit_rows(3, D, seed=2)
NAN_ROW = np.where(np.arange(D) == 3, np.nan, 0.5).astype(np.float32)[None]
INF_ROW = np.where(np.arange(D) == 3, np.inf, 0.5).astype(np.float32)[None]


def beyond_float32(x: np.ndarray, row: int) -> np.ndarray:
    """``x`` as float64 with one element of row ``row`` at -1e39, beyond float32's range."""
    x = x.astype(np.float64)
    x[row, 2] = -1e39
    return x


def cases(table: dict) -> pytest.MarkDecorator:
    """Parametrize over a ``{id: (..., error, match)}`` table, ids as the case names."""
    return pytest.mark.parametrize("case", list(table.values()), ids=list(table))


# ---- TurboQuantCodec ---------------------------------------------------------------------------

CODEC_INIT = {
    "TurboQuantCodec-dim-1": (dict(dim=1), ValueError, "dim must be an integer >= 2"),
    "TurboQuantCodec-dim-str": (dict(dim="16"), ValueError, "dim must be an integer"),
    "TurboQuantCodec-dim-float": (dict(dim=16.0), ValueError, "dim must be an integer"),
    "TurboQuantCodec-bits-0": (dict(bits=0), ValueError, r"bits must be in \[1, 8\]"),
    "TurboQuantCodec-bits-9": (dict(bits=9), ValueError, r"bits must be in \[1, 8\]"),
    "TurboQuantCodec-bits-not-eighths": (dict(bits=2.3), ValueError, "steps of 1/8"),
    "TurboQuantCodec-bits-nan": (dict(bits=float("nan")), ValueError, "bits must be in"),
    "TurboQuantCodec-bits-str": (dict(bits="4"), TypeError, "bits must be a number"),
    "TurboQuantCodec-bits-None": (dict(bits=None), TypeError, "bits must be a number"),
    "TurboQuantCodec-variant": (dict(variant="qjl"), ValueError, "variant must be one of"),
    "TurboQuantCodec-rotation": (dict(rotation="random"), ValueError, "rotation must be one of"),
    "TurboQuantCodec-scale": (dict(scale="max"), ValueError, "scale must be one of"),
    "TurboQuantCodec-prod-unbiased": (dict(variant="prod", scale="unbiased"), ValueError, "scale='norm' only"),
    "TurboQuantCodec-seed-negative": (dict(seed=-1), ValueError, "seed must be a non-negative integer"),
    "TurboQuantCodec-seed-float": (dict(seed=1.5), ValueError, "seed must be a non-negative integer"),
}


@cases(CODEC_INIT)
def test_codec_constructor(case):
    kwargs, error, match = case
    with pytest.raises(error, match=match):
        TurboQuantCodec(**{"dim": D, **kwargs})


CODEC = TurboQuantCodec(D, 4)
CODES = CODEC.encode(X)
CODEC_CALLS = {
    "encode-wrong-dim": (lambda c: c.encode(X[:, :8]), ValueError, r"x must have shape \(n, 16\)"),
    "encode-3d": (lambda c: c.encode(X[None]), ValueError, "x must have shape"),
    "encode-int-dtype": (lambda c: c.encode(X.astype(np.int32)), TypeError, "x must hold floats"),
    "encode-complex": (lambda c: c.encode(X.astype(np.complex64)), TypeError, "x must hold floats"),
    "encode-strings": (lambda c: c.encode(X.astype(str)), TypeError, "x must hold floats"),
    "encode-list": (lambda c: c.encode(X.tolist()), TypeError, "numpy array or a torch tensor"),
    "encode-nan": (lambda c: c.encode(NAN_ROW), ValueError, "x contains NaN or inf"),
    "encode-inf": (lambda c: c.encode(INF_ROW), ValueError, "x contains NaN or inf"),
    "encode-beyond-float32": (lambda c: c.encode(np.full((1, D), 1e39)), ValueError, "beyond the float32 range"),
    "encode-norm-overflows": (lambda c: c.encode(np.full((1, D), 1e38, np.float32)), ValueError, "x row 0: its norm overflows float32"),
    "encode-torch-int": (lambda c: c.encode(torch.ones(2, D, dtype=torch.int64)), TypeError, "x must hold floats"),
    "encode-torch-nan": (lambda c: c.encode(torch.from_numpy(NAN_ROW)), ValueError, "NaN"),
    "encode-torch-wrong-dim": (lambda c: c.encode(torch.zeros(2, D + 1)), ValueError, "x must have shape"),
    "decode-not-codes": (lambda c: c.decode((CODES.packed, CODES.factors)), TypeError, "expected Codes"),
    "decode-foreign-codes": (lambda c: TurboQuantCodec(D, 2).decode(CODES), ValueError, r"codes.packed must be uint8 \(n, 4\)"),
    "decode-packed-not-uint8": (lambda c: c.decode(Codes(CODES.packed.astype(np.int64), CODES.factors)), ValueError, "must be uint8"),
    "decode-factors-not-array": (lambda c: c.decode(Codes(CODES.packed, "scales")), TypeError, "numpy arrays or torch tensors"),
    "decode-factors-wrong-shape": (lambda c: c.decode(Codes(CODES.packed, CODES.factors[:5])), ValueError, "codes.factors must have shape"),
    "inner_products-wrong-dim": (lambda c: c.inner_products(Q[:, :8], CODES), ValueError, "queries must have shape"),
    "inner_products-nan": (lambda c: c.inner_products(NAN_ROW, CODES), ValueError, "queries contains NaN"),
    "inner_products-torch-complex": (lambda c: c.inner_products(torch.zeros(1, D, dtype=torch.complex64), CODES), TypeError, "queries must hold floats"),
    "inner_products-not-codes": (lambda c: c.inner_products(Q, X), TypeError, "expected Codes"),
}


@cases(CODEC_CALLS)
def test_codec_calls(case):
    call, error, match = case
    with pytest.raises(error, match=match):
        call(CODEC)


# ---- TurboQuantIndex(...) ----------------------------------------------------------------------

INDEX_INIT = {
    "TurboQuantIndex-dim-1": (dict(dim=1), ValueError, "dim must be an integer >= 2"),
    "TurboQuantIndex-bits-0": (dict(bits=0), ValueError, "bits must be in"),
    "TurboQuantIndex-bits-8.5": (dict(bits=8.5), ValueError, "bits must be in"),
    "TurboQuantIndex-metric": (dict(metric="euclidean"), ValueError, "metric must be one of"),
    "TurboQuantIndex-variant": (dict(variant="x"), ValueError, "variant must be one of"),
    "TurboQuantIndex-backend": (dict(backend="cuda-magic"), ValueError, "backend must be one of"),
    "TurboQuantIndex-chunk_rows-0": (dict(chunk_rows=0), ValueError, "chunk_rows must be a positive integer"),
    "TurboQuantIndex-chunk_rows-float": (dict(chunk_rows=1.5), ValueError, "chunk_rows must be a positive integer"),
    "TurboQuantIndex-chunk_rows-bool": (dict(chunk_rows=True), ValueError, "chunk_rows must be a positive integer"),
    "TurboQuantIndex-device-unknown": (dict(device="gpu0"), ValueError, "device 'gpu0' is not available"),
    "TurboQuantIndex-device-missing": (dict(device="cuda:99"), ValueError, "device 'cuda:99' is not available"),
    "TurboQuantIndex-device-wrong-type": (dict(device=[0]), ValueError, "is not available"),
}


@cases(INDEX_INIT)
@pytest.mark.parametrize("where", ["memory", "disk"])
def test_index_constructor(case, where, tmp_path):
    """Refused arguments raise before anything is created: an on-disk index leaves no directory."""
    kwargs, error, match = case
    path = None if where == "memory" else tmp_path / "new"
    with pytest.raises(error, match=match):
        TurboQuantIndex(**{"dim": D, "path": path, **kwargs})
    assert where == "memory" or not path.exists()


def _nonempty_dir(tmp_path: Path) -> Path:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    return tmp_path / "taken"


def _a_file(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("mine")
    return tmp_path / "file"


INDEX_PATH = {
    "TurboQuantIndex-path-nonempty-dir": (_nonempty_dir, StorageError, "directory is not empty: a new store needs a missing or empty one"),
    "TurboQuantIndex-path-is-a-file": (_a_file, StorageError, "exists and is not a directory"),
    "TurboQuantIndex-path-not-a-path": (lambda tmp_path: 5, TypeError, "path must be a str or os.PathLike, got int"),
}


@cases(INDEX_PATH)
def test_index_constructor_path(case, tmp_path):
    make, error, match = case
    path = make(tmp_path)
    before = files_of(tmp_path)
    with pytest.raises(error, match=match):
        TurboQuantIndex(D, path=path)
    assert files_of(tmp_path) == before


# ---- the index: state and its snapshot ---------------------------------------------------------


def files_of(root: Path | None) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (nothing for an in-memory index)."""
    if root is None:
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def snapshot(index: TurboQuantIndex, path: Path | None) -> tuple:
    scores, ids = index.search(Q, 5)
    return index.ntotal, scores.tolist(), ids.tolist(), index.reconstruct(np.arange(5, 10)).tolist(), files_of(path)


def filled(where: str, tmp_path: Path) -> tuple[TurboQuantIndex, Path | None]:
    """An index of 40 vectors, ids 0..39 with id 0 removed: in RAM or on disk."""
    path = None if where == "memory" else tmp_path / "index"
    index = TurboQuantIndex(D, 4, path=path)
    index.add(X)
    index.remove_ids([0])
    return index, path


@pytest.fixture(scope="module")
def saved_once(tmp_path_factory) -> Path:
    """`filled` on disk, built once; `stored` copies it (cheaper than building it per case)."""
    index, path = filled("disk", tmp_path_factory.mktemp("template"))
    index.close()
    return path


@pytest.fixture(params=["memory", "disk"])
def stored(request, tmp_path, saved_once):
    """A writable `filled` index: in RAM, or a copy of `saved_once` opened with mode "a"."""
    if request.param == "memory":
        index, path = filled("memory", tmp_path)
    else:
        path = Path(shutil.copytree(saved_once, tmp_path / "index"))
        index = tqindex.open(path, "a")
    yield index, path
    index.close()


INDEX_CALLS = {
    # add
    "add-wrong-dim": (lambda ix: ix.add(X[:, :8]), ValueError, r"x must have shape \(n, 16\)"),
    "add-1d-wrong-length": (lambda ix: ix.add(X[0, :8]), ValueError, "x must have shape"),
    "add-3d": (lambda ix: ix.add(X[None]), ValueError, "x must have shape"),
    "add-0d": (lambda ix: ix.add(np.array(1.0)), ValueError, "x must have shape"),
    "add-int-dtype": (lambda ix: ix.add(X.astype(np.int64)), TypeError, "x must hold floats"),
    "add-complex": (lambda ix: ix.add(X.astype(np.complex128)), TypeError, "x must hold floats"),
    "add-strings": (lambda ix: ix.add(X.astype(str)), TypeError, "x must hold floats"),
    "add-object": (lambda ix: ix.add(X.astype(object)), TypeError, "x must hold floats"),
    "add-list": (lambda ix: ix.add(X.tolist()), TypeError, "numpy array or a torch tensor"),
    "add-None": (lambda ix: ix.add(None), TypeError, "numpy array or a torch tensor"),
    "add-nan": (lambda ix: ix.add(np.concatenate([X[:3], NAN_ROW])), ValueError, "x contains NaN or inf in row 3"),
    "add-inf": (lambda ix: ix.add(np.concatenate([X[:3], INF_ROW])), ValueError, "x contains NaN or inf"),
    "add-beyond-float32": (lambda ix: ix.add(np.full((1, D), -1e39)), ValueError, "beyond the float32 range"),
    "add-beyond-float32-names-row": (lambda ix: ix.add(beyond_float32(X[:4], 2)), ValueError, "x holds values beyond the float32 range in row 2"),
    "add-norm-overflows": (lambda ix: ix.add(np.concatenate([X[:2], np.full((2, D), 1e38, np.float32)])), ValueError, "x row 2: its norm overflows float32"),
    "add-torch-wrong-dim": (lambda ix: ix.add(torch.zeros(2, D + 1)), ValueError, "x must have shape"),
    "add-torch-int": (lambda ix: ix.add(torch.ones(2, D, dtype=torch.int32)), TypeError, "x must hold floats"),
    "add-torch-nan": (lambda ix: ix.add(torch.from_numpy(NAN_ROW)), ValueError, "x contains NaN or inf"),
    "add-torch-bf16-inf": (lambda ix: ix.add(torch.from_numpy(INF_ROW).bfloat16()), ValueError, "x contains NaN or inf"),
    # add_with_ids
    "add_with_ids-too-few-ids": (lambda ix: ix.add_with_ids(X[:3], [100, 101]), ValueError, "got 3 vectors but 2 ids"),
    "add_with_ids-too-many-ids": (lambda ix: ix.add_with_ids(X[:1], [100, 101]), ValueError, "got 1 vectors but 2 ids"),
    "add_with_ids-float-ids": (lambda ix: ix.add_with_ids(X[:2], [100.0, 101.0]), TypeError, "ids must be integers"),
    "add_with_ids-bool-ids": (lambda ix: ix.add_with_ids(X[:2], [True, False]), TypeError, "ids must be integers"),
    "add_with_ids-string-ids": (lambda ix: ix.add_with_ids(X[:2], ["a", "b"]), TypeError, "ids must be integers"),
    "add_with_ids-None-ids": (lambda ix: ix.add_with_ids(X[:2], None), TypeError, "ids must be integers"),
    "add_with_ids-2d-ids": (lambda ix: ix.add_with_ids(X[:2], [[100, 101]]), ValueError, "ids must be one-dimensional"),
    "add_with_ids-duplicates": (lambda ix: ix.add_with_ids(X[:3], [100, 101, 100]), ValueError, r"duplicate ids in the batch: \[100\]"),
    "add_with_ids-already-present": (lambda ix: ix.add_with_ids(X[:2], [100, 7]), ValueError, r"ids already in the index: \[7\]"),
    "add_with_ids-negative": (lambda ix: ix.add_with_ids(X[:2], [100, -1]), ValueError, "ids must be >= 0"),
    "add_with_ids-beyond-int64": (lambda ix: ix.add_with_ids(X[:1], np.array([2**63], np.uint64)), ValueError, "ids must fit int64"),
    "add_with_ids-torch-float-ids": (lambda ix: ix.add_with_ids(X[:1], torch.tensor([100.0])), TypeError, "ids must be integers"),
    "add_with_ids-nan-vectors": (lambda ix: ix.add_with_ids(NAN_ROW, [100]), ValueError, "x contains NaN or inf"),
    "add_with_ids-torch-wrong-dim": (lambda ix: ix.add_with_ids(torch.zeros(1, 8), torch.tensor([100])), ValueError, "x must have shape"),
    # remove_ids
    "remove_ids-unknown": (lambda ix: ix.remove_ids([999]), KeyError, r"ids not in the index: \[999\]"),
    "remove_ids-some-unknown": (lambda ix: ix.remove_ids([5, 6, 999]), KeyError, r"ids not in the index: \[999\]"),
    "remove_ids-already-removed": (lambda ix: ix.remove_ids([0]), KeyError, r"ids not in the index: \[0\]"),
    "remove_ids-negative": (lambda ix: ix.remove_ids(-1), KeyError, "ids not in the index"),
    "remove_ids-float": (lambda ix: ix.remove_ids([5.0]), TypeError, "ids must be integers"),
    "remove_ids-string": (lambda ix: ix.remove_ids("5"), TypeError, "ids must be integers"),
    "remove_ids-None": (lambda ix: ix.remove_ids(None), TypeError, "ids must be integers"),
    "remove_ids-2d": (lambda ix: ix.remove_ids([[5, 6]]), ValueError, "ids must be one-dimensional"),
    "remove_ids-torch-float": (lambda ix: ix.remove_ids(torch.tensor([5.0])), TypeError, "ids must be integers"),
    # search
    "search-wrong-dim": (lambda ix: ix.search(Q[:, :8], 5), ValueError, r"queries must have shape \(n, 16\)"),
    "search-3d": (lambda ix: ix.search(Q[None], 5), ValueError, "queries must have shape"),
    "search-int-dtype": (lambda ix: ix.search(Q.astype(np.int32), 5), TypeError, "queries must hold floats"),
    "search-complex": (lambda ix: ix.search(Q.astype(np.complex64), 5), TypeError, "queries must hold floats"),
    "search-strings": (lambda ix: ix.search(np.array([["a"] * D]), 5), TypeError, "queries must hold floats"),
    "search-list": (lambda ix: ix.search(Q.tolist(), 5), TypeError, "numpy array or a torch tensor"),
    "search-nan": (lambda ix: ix.search(NAN_ROW, 5), ValueError, "queries contains NaN or inf in row 0"),
    "search-beyond-float32": (lambda ix: ix.search(beyond_float32(Q, 1), 5), ValueError, "queries holds values beyond the float32 range in row 1"),
    "search-scores-overflow": (
        lambda ix: ix.search(np.concatenate([Q[:1], np.full((1, D), 3e38, np.float32)]), 5),
        ValueError,
        "queries row 1: its inner products overflow float32",
    ),
    "search-inf": (lambda ix: ix.search(INF_ROW, 5), ValueError, "queries contains NaN or inf"),
    "search-torch-wrong-dim": (lambda ix: ix.search(torch.zeros(1, D - 1), 5), ValueError, "queries must have shape"),
    "search-torch-complex": (lambda ix: ix.search(torch.zeros(1, D, dtype=torch.complex64), 5), TypeError, "queries must hold floats"),
    "search-torch-nan": (lambda ix: ix.search(torch.from_numpy(NAN_ROW).half(), 5), ValueError, "queries contains NaN"),
    "search-k-0": (lambda ix: ix.search(Q, 0), ValueError, "k must be a positive integer"),
    "search-k-negative": (lambda ix: ix.search(Q, -3), ValueError, "k must be a positive integer"),
    "search-k-float": (lambda ix: ix.search(Q, 2.0), ValueError, "k must be a positive integer"),
    "search-k-str": (lambda ix: ix.search(Q, "5"), ValueError, "k must be a positive integer"),
    "search-k-bool": (lambda ix: ix.search(Q, True), ValueError, "k must be a positive integer"),
    "search-k-None": (lambda ix: ix.search(Q, None), ValueError, "k must be a positive integer"),
    "search-k-above-ntotal": (lambda ix: ix.search(Q, 40), ValueError, "k=40 exceeds the 39 vectors"),
    "search-empty-queries-k-0": (lambda ix: ix.search(Q[:0], 0), ValueError, "k must be a positive integer"),
    "search-filter-float": (lambda ix: ix.search(Q, 5, filter=np.array([1.5])), TypeError, "filter must be integers"),
    "search-filter-strings": (lambda ix: ix.search(Q, 5, filter=["a"]), TypeError, "filter must be integers"),
    "search-filter-2d": (lambda ix: ix.search(Q, 5, filter=np.zeros((2, 2), np.int64)), ValueError, "filter must be one-dimensional"),
    # reconstruct
    "reconstruct-unknown": (lambda ix: ix.reconstruct(999), KeyError, r"ids not in the index: \[999\]"),
    "reconstruct-removed": (lambda ix: ix.reconstruct([0, 1]), KeyError, r"ids not in the index: \[0\]"),
    "reconstruct-negative": (lambda ix: ix.reconstruct(-1), KeyError, "ids not in the index"),
    "reconstruct-float": (lambda ix: ix.reconstruct(1.0), TypeError, "ids must be integers"),
    "reconstruct-torch-float": (lambda ix: ix.reconstruct(torch.tensor([1.0])), TypeError, "ids must be integers"),
    # to
    "to-unknown-device": (lambda ix: ix.to("gpu0"), ValueError, "device 'gpu0' is not available"),
    "to-missing-device": (lambda ix: ix.to("cuda:99"), ValueError, "device 'cuda:99' is not available"),
    # verify, refresh: wrong kind of index
    "refresh-writer": (lambda ix: ix.refresh(), ValueError, "refresh is for an index opened read-only"),
}


@cases(INDEX_CALLS)
def test_index_calls_refuse_and_change_nothing(case, stored):
    call, error, match = case
    index, path = stored
    before = snapshot(index, path)
    with pytest.raises(error, match=match):
        call(index)
    assert snapshot(index, path) == before
    assert index.device.type == "cpu"


def test_verify_refuses_an_in_memory_index():
    index, _ = filled("memory", None)
    with pytest.raises(ValueError, match="verify checks files on disk"):
        index.verify()


@pytest.mark.parametrize("to_torch", [False, True], ids=["numpy", "torch"])
def test_search_with_no_queries_returns_empty_results(stored, to_torch):
    """``(0, dim)`` queries are not an error: ``(0, k)`` results of the caller's kind, like FAISS."""
    index, _ = stored
    queries = torch.zeros(0, D) if to_torch else np.zeros((0, D), np.float32)
    scores, ids = index.search(queries, 5)
    assert tuple(scores.shape) == (0, 5) and tuple(ids.shape) == (0, 5)
    assert isinstance(ids, torch.Tensor) == to_torch


def test_add_when_sequential_ids_run_out(stored):
    index, path = stored
    index.add_with_ids(X[:1], [np.iinfo(np.int64).max])
    before = snapshot(index, path)
    with pytest.raises(ValueError, match="no 2 sequential int64 ids left"):
        index.add(X[:2])
    assert snapshot(index, path) == before


def test_failed_to_keeps_the_index_usable(stored):
    """A refused ``to(device)`` leaves the index scanning where it was."""
    index, path = stored
    before = snapshot(index, path)
    with pytest.raises(ValueError, match="not available"):
        index.to("cuda:99")
    assert index.device.type == "cpu" and snapshot(index, path) == before


# ---- empty, closed and read-only indexes -------------------------------------------------------

EMPTY_INDEX = {
    "search-empty-index": (lambda ix: None, ValueError, "the index is empty"),
    "search-every-row-removed": (lambda ix: (ix.add(X[:3]), ix.remove_ids([0, 1, 2])), ValueError, "the index is empty"),
}


@cases(EMPTY_INDEX)
def test_search_on_an_empty_index(case):
    prepare, error, match = case
    index = TurboQuantIndex(D, 4)
    prepare(index)
    with pytest.raises(error, match=match):
        index.search(Q, 1)
    with pytest.raises(error, match=match):
        index.search(Q[:0], 1)
    assert index.ntotal == 0


CLOSED_CALLS = {
    "closed-add": lambda ix: ix.add(X[:1]),
    "closed-add_with_ids": lambda ix: ix.add_with_ids(X[:1], [100]),
    "closed-remove_ids": lambda ix: ix.remove_ids([1]),
    "closed-search": lambda ix: ix.search(Q, 1),
    "closed-reconstruct": lambda ix: ix.reconstruct(1),
    "closed-save": lambda ix: ix.save(ix.saved_to),
    "closed-to": lambda ix: ix.to("cpu"),
    "closed-flush": lambda ix: ix.flush(),
    "closed-verify": lambda ix: ix.verify(),
    "closed-refresh": lambda ix: ix.refresh(),
}


@pytest.mark.parametrize("call", list(CLOSED_CALLS.values()), ids=list(CLOSED_CALLS))
def test_closed_index_refuses_use(call, tmp_path):
    index, path = filled("disk", tmp_path)
    index.saved_to = tmp_path / "copy"
    index.close()
    before = files_of(tmp_path)
    with pytest.raises(ValueError, match="the index is closed"):
        call(index)
    assert files_of(tmp_path) == before
    with tqindex.open(path) as reopened:
        assert reopened.ntotal == 39


READ_ONLY_CALLS = {
    "read-only-add": lambda ix: ix.add(X[:1]),
    "read-only-add-empty": lambda ix: ix.add(X[:0]),
    "read-only-add_with_ids": lambda ix: ix.add_with_ids(X[:1], [100]),
    "read-only-remove_ids": lambda ix: ix.remove_ids([1]),
}


@pytest.mark.parametrize("call", list(READ_ONLY_CALLS.values()), ids=list(READ_ONLY_CALLS))
def test_read_only_index_refuses_writes(call, tmp_path):
    writer, path = filled("disk", tmp_path)
    writer.close()
    with tqindex.open(path, "r") as index:
        before = snapshot(index, path)
        with pytest.raises(ValueError, match=r"open read-only \(mode='r'\)"):
            call(index)
        assert snapshot(index, path) == before


# ---- tqindex.open and save ---------------------------------------------------------------------


def _saved(tmp_path: Path) -> Path:
    index, path = filled("disk", tmp_path)
    index.close()
    return path


OPEN = {
    "open-missing-path": (lambda t: (t / "nope", {}), IndexFormatError, "no such directory"),
    "open-a-file": (lambda t: (_a_file(t), {}), IndexFormatError, "not a directory"),
    "open-empty-dir": (lambda t: ((t / "empty").mkdir() or t / "empty", {}), IndexFormatError, "not a tqindex index"),
    "open-foreign-dir": (lambda t: (_nonempty_dir(t), {}), IndexFormatError, "not a tqindex index"),
    "open-mode-w": (lambda t: (_saved(t), {"mode": "w"}), StorageError, "mode must be 'r' or 'a'"),
    "open-mode-None": (lambda t: (_saved(t), {"mode": None}), StorageError, "mode must be 'r' or 'a'"),
    "open-chunk_rows-0": (lambda t: (_saved(t), {"mode": "a", "chunk_rows": 0}), ValueError, "chunk_rows must be a positive integer"),
    "open-backend": (lambda t: (_saved(t), {"mode": "a", "backend": "gpu"}), ValueError, "backend must be one of"),
    "open-path-None": (lambda t: (None, {}), TypeError, "path must be a str or os.PathLike, got NoneType"),
}


@cases(OPEN)
def test_open(case, tmp_path):
    make, error, match = case
    path, kwargs = make(tmp_path)
    before = files_of(tmp_path)
    with pytest.raises(error, match=match):
        tqindex.open(path, **kwargs)
    assert files_of(tmp_path) == before
    if path is not None and (path / "manifest.json").exists():  # the refused open took no writer lock
        tqindex.open(path, "a").close()


SAVE = {
    "save-nonempty-dir": (_nonempty_dir, StorageError, "directory is not empty"),
    "save-over-an-index": (_saved, StorageError, "directory is not empty"),
    "save-a-file": (_a_file, StorageError, "exists and is not a directory"),
}


@cases(SAVE)
def test_save_refuses_an_occupied_path(case, tmp_path):
    make, error, match = case
    target = make(tmp_path)
    index, _ = filled("memory", tmp_path)
    before = snapshot(index, None), files_of(tmp_path)
    with pytest.raises(error, match=match):
        index.save(target)
    assert (snapshot(index, None), files_of(tmp_path)) == before


# ---- tqindex.datasets --------------------------------------------------------------------------

T = np.arange(30).reshape(10, 3)


def _text_file(tmp_path: Path) -> Path:
    (tmp_path / "data.hdf5").write_text("not hdf5")
    return tmp_path / "data.hdf5"


def _other_hdf5(tmp_path: Path) -> Path:
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "other.hdf5", "w") as f:
        f.create_dataset("vectors", data=np.zeros((3, 4)))
    return tmp_path / "other.hdf5"


def _knn(train, test, k=3, metric="ip", **kwargs):
    from tqindex.datasets import exact_knn

    return exact_knn(train, test, k, metric, progress=False, **kwargs)


def _synthetic(**kwargs):
    from tqindex.datasets import make_synthetic

    return make_synthetic(**{"kind": "gaussian", "n": 20, "n_queries": 3, "dim": 8, "progress": False, **kwargs})


def _recall(true, found, k, at_1=False):
    from tqindex.datasets import recall_1_at, recall_at

    return (recall_1_at if at_1 else recall_at)(true, found, k)


def _write_vecs(path, array):
    from tqindex.datasets import write_vecs

    return write_vecs(path, array)


def _write_hdf5(path, train, test):
    from tqindex.datasets import write_hdf5

    pytest.importorskip("h5py")
    return write_hdf5(path, train, test, distance="dot", progress=False)


def _read_hdf5(path):
    from tqindex.datasets import read_hdf5

    pytest.importorskip("h5py")
    return read_hdf5(path, progress=False)


DATASETS = {
    "read_hdf5-missing": (lambda t: _read_hdf5(t / "nope.hdf5"), FileNotFoundError, "no such file"),
    "read_hdf5-directory": (lambda t: _read_hdf5(t), IsADirectoryError, "is a directory"),
    "read_hdf5-not-hdf5": (lambda t: _read_hdf5(_text_file(t)), ValueError, "not a readable HDF5 file"),
    "read_hdf5-foreign-hdf5": (lambda t: _read_hdf5(_other_hdf5(t)), ValueError, r"missing dataset\(s\)"),
    "exact_knn-dim-mismatch": (lambda t: _knn(X, Q[:, :8]), ValueError, "must share d"),
    "exact_knn-1d": (lambda t: _knn(X[0], Q), ValueError, "must share d"),
    "exact_knn-k-0": (lambda t: _knn(X, Q, 0), ValueError, r"k must be an integer in \[1, n=40\]"),
    "exact_knn-k-above-n": (lambda t: _knn(X, Q, 41), ValueError, r"k must be an integer in \[1, n=40\]"),
    "exact_knn-k-float": (lambda t: _knn(X, Q, 2.5), ValueError, "k must be an integer"),
    "exact_knn-empty-train": (lambda t: _knn(X[:0], Q), ValueError, r"n=0"),
    "exact_knn-metric": (lambda t: _knn(X, Q, metric="cosine"), ValueError, "metric must be one of"),
    "exact_knn-strings": (lambda t: _knn(X.astype(str), Q), TypeError, "train must hold real numbers"),
    "exact_knn-complex": (lambda t: _knn(X, Q.astype(np.complex64)), TypeError, "test must hold real numbers"),
    "exact_knn-nan-train": (lambda t: _knn(np.concatenate([X, NAN_ROW]), Q, chunk_rows=16), ValueError, "train contains NaN or inf in row 40"),
    "exact_knn-inf-test": (lambda t: _knn(X, INF_ROW), ValueError, "test contains NaN or inf in row 0"),
    "exact_knn-beyond-float32": (lambda t: _knn(beyond_float32(X, 33), Q, chunk_rows=16), ValueError, "train holds values beyond the float32 range in row 33"),
    "exact_knn-scores-overflow": (lambda t: _knn(X * np.float32(1e30), Q * np.float32(1e30)), ValueError, "test row 0: its scores .* overflow float32"),
    "write_vecs-beyond-float32": (lambda t: _write_vecs(t / "x.fvecs", beyond_float32(X, 5)), ValueError, "x.fvecs holds values beyond the float32 range in row 5"),
    "write_hdf5-beyond-float32": (lambda t: _write_hdf5(t / "x.hdf5", beyond_float32(X, 3), Q), ValueError, "train holds values beyond the float32 range in row 3"),
    "exact_knn-chunk_rows-0": (lambda t: _knn(X, Q, chunk_rows=0), ValueError, "chunk_rows and query_rows must be positive"),
    "recall_at-row-mismatch": (lambda t: _recall(T, T[:5], 3), ValueError, "same m"),
    "recall_at-1d": (lambda t: _recall(T[0], T[0], 3), ValueError, r"need two \(m, \*\) id arrays"),
    "recall_at-k-above-width": (lambda t: _recall(T, T, 4), ValueError, "k=4 does not fit"),
    "recall_at-k-0": (lambda t: _recall(T, T, 0), ValueError, "k=0 does not fit"),
    "recall_at-k-float": (lambda t: _recall(T, T, 1.5), ValueError, "k=1.5 does not fit"),
    "recall_at-float-ids": (lambda t: _recall(T.astype(float), T, 3), TypeError, "ids must be integers"),
    "recall_at-no-queries": (lambda t: _recall(T[:0], T[:0], 3), ValueError, "need at least one query"),
    "recall_1_at-row-mismatch": (lambda t: _recall(T, T[:5], 3, at_1=True), ValueError, "same m"),
    "recall_1_at-no-queries": (lambda t: _recall(T[:0], T[:0], 3, at_1=True), ValueError, "need at least one query"),
    "make_synthetic-n-0": (lambda t: _synthetic(n=0), ValueError, "must be positive"),
    "make_synthetic-dim-negative": (lambda t: _synthetic(dim=-8), ValueError, "must be positive"),
    "make_synthetic-k-0": (lambda t: _synthetic(k=0), ValueError, "must be positive"),
    "make_synthetic-n-float": (lambda t: _synthetic(n=10.5), TypeError, "must be integers; got n=10.5"),
    "make_synthetic-dim-str": (lambda t: _synthetic(dim="8"), TypeError, "must be integers; got dim='8'"),
    "make_synthetic-seed-negative": (lambda t: _synthetic(seed=-1), ValueError, "seed must be >= 0"),
    "make_synthetic-kind": (lambda t: _synthetic(kind="uniform"), ValueError, "kind must be one of"),
    "make_synthetic-metric": (lambda t: _synthetic(metric="l2"), ValueError, "metric must be one of"),
}


@cases(DATASETS)
def test_datasets(case, tmp_path):
    call, error, match = case
    with pytest.raises(error, match=match):
        call(tmp_path)


# ---- tqindex.kv.TurboQuantCache ----------------------------------------------------------------

KV_CACHE = {
    "TurboQuantCache-key_bits-0": (dict(key_bits=0), ValueError, "bits must be in"),
    "TurboQuantCache-value_bits-9": (dict(value_bits=9), ValueError, "bits must be in"),
    "TurboQuantCache-bits-not-eighths": (dict(key_bits=3.3), ValueError, "steps of 1/8"),
    "TurboQuantCache-bits-str": (dict(value_bits="4"), TypeError, "bits must be a number"),
    "TurboQuantCache-key_variant": (dict(key_variant="qjl"), ValueError, "variant must be one of"),
    "TurboQuantCache-value_variant": (dict(value_variant=None), ValueError, "variant must be one of"),
    "TurboQuantCache-window-negative": (dict(window=-1), ValueError, "window must be an integer >= 0"),
    "TurboQuantCache-window-float": (dict(window=1.5), ValueError, "window must be an integer >= 0"),
    "TurboQuantCache-chunk-0": (dict(chunk=0), ValueError, "chunk must be an integer >= 1"),
    "TurboQuantCache-chunk-negative": (dict(chunk=-32), ValueError, "chunk must be an integer >= 1"),
    "TurboQuantCache-backend": (dict(backend="cuda"), ValueError, "backend must be one of"),
    "TurboQuantCache-factor_dtype-int": (dict(factor_dtype=torch.int8), TypeError, "factor_dtype must be a floating torch dtype, .log8. or .auto."),
    "TurboQuantCache-factor_dtype-str": (dict(factor_dtype="float16"), TypeError, "factor_dtype must be a floating torch dtype, .log8. or .auto."),
    "TurboQuantCache-skip_layers-negative": (dict(skip_layers=[-1]), ValueError, "need config="),
    "TurboQuantCache-skip_layers-str": (dict(skip_layers=["0"]), TypeError, "skip_layers must be layer indices"),
    "TurboQuantCache-seed-negative": (dict(seed=-1), ValueError, "seed must be a non-negative integer"),
}


@cases(KV_CACHE)
def test_kv_cache_arguments(case):
    kv = pytest.importorskip("tqindex.kv")
    kwargs, error, match = case
    with pytest.raises(error, match=match):
        kv.TurboQuantCache(**kwargs)
