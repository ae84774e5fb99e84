"""Tests of tqindex.storage: round trips, commit point, crash safety, refusals."""

import json
import re
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from tqindex.errors import CorruptIndexError, IndexFormatError, IndexLockedError, StorageError
from tqindex.storage import BLOCK_BYTES, FORMAT_VERSION, ColumnSpec, ColumnStore, _manifest_checksum

FMT = "tqtest"
META = {"d": 4, "bits": [2, 3], "name": "x", "scale": 0.1, "nested": {"seed": 7, "flag": True, "none": None}}
COLUMNS = {
    "codes": ColumnSpec("uint8", (3,)),
    "norms": ColumnSpec("float32", ()),
    "deleted": ColumnSpec("int64", ()),
}


def fixed_arrays():
    rng = np.random.default_rng(0)
    return {"rotation": rng.standard_normal((4, 4)).astype(np.float32), "codebook": np.linspace(-1, 1, 8)}


def make(path, **kw):
    return ColumnStore.create(path, format_name=FMT, meta=META, fixed=fixed_arrays(), columns=COLUMNS, **kw)


def codes(n, start=0):
    return (np.arange(start * 3, (start + n) * 3) % 251).astype(np.uint8).reshape(n, 3)


def snapshot(path):
    """Every file under `path` with its bytes (an empty dict when `path` does not exist)."""
    path = Path(path)
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def store_path(tmp_path):
    """A committed store: codes and norms 5 rows, deleted 2 rows."""
    path = tmp_path / "idx"
    with make(path) as s:
        s.append("codes", codes(5))
        s.append("norms", np.arange(5, dtype=np.float32) / 3)
        s.append("deleted", np.array([1, 3]))
    return path


def edit_manifest(path, change, *, keep_checksum=False):
    """Change the manifest; by default re-sign it, as a writer with a bug (not a bit flip) would."""
    m = json.loads((path / "manifest.json").read_text())
    change(m)
    if not keep_checksum:
        m["checksum"] = _manifest_checksum(m)
    (path / "manifest.json").write_text(json.dumps(m))


# ---- round trips ----


def test_create_open_round_trip(tmp_path):
    make(tmp_path / "idx").close()
    with ColumnStore.open(tmp_path / "idx", format_name=FMT) as s:
        assert s.meta == META
        expected = fixed_arrays()
        assert set(s.fixed) == set(expected)
        for name, array in expected.items():
            assert s.fixed[name].dtype == array.dtype and s.fixed[name].shape == array.shape
            assert s.fixed[name].tobytes() == array.tobytes()
        assert s.columns == {
            "codes": ColumnSpec("|u1", (3,)),
            "norms": ColumnSpec("<f4", ()),
            "deleted": ColumnSpec("<i8", ()),
        }
        for name, spec in COLUMNS.items():
            assert s.rows(name) == 0
            assert s.column(name).shape == (0, *spec.row_shape)
            assert s.column(name).dtype == np.dtype(spec.dtype)


def test_manifest_layout(store_path):
    m = json.loads((store_path / "manifest.json").read_text())
    assert m["format"] == FMT and m["version"] == FORMAT_VERSION and m["meta"] == META
    assert m["fixed"]["rotation"]["shape"] == [4, 4] and len(m["fixed"]["rotation"]["sha256"]) == 64
    assert m["columns"]["codes"] == {
        "file": "codes.col",
        "dtype": "|u1",
        "row_shape": [3],
        "rows": 5,
        "tail_crc": zlib.crc32(codes(5).tobytes()),
    }
    assert m["checksum"] == _manifest_checksum(m)
    assert m["columns"]["deleted"]["rows"] == 2
    assert (store_path / "codes.col").stat().st_size == 5 * 3


def test_fixed_and_meta_are_copies(tmp_path):
    meta = {"a": [1, 2]}
    s = ColumnStore.create(tmp_path / "idx", format_name=FMT, meta=meta, fixed=fixed_arrays(), columns=COLUMNS)
    meta["a"].append(3)  # the caller's later edits are not written on commit
    s.append("norms", np.ones(1, np.float32))
    s.close()
    s = ColumnStore.open(tmp_path / "idx", format_name=FMT)
    assert s.meta == {"a": [1, 2]}
    with pytest.raises(ValueError):
        s.fixed["rotation"][0, 0] = 1.0  # read-only in RAM
    s.close()


def test_append_commit_reopen(store_path):
    with ColumnStore.open(store_path, format_name=FMT) as s:
        np.testing.assert_array_equal(s.column("codes"), codes(5))
        np.testing.assert_array_equal(s.column("norms"), np.arange(5, dtype=np.float32) / 3)
        np.testing.assert_array_equal(s.column("deleted"), [1, 3])
    with ColumnStore.open(store_path, format_name=FMT, mode="a") as s:
        s.append("codes", codes(2, start=5))
    with ColumnStore.open(store_path, format_name=FMT) as s:
        np.testing.assert_array_equal(s.column("codes"), codes(7))


def test_independent_column_counts(store_path):
    with ColumnStore.open(store_path, format_name=FMT, mode="a") as s:
        assert (s.rows("codes"), s.rows("norms"), s.rows("deleted")) == (5, 5, 2)
        s.append("deleted", np.array([0]))
    with ColumnStore.open(store_path, format_name=FMT) as s:
        assert (s.rows("codes"), s.rows("norms"), s.rows("deleted")) == (5, 5, 3)
        np.testing.assert_array_equal(s.column("deleted"), [1, 3, 0])


def test_uncommitted_rows_invisible_to_reader(store_path):
    with ColumnStore.open(store_path, format_name=FMT, mode="a") as w:
        w.append("codes", codes(4, start=5))
        assert (w.rows("codes"), w.pending_rows("codes")) == (5, 9)
        with ColumnStore.open(store_path, format_name=FMT) as r:
            assert r.rows("codes") == r.pending_rows("codes") == 5
            np.testing.assert_array_equal(r.column("codes"), codes(5))
        assert len(w.column("codes")) == 5  # the writer's column() shows committed rows only


def test_exception_in_with_block_drops_pending_rows(store_path):
    with pytest.raises(RuntimeError):
        with ColumnStore.open(store_path, format_name=FMT, mode="a") as s:
            s.append("codes", codes(3, start=5))
            raise RuntimeError("boom")
    with ColumnStore.open(store_path, format_name=FMT) as s:
        np.testing.assert_array_equal(s.column("codes"), codes(5))


def test_close_commits_and_is_idempotent(store_path):
    s = ColumnStore.open(store_path, format_name=FMT, mode="a")
    s.append("norms", np.array([9.0], np.float32))
    s.close()
    s.close()
    with pytest.raises(StorageError, match="closed"):
        s.append("norms", np.array([9.0], np.float32))
    with ColumnStore.open(store_path, format_name=FMT) as r:
        assert r.rows("norms") == 6 and r.column("norms")[-1] == 9.0


def test_column_remaps_after_commit(tmp_path):
    with make(tmp_path / "idx") as s:
        assert s.column("codes").shape == (0, 3)
        s.append("codes", codes(2))
        assert s.column("codes").shape == (0, 3)
        s.commit()
        first = s.column("codes")
        np.testing.assert_array_equal(first, codes(2))
        assert not first.flags.writeable
        s.append("codes", codes(3, start=2))
        s.commit()
        np.testing.assert_array_equal(s.column("codes"), codes(5))


# ---- crash safety ----

CRASH_SCRIPT = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from storage import ColumnSpec, ColumnStore
s = ColumnStore.create(sys.argv[2], format_name="tqtest", meta={"k": 1}, fixed={},
                       columns={"codes": ColumnSpec("uint8", (3,)), "ids": ColumnSpec("int64", ())})
s.append("codes", (np.arange(30) % 251).astype(np.uint8).reshape(10, 3))
s.append("ids", np.arange(10) * 7)
s.commit()
s.append("codes", np.full((5, 3), 255, np.uint8))
s.append("ids", np.arange(100, 105))
print("appended", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_9_keeps_committed_rows_and_drops_the_rest(tmp_path):
    path = tmp_path / "idx"
    module_dir = Path(__file__).resolve().parents[1] / "tqindex"
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(module_dir), str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "appended" in proc.stdout
    assert (path / "codes.col").stat().st_size == 15 * 3  # the uncommitted tail reached the file

    with ColumnStore.open(path, format_name="tqtest") as s:
        assert s.meta == {"k": 1}
        assert (s.rows("codes"), s.rows("ids")) == (10, 10)
        np.testing.assert_array_equal(s.column("codes"), codes(10))
        np.testing.assert_array_equal(s.read_rows("ids", 0, 10), np.arange(10) * 7)
    assert (path / "codes.col").stat().st_size == 15 * 3  # mode "r" leaves the tail alone

    with ColumnStore.open(path, format_name="tqtest", mode="a") as s:  # the dead writer's lock is gone
        assert (path / "codes.col").stat().st_size == 15 * 3  # opening alone changes nothing
        s.append("codes", codes(2, start=10))
        assert (path / "codes.col").stat().st_size == 12 * 3  # the tail was cut before appending
        s.append("ids", np.array([70, 77]))
    with ColumnStore.open(path, format_name="tqtest") as s:
        np.testing.assert_array_equal(s.column("codes"), codes(12))
        np.testing.assert_array_equal(s.column("ids"), np.arange(12) * 7)


def test_stale_manifest_temp_file_is_ignored(store_path):
    (store_path / "manifest.json.tmp").write_bytes(b"{half a manif")  # a crash mid-commit
    with ColumnStore.open(store_path, format_name=FMT, mode="a") as s:
        assert s.rows("codes") == 5
        s.append("codes", codes(1, start=5))
    with ColumnStore.open(store_path, format_name=FMT) as s:
        assert s.rows("codes") == 6


# ---- writers ----


def test_mode_r_refuses_writes(store_path):
    before = snapshot(store_path)
    with ColumnStore.open(store_path, format_name=FMT) as s:
        with pytest.raises(StorageError, match="read-only"):
            s.append("codes", codes(1))
        with pytest.raises(StorageError, match="read-only"):
            s.commit()
    assert snapshot(store_path) == before


def test_second_writer_refused(store_path):
    with ColumnStore.open(store_path, format_name=FMT, mode="a"):
        with pytest.raises(IndexLockedError, match="already open for writing"):
            ColumnStore.open(store_path, format_name=FMT, mode="a")
        with pytest.raises(IndexLockedError, match="already open for writing"):
            make(store_path, overwrite=True)
        ColumnStore.open(store_path, format_name=FMT).close()  # readers are welcome
    ColumnStore.open(store_path, format_name=FMT, mode="a").close()  # free again after close


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(np.zeros((2, 3), np.int64), id="unsafe-dtype"),
        pytest.param(np.zeros((2, 3), np.float32), id="float-into-uint8"),
        pytest.param(np.zeros((2, 4), np.uint8), id="row-too-long"),
        pytest.param(np.zeros(3, np.uint8), id="missing-row-axis"),
        pytest.param(np.zeros((1, 2, 3), np.uint8), id="extra-axis"),
    ],
)
def test_append_refuses_wrong_dtype_or_shape(store_path, values):
    with ColumnStore.open(store_path, format_name=FMT, mode="a") as s:
        before = snapshot(store_path)
        with pytest.raises(StorageError, match="codes"):
            s.append("codes", values)
        assert s.pending_rows("codes") == 5
        assert snapshot(store_path) == before


def test_append_accepts_safe_casts(tmp_path):
    with make(tmp_path / "idx") as s:
        s.append("deleted", np.array([4, 5], np.uint8))  # uint8 -> int64
        s.append("norms", np.array([0.5], np.float16))  # float16 -> float32
        s.append("norms", np.array([], np.float32))  # zero rows is fine
    with ColumnStore.open(tmp_path / "idx", format_name=FMT) as s:
        np.testing.assert_array_equal(s.column("deleted"), [4, 5])
        assert s.column("deleted").dtype == np.int64
        np.testing.assert_array_equal(s.column("norms"), [0.5])


def test_unknown_column_refused(store_path):
    with ColumnStore.open(store_path, format_name=FMT) as s:
        with pytest.raises(StorageError, match="no column 'ids'"):
            s.rows("ids")


# ---- reading ----


def test_read_rows_equals_column_slices(store_path):
    with ColumnStore.open(store_path, format_name=FMT) as s:
        col = s.column("codes")
        for start, stop in [(0, 5), (1, 4), (2, 2), (4, 5)]:
            np.testing.assert_array_equal(s.read_rows("codes", start, stop), col[start:stop])
        out = np.empty((3, 3), np.uint8)
        assert s.read_rows("codes", 2, 5, out=out) is out
        np.testing.assert_array_equal(out, col[2:5])
        np.testing.assert_array_equal(s.read_rows("norms", 1, 3), s.column("norms")[1:3])


@pytest.mark.parametrize("start, stop", [(-1, 2), (3, 2), (0, 6), (5, 6)])
def test_read_rows_out_of_range(store_path, start, stop):
    with ColumnStore.open(store_path, format_name=FMT) as s:
        with pytest.raises(StorageError, match="out of range"):
            s.read_rows("codes", start, stop)


def test_read_rows_sees_only_committed_rows(store_path):
    with ColumnStore.open(store_path, format_name=FMT, mode="a") as s:
        s.append("codes", codes(2, start=5))
        with pytest.raises(StorageError, match="out of range"):
            s.read_rows("codes", 0, 6)


@pytest.mark.parametrize(
    "out",
    [np.empty((2, 3), np.uint8), np.empty((3, 3), np.int64), np.empty((3, 6), np.uint8)[:, ::2]],
    ids=["wrong-shape", "wrong-dtype", "not-contiguous"],
)
def test_read_rows_bad_out_refused(store_path, out):
    with ColumnStore.open(store_path, format_name=FMT) as s:
        with pytest.raises(StorageError, match="out must be"):
            s.read_rows("codes", 0, 3, out=out)


# ---- refusals on open ----


def flip_last_byte(file):
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))


def flip_byte_in_manifest(path):
    """Change one digit of the manifest (a bit flip that keeps it valid JSON)."""
    text = (path / "manifest.json").read_text()
    at = text.index('"rows": 5') + len('"rows": ')
    (path / "manifest.json").write_text(text[:at] + "4" + text[at + 1 :])


def cut_file(file, n):
    file.write_bytes(file.read_bytes()[:-n])


DAMAGES = {  # damage: (spoil, exception, message)
    "missing-dir": (lambda p: __import__("shutil").rmtree(p), IndexFormatError, "no such directory"),
    "not-a-dir": (lambda p: (__import__("shutil").rmtree(p), p.write_bytes(b"x")), IndexFormatError, "not a directory"),
    "other-directory": (
        lambda p: [f.unlink() for f in p.iterdir()] and (p / "photo.jpg").write_bytes(b"\xff\xd8"),
        IndexFormatError,
        "not a tqtest index",
    ),
    "no-manifest": (lambda p: (p / "manifest.json").unlink(), IndexFormatError, "not a tqtest index"),
    "garbage-manifest": (lambda p: (p / "manifest.json").write_bytes(b"{not json"), CorruptIndexError, "not valid JSON"),
    "manifest-not-object": (lambda p: (p / "manifest.json").write_bytes(b"[1, 2]"), IndexFormatError, "no format name"),
    "flipped-manifest-byte": (flip_byte_in_manifest, CorruptIndexError, "checksum does not match"),
    "missing-key": (lambda p: edit_manifest(p, lambda m: m.pop("columns")), CorruptIndexError, "'columns'"),
    "foreign": (lambda p: edit_manifest(p, lambda m: m.update(format="faiss")), IndexFormatError, "foreign store"),
    "newer-version": (
        lambda p: edit_manifest(p, lambda m: m.update(version=FORMAT_VERSION + 1), keep_checksum=True),
        IndexFormatError,
        "newer tqindex",
    ),
    "older-version": (lambda p: edit_manifest(p, lambda m: m.update(version=1)), IndexFormatError, "predates checksums"),
    "tampered-fixed": (lambda p: flip_last_byte(p / "rotation.npy"), CorruptIndexError, "'rotation' is corrupt"),
    "fixed-shape-differs": (
        lambda p: edit_manifest(p, lambda m: m["fixed"]["rotation"].update(shape=[2, 8])),
        CorruptIndexError,
        "'rotation' is corrupt",
    ),
    "missing-fixed": (lambda p: (p / "codebook.npy").unlink(), CorruptIndexError, "'codebook' is missing"),
    "truncated-column": (lambda p: cut_file(p / "codes.col", 1), CorruptIndexError, "codes.col: .* truncated"),
    "rows-beyond-files": (
        lambda p: edit_manifest(p, lambda m: m["columns"]["norms"].update(rows=6)),
        CorruptIndexError,
        "norms.col: .* truncated",
    ),
    "missing-column": (lambda p: (p / "norms.col").unlink(), CorruptIndexError, "missing"),
    "missing-checksums": (lambda p: (p / "norms.crc").unlink(), CorruptIndexError, "norms.crc: column file is missing"),
    "file-outside-store": (
        lambda p: edit_manifest(p, lambda m: m["columns"]["codes"].update(file="../codes.col")),
        CorruptIndexError,
        "names file '../codes.col'",
    ),
    "negative-rows": (lambda p: edit_manifest(p, lambda m: m["columns"]["codes"].update(rows=-1)), CorruptIndexError, "-1 rows"),
    "bad-dtype": (lambda p: edit_manifest(p, lambda m: m["columns"]["codes"].update(dtype="<U4")), CorruptIndexError, "dtype"),
}


@pytest.mark.parametrize("mode", ["r", "a"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_open_refuses_damaged_store(store_path, damage, mode):
    spoil, error, message = DAMAGES[damage]
    spoil(store_path)
    before = snapshot(store_path)
    with pytest.raises(error, match=message) as err:
        ColumnStore.open(store_path, format_name=FMT, mode=mode)
    assert str(store_path) in str(err.value)
    assert snapshot(store_path) == before
    assert store_path.exists() == (damage != "missing-dir")


def test_open_refuses_bad_mode(store_path):
    with pytest.raises(StorageError, match="mode"):
        ColumnStore.open(store_path, format_name=FMT, mode="w")


# ---- refusals on create ----


def test_create_refuses_non_store_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(StorageError, match=re.escape(str(tmp_path))):
            make(tmp_path, overwrite=overwrite)
    assert snapshot(tmp_path) == {Path("notes.txt"): b"keep me"}


def test_create_refuses_foreign_store(store_path):
    edit_manifest(store_path, lambda m: m.update(format="faiss"))
    before = snapshot(store_path)
    with pytest.raises(StorageError, match="refusing to overwrite"):
        make(store_path, overwrite=True)
    assert snapshot(store_path) == before


def test_create_overwrite_replaces_store(store_path):
    (store_path / "notes.txt").write_text("not ours")
    columns = {"ids": ColumnSpec("int64", ())}
    with ColumnStore.create(store_path, format_name=FMT, meta={}, fixed={}, columns=columns, overwrite=True) as s:
        assert s.rows("ids") == 0 and s.fixed == {}
    assert sorted(p.name for p in store_path.iterdir()) == ["ids.col", "ids.crc", "manifest.json", "notes.txt"]


BAD_CREATE_ARGS = {
    "tuple-in-meta": dict(meta={"shape": (1, 2)}),
    "int-key-in-meta": dict(meta={1: "x"}),
    "nan-in-meta": dict(meta={"x": float("nan")}),
    "object-in-meta": dict(meta={"x": object()}),
    "object-fixed": dict(fixed={"f": np.array([object()])}),
    "bad-fixed-name": dict(fixed={"../f": np.zeros(2)}),
    "bad-column-name": dict(columns={"a b": ColumnSpec("uint8", ())}),
    "string-dtype": dict(columns={"c": ColumnSpec("U4", ())}),
    "unknown-dtype": dict(columns={"c": ColumnSpec("float33", ())}),
    "zero-row-shape": dict(columns={"c": ColumnSpec("uint8", (0,))}),
    "not-a-spec": dict(columns={"c": ("uint8", ())}),
    "empty-format": dict(format_name=""),
}


@pytest.mark.parametrize("bad", list(BAD_CREATE_ARGS))
def test_create_refuses_bad_arguments(tmp_path, bad):
    args = dict(format_name=FMT, meta={}, fixed={}, columns={}) | BAD_CREATE_ARGS[bad]
    with pytest.raises(StorageError, match=re.escape(str(tmp_path / "idx"))):
        ColumnStore.create(tmp_path / "idx", **args)
    assert not (tmp_path / "idx").exists()


def test_read_at_returns_scattered_rows_in_the_order_asked(tmp_path):
    store = ColumnStore.create(tmp_path / "s", format_name="t", meta={}, fixed={}, columns={"c": ColumnSpec("int32", (3,))})
    values = np.arange(60, dtype=np.int32).reshape(20, 3)
    store.append("c", values)
    store.commit()
    rows = np.array([7, 2, 3, 4, 19, 7, 0])
    assert np.array_equal(store.read_at("c", rows), values[rows])
    assert store.read_at("c", np.array([], dtype=np.int64)).shape == (0, 3)
    with pytest.raises(StorageError, match="out of range"):
        store.read_at("c", np.array([20]))
    store.close()


# ---- checksums, verify, refresh ----


def test_block_checksums_cover_every_byte_across_sessions(tmp_path):
    """Appends of odd sizes across three writer sessions: the .crc file holds the CRC-32 of each
    1 MiB block of the column file and verify accepts it; bytes flipped anywhere are found."""
    rng = np.random.default_rng(1)
    columns = {"codes": ColumnSpec("uint8", (1000,))}
    data = rng.integers(0, 256, (2600, 1000), dtype=np.uint8)
    path, done = tmp_path / "s", 0
    ColumnStore.create(path, format_name=FMT, meta={}, fixed={}, columns=columns).close()
    for batches in ([1, 700, 3], [1100], [49, 747]):
        with ColumnStore.open(path, format_name=FMT, mode="a") as s:
            for n in batches:
                s.append("codes", data[done : done + n])
                done += n
                s.commit()
    raw = data.tobytes()
    blocks = [raw[i : i + BLOCK_BYTES] for i in range(0, len(raw), BLOCK_BYTES)]
    assert np.array_equal(np.fromfile(path / "codes.crc", "<u4"), [zlib.crc32(b) for b in blocks[:-1]])
    with ColumnStore.open(path, format_name=FMT) as s:
        assert s.verify() == {"files": 2, "bytes": len(raw), "blocks": len(blocks)}
    for at in (5, BLOCK_BYTES + 17, len(raw) - 1):  # first block, a middle block, the tail
        with open(path / "codes.col", "r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0x10]))
        with ColumnStore.open(path, format_name=FMT) as s:  # opening does not read the rows...
            with pytest.raises(CorruptIndexError, match=rf"codes.col: .*rows \d+\.\.\d+") as err:
                s.verify()  # ...verify does
        first, last = map(int, re.search(r"rows (\d+)\.\.(\d+)", str(err.value)).groups())
        assert first <= at // 1000 <= last
        with open(path / "codes.col", "r+b") as f:
            f.seek(at)
            f.write(byte)


def test_verify_refuses_a_flipped_checksum_and_a_short_checksum_file(tmp_path):
    path = tmp_path / "s"
    with ColumnStore.create(path, format_name=FMT, meta={}, fixed={}, columns={"c": ColumnSpec("uint8", (4096,))}) as s:
        s.append("c", np.ones((600, 4096), np.uint8))  # 2.34 blocks
    flip_last_byte(path / "c.crc")
    with ColumnStore.open(path, format_name=FMT) as s, pytest.raises(CorruptIndexError, match="c.col: bytes"):
        s.verify()
    cut_file(path / "c.crc", 1)
    with pytest.raises(CorruptIndexError, match="c.crc: .* truncated"):
        ColumnStore.open(path, format_name=FMT)


def test_interrupted_append_leaves_checksums_of_the_committed_rows(tmp_path):
    path = tmp_path / "s"
    s = ColumnStore.create(path, format_name=FMT, meta={}, fixed={}, columns={"c": ColumnSpec("uint8", (4096,))})
    s.append("c", np.full((300, 4096), 7, np.uint8))
    s.commit()
    s.append("c", np.full((500, 4096), 9, np.uint8))  # completes blocks past the commit point
    s._release()  # the process dies: no commit
    assert (path / "c.crc").stat().st_size > 4 * (300 * 4096 // BLOCK_BYTES)
    with ColumnStore.open(path, format_name=FMT, mode="a") as s:  # a writer cuts off the residue
        assert s.rows("c") == 300
        s.append("c", np.full((100, 4096), 5, np.uint8))
    with ColumnStore.open(path, format_name=FMT) as s:
        assert s.verify()["bytes"] == 400 * 4096
        assert np.array_equal(np.unique(s.read_rows("c", 295, 305)), [5, 7])


def test_reader_refresh_takes_new_commits_only(store_path):
    reader = ColumnStore.open(store_path, format_name=FMT)
    assert reader.refresh() is False
    with ColumnStore.open(store_path, format_name=FMT, mode="a") as writer:
        writer.append("codes", codes(4, start=5))
        writer.append("norms", np.zeros(4, np.float32))
        assert reader.refresh() is False  # appended, not committed: invisible
        writer.commit()
        writer.append("codes", codes(1, start=9))  # pending at the time of the refresh
        assert reader.refresh() is True
        assert reader.rows("codes") == 9 and reader.rows("norms") == 9
        assert np.array_equal(reader.read_rows("codes", 0, 9), codes(9))
        assert reader.column("codes").shape == (9, 3)
    assert reader.verify()["bytes"] == 9 * 3 + 9 * 4 + 2 * 8  # its snapshot, not the row committed by close
    with pytest.raises(StorageError, match="refresh is for readers"):
        ColumnStore.open(store_path, format_name=FMT, mode="a").refresh()
    reader.close()


def test_refresh_refuses_a_replaced_store(store_path):
    reader = ColumnStore.open(store_path, format_name=FMT)
    with ColumnStore.create(store_path, format_name=FMT, meta={}, fixed={}, columns=COLUMNS, overwrite=True):
        pass
    with pytest.raises(StorageError, match="replaced"):
        reader.refresh()
    reader.close()


def test_refresh_that_finds_damage_keeps_the_old_snapshot_whole(store_path):
    reader = ColumnStore.open(store_path, format_name=FMT)
    with ColumnStore.open(store_path, format_name=FMT, mode="a") as writer:
        writer.append("codes", codes(3, start=5))
        writer.append("norms", np.ones(3, np.float32))
    cut_file(store_path / "norms.col", 4)  # the second column's new rows are damaged
    with pytest.raises(CorruptIndexError, match="norms.col"):
        reader.refresh()
    assert (reader.rows("codes"), reader.rows("norms")) == (5, 5)  # neither column moved
    assert np.array_equal(reader.read_rows("codes", 0, 5), codes(5))
    reader.close()
