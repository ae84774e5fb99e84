"""Tests of tqindex.storage: round trips, commit point, crash safety, refusals."""

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tqindex.storage import FORMAT_VERSION, ColumnSpec, ColumnStore, StorageError

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


def edit_manifest(path, change):
    m = json.loads((path / "manifest.json").read_text())
    change(m)
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
    assert m["columns"]["codes"] == {"file": "codes.col", "dtype": "|u1", "row_shape": [3], "rows": 5}
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
        assert (path / "codes.col").stat().st_size == 10 * 3  # tail cut off before appending
        s.append("codes", codes(2, start=10))
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
        with pytest.raises(StorageError, match="already open for writing"):
            ColumnStore.open(store_path, format_name=FMT, mode="a")
        with pytest.raises(StorageError, match="already open for writing"):
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


DAMAGES = {
    "missing-dir": (lambda p: __import__("shutil").rmtree(p), "no such directory"),
    "not-a-dir": (lambda p: (__import__("shutil").rmtree(p), p.write_bytes(b"x")), "not a directory"),
    "no-manifest": (lambda p: (p / "manifest.json").unlink(), "not a tqindex store"),
    "garbage-manifest": (lambda p: (p / "manifest.json").write_bytes(b"{not json"), "not valid JSON"),
    "manifest-not-object": (lambda p: (p / "manifest.json").write_bytes(b"[1, 2]"), "corrupt manifest"),
    "missing-key": (lambda p: edit_manifest(p, lambda m: m.pop("columns")), "corrupt manifest: 'columns'"),
    "foreign": (lambda p: edit_manifest(p, lambda m: m.update(format="faiss")), "foreign store: format 'faiss'"),
    "newer-version": (lambda p: edit_manifest(p, lambda m: m.update(version=FORMAT_VERSION + 1)), "newer tqindex"),
    "tampered-fixed": (lambda p: flip_last_byte(p / "rotation.npy"), "'rotation' is corrupt"),
    "fixed-shape-differs": (
        lambda p: edit_manifest(p, lambda m: m["fixed"]["rotation"].update(shape=[2, 8])),
        "'rotation' is corrupt",
    ),
    "missing-fixed": (lambda p: (p / "codebook.npy").unlink(), "'codebook' is missing"),
    "truncated-column": (lambda p: (p / "codes.col").write_bytes(codes(5).tobytes()[:-1]), "truncated"),
    "missing-column": (lambda p: (p / "norms.col").unlink(), "missing"),
    "file-outside-store": (
        lambda p: edit_manifest(p, lambda m: m["columns"]["codes"].update(file="../codes.col")),
        "names file '../codes.col'",
    ),
    "negative-rows": (lambda p: edit_manifest(p, lambda m: m["columns"]["codes"].update(rows=-1)), "-1 rows"),
}


@pytest.mark.parametrize("mode", ["r", "a"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_open_refuses_damaged_store(store_path, damage, mode):
    spoil, message = DAMAGES[damage]
    spoil(store_path)
    before = snapshot(store_path)
    with pytest.raises(StorageError, match=message) as err:
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
    assert sorted(p.name for p in store_path.iterdir()) == ["ids.col", "manifest.json", "notes.txt"]


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
