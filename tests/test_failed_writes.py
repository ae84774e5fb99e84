"""A failed or interrupted write changes nothing stored: the inputs of issue 15, item 1.

An on-disk add that hits the file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) after the codes and
factors fit but the ids do not, or a KeyboardInterrupt between the columns, used to leave the
columns at different lengths: the next add was mis-numbered and the next open refused the index.
A save that failed part way used to leave a valid empty index at its path. `test_faults.py`
sweeps every I/O call the same way.
"""

from __future__ import annotations

import errno
import resource
import signal

import numpy as np
import pytest

import tqindex
from conftest import unit_rows
from tqindex import TurboQuantIndex
from tqindex.errors import IndexFormatError, IndexLockedError, StorageError
from tqindex.memstore import MemoryStore
from tqindex.storage import ColumnStore

D = 16
X = unit_rows(555, D, seed=31)
Q = unit_rows(6, D, seed=32)


def file_size_limit(limit: int):
    """Context: RLIMIT_FSIZE at ``limit`` bytes with SIGXFSZ ignored (writes past it raise EFBIG)."""

    class Limit:
        def __enter__(self):
            self.saved = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, self.saved[0][1]))

        def __exit__(self, *exc):
            resource.setrlimit(resource.RLIMIT_FSIZE, self.saved[0])
            signal.signal(signal.SIGXFSZ, self.saved[1])

    return Limit()


def interrupt_at(column: str, store_class):
    """A store ``append`` that raises KeyboardInterrupt when it reaches ``column``."""
    original = store_class.append

    def append(self, name, values):
        if name == column:
            raise KeyboardInterrupt
        return original(self, name, values)

    return append


def answers(index: TurboQuantIndex, ids: np.ndarray) -> tuple:
    scores, found = index.search(Q, 10)
    return index.ntotal, scores.tolist(), found.tolist(), index.reconstruct(ids).tolist()


@pytest.mark.parametrize("fault", ["file-size-limit", "keyboard-interrupt"])
def test_failed_add_on_disk_keeps_the_index_and_later_adds_work(fault, tmp_path, monkeypatch):
    """Issue 15, item 1: d=16, 1 bit, 100 rows; an add of 450 rows fails writing the ids."""
    index = TurboQuantIndex(D, 1, path=tmp_path / "index")
    index.add(X[:100])
    before = answers(index, np.arange(100))
    if fault == "file-size-limit":  # codes (2 B/row) and factors (4 B/row) of 550 rows fit; ids (8 B/row) do not
        with file_size_limit(4000), pytest.raises(OSError) as raised:
            index.add(X[100:550])
        assert raised.value.errno == errno.EFBIG
    else:
        with monkeypatch.context() as patch:
            patch.setattr(ColumnStore, "append", interrupt_at("ids", ColumnStore))
            with pytest.raises(KeyboardInterrupt):
                index.add(X[100:550])
    assert answers(index, np.arange(100)) == before
    assert (tmp_path / "index" / "codes.col").stat().st_size == 100 * index.codec.code_bytes  # the rolled-back bytes cut off
    np.testing.assert_array_equal(index.add(X[550:555]), np.arange(100, 105))
    reference = TurboQuantIndex(D, 1)  # the same 105 rows added without a failure
    reference.add(X[:100])
    reference.add(X[550:555])
    assert answers(index, np.arange(105)) == answers(reference, np.arange(105))
    index.close()
    with tqindex.open(tmp_path / "index", "a") as reopened:
        assert answers(reopened, np.arange(105)) == answers(reference, np.arange(105))
        assert reopened.verify()["rows"] == 105
        reopened.add(X[:3])


@pytest.mark.parametrize("operation", ["add", "remove_ids"])
def test_interrupted_write_in_memory_changes_nothing(operation, monkeypatch):
    index = TurboQuantIndex(D, 2)
    index.add(X[:50])
    before = answers(index, np.arange(50))
    monkeypatch.setattr(MemoryStore, "commit", lambda self: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        index.add(X[50:60]) if operation == "add" else index.remove_ids([3, 4])
    monkeypatch.undo()
    assert answers(index, np.arange(50)) == before
    np.testing.assert_array_equal(index.add(X[60:62]), [50, 51])
    assert index.ntotal == 52 and len(index._store.column("codes")) == 52


def test_an_interrupted_add_to_a_resident_index_holds_none_of_its_rows(monkeypatch):
    """A resident index streams an add's batches into its spare rows: interrupted at the commit, it
    holds none of them and answers as before, and the next add (which writes over those spare
    rows) answers as an index that never failed."""
    import tqindex.index

    monkeypatch.setattr(tqindex.index, "_ENCODE_BATCH", 4)  # the add below: 3 batches
    index = TurboQuantIndex(D, 2).to("cpu")
    index.add(X[:50])
    before = answers(index, np.arange(50))
    with monkeypatch.context() as patch:
        patch.setattr(MemoryStore, "commit", lambda self: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            index.add(X[50:60])
    assert answers(index, np.arange(50)) == before and index._held.rows == 50
    index.add(X[60:65])
    reference = TurboQuantIndex(D, 2)
    reference.add(X[:50])
    reference.add(X[60:65])
    assert answers(index, np.arange(55)) == answers(reference, np.arange(55))


def test_interrupt_after_the_commit_leaves_the_add_whole(tmp_path, monkeypatch):
    """Interrupted after its rows are committed (here: while the index updates its own state),
    the add is wholly there, and the index agrees with what is stored."""
    index = TurboQuantIndex(D, 2, path=tmp_path / "index")
    index.add(X[:50])
    grow, interrupted = TurboQuantIndex._grow_rows, []

    def interrupt_once(self, n):
        if not interrupted:
            interrupted.append(n)
            raise KeyboardInterrupt
        grow(self, n)

    monkeypatch.setattr(TurboQuantIndex, "_grow_rows", interrupt_once)
    with pytest.raises(KeyboardInterrupt):
        index.add(X[50:60])
    monkeypatch.undo()
    assert index.ntotal == 60 and index.reconstruct(np.arange(60)).shape == (60, D)
    np.testing.assert_array_equal(index.add(X[60:61]), [60])
    index.close()
    with tqindex.open(tmp_path / "index") as reopened:
        assert reopened.ntotal == 61


def test_save_that_fails_part_way_leaves_no_index(tmp_path, monkeypatch):
    """The save writes beside its path and renames the whole index into place."""
    index = TurboQuantIndex(D, 2)
    index.add(X[:300])
    calls = []

    def failing_append(self, name, values):
        calls.append(name)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, name, values)

    original = ColumnStore.append
    monkeypatch.setattr(ColumnStore, "append", failing_append)
    with pytest.raises(OSError):
        index.save(tmp_path / "saved")
    monkeypatch.undo()
    assert not (tmp_path / "saved").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(IndexFormatError):
        tqindex.open(tmp_path / "saved")
    index.save(tmp_path / "saved")  # the path is free: no overwrite needed
    with tqindex.open(tmp_path / "saved") as saved:
        assert answers(saved, np.arange(300)) == answers(index, np.arange(300))


def test_save_overwrite_replaces_an_index_that_readers_still_see_whole(tmp_path):
    first, second = TurboQuantIndex(D, 2), TurboQuantIndex(D, 3, metric="cosine")
    first.add(X[:40])
    second.add(X[40:100])
    first.save(tmp_path / "saved")
    with pytest.raises(StorageError, match=r"directory is not empty \(overwrite=True replaces"):
        second.save(tmp_path / "saved")
    reader = tqindex.open(tmp_path / "saved")
    second.save(tmp_path / "saved", overwrite=True)
    assert answers(reader, np.arange(40)) == answers(first, np.arange(40))  # its files are still open
    reader.close()
    with tqindex.open(tmp_path / "saved") as saved:
        assert saved.metric == "cosine" and answers(saved, np.arange(60)) == answers(second, np.arange(60))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # the old one is gone, no staging left


def test_save_overwrite_refuses_what_is_not_a_whole_free_index(tmp_path):
    index = TurboQuantIndex(D, 2, path=tmp_path / "open")
    index.add(X[:20])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StorageError, match="refusing to overwrite"):
        index.save(tmp_path / "other", overwrite=True)
    index.save(tmp_path / "extra")
    (tmp_path / "extra" / "notes.txt").write_text("mine")
    with pytest.raises(StorageError, match=r"files that are not the store's: \['notes.txt'\]"):
        index.save(tmp_path / "extra", overwrite=True)
    index.save(tmp_path / "held")
    with tqindex.open(tmp_path / "held", "a"), pytest.raises(IndexLockedError):
        index.save(tmp_path / "held", overwrite=True)
    with pytest.raises(ValueError, match="this index is open from there"):
        index.save(tmp_path / "open", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine" and (tmp_path / "extra" / "notes.txt").exists()
    index.add(X[20:22])  # the writer still holds its own directory
    index.close()
