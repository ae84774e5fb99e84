"""Damaged or foreign index directories: refused on open (or by verify) with a specific
tqindex.errors exception that names the file; the files are left as they were."""

import json
import shutil

import numpy as np
import pytest

import tqindex
from tqindex.errors import CorruptIndexError, IndexFormatError
from tqindex.storage import _manifest_checksum

N, DIM = 3000, 48


@pytest.fixture
def index_path(tmp_path):
    path = tmp_path / "index"
    vectors = np.random.default_rng(0).standard_normal((N, DIM), dtype=np.float32)
    with tqindex.TurboQuantIndex(DIM, 3, path=path) as index:
        index.add(vectors, progress=False)
        index.remove_ids([5, 17])
    return path


def flip(file, at):
    data = bytearray(file.read_bytes())
    data[at] ^= 0x01
    file.write_bytes(bytes(data))


def edit_manifest(path, change, resign=True):
    m = json.loads((path / "manifest.json").read_text())
    change(m)
    if resign:
        m["checksum"] = _manifest_checksum(m)
    (path / "manifest.json").write_text(json.dumps(m))


def snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())} if path.is_dir() else None


REFUSED_ON_OPEN = {  # damage: (spoil, exception, file named in the message)
    "truncated-codes": (lambda p: (p / "codes.col").write_bytes((p / "codes.col").read_bytes()[:-7]), CorruptIndexError, "codes.col"),
    "empty-factors": (lambda p: (p / "factors.col").write_bytes(b""), CorruptIndexError, "factors.col"),
    "flipped-manifest-byte": (lambda p: flip(p / "manifest.json", 200), CorruptIndexError, "manifest.json"),
    "flipped-rotation-byte": (lambda p: flip(p / "rotation.npy", 300), CorruptIndexError, "rotation.npy"),
    "flipped-levels-byte": (lambda p: flip(p / "levels.npy", -1), CorruptIndexError, "levels.npy"),
    "newer-format": (lambda p: edit_manifest(p, lambda m: m.update(version=99), resign=False), IndexFormatError, "manifest.json"),
    "more-rows-than-files": (
        lambda p: edit_manifest(p, lambda m: [m["columns"][c].update(rows=N + 1) for c in ("codes", "factors", "ids")]),
        CorruptIndexError,
        "codes.col",
    ),
    "columns-disagree": (lambda p: edit_manifest(p, lambda m: m["columns"]["ids"].update(rows=N - 1)), CorruptIndexError, "different row counts"),
    "deletion-log-out-of-range": (
        lambda p: (p / "deleted.col").write_bytes(np.array([N + 5, 17], "<i8").tobytes()),
        CorruptIndexError,
        "deletion log",
    ),
    "codec-config-changed": (lambda p: edit_manifest(p, lambda m: m["meta"]["codec"].update(bits=4)), CorruptIndexError, "not a valid tqindex index"),
    "foreign-directory": (lambda p: (shutil.rmtree(p), p.mkdir(), (p / "data.bin").write_bytes(b"\0" * 64)), IndexFormatError, "manifest.json"),
    "foreign-manifest": (lambda p: (p / "manifest.json").write_text('{"format": "faiss", "version": 1}'), IndexFormatError, "faiss"),
    "a-file": (lambda p: (shutil.rmtree(p), p.write_bytes(b"IVF")), IndexFormatError, "not a directory"),
}


@pytest.mark.parametrize("mode", ["r", "a"])
@pytest.mark.parametrize("damage", list(REFUSED_ON_OPEN))
def test_damaged_index_is_refused_on_open(index_path, damage, mode):
    spoil, error, named = REFUSED_ON_OPEN[damage]
    spoil(index_path)
    before = snapshot(index_path)
    with pytest.raises(error, match=named) as caught:
        tqindex.open(index_path, mode)
    assert str(index_path) in str(caught.value)
    assert isinstance(caught.value, tqindex.TQIndexError)
    assert snapshot(index_path) == before  # refusing touched nothing
    if mode == "a":  # and released the writer lock
        with pytest.raises(error):
            tqindex.open(index_path, "a")


@pytest.mark.parametrize(
    "file, at",
    [("codes.col", 0), ("codes.col", (N // 2) * 18 + 5), ("factors.col", -1), ("ids.col", 8 * 100), ("deleted.col", 0)],
)
def test_verify_finds_flipped_bytes_in_the_columns(index_path, file, at):
    with tqindex.open(index_path) as index:
        assert index.verify() == {"files": 10, "bytes": N * (18 + 4 + 8) + 16, "blocks": 4, "rows": N, "ntotal": N - 2}
    flip(index_path / file, at)
    with tqindex.open(index_path) as index, pytest.raises(CorruptIndexError, match=rf"{file}: bytes \[\d+, \d+\) \(rows"):
        index.verify()


def test_verify_is_for_on_disk_indexes():
    index = tqindex.TurboQuantIndex(DIM, 3)
    with pytest.raises(ValueError, match="in memory"):
        index.verify()
