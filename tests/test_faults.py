"""I/O fault injection, as SQLite tests I/O errors: the 1st, 2nd, ... n-th write, truncate, fsync or
rename of each storage operation fails in turn (`tqindex.faults.FaultInjector`).

After every fault: the call raised the injected error; the index holds what it held before the
call (an OSError), or before or after it, whole (a KeyboardInterrupt, or a fault that persists);
its searches and decoded rows are those of that state; and the same object, then the index
reopened, accept new rows and pass `verify()`. A save that fails leaves no index at its target
(or the old one, or else a whole copy); a constructor that fails leaves no directory.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np
import pytest

import tqindex
from conftest import unit_rows
from tqindex import TurboQuantIndex
from tqindex.errors import IndexFormatError
from tqindex.faults import ERRNOS, FaultInjector
from tqindex.storage import ColumnSpec, ColumnStore

D = 16
X = unit_rows(40, D, seed=11)
NEW = unit_rows(7, D, seed=12)
MORE = unit_rows(5, D, seed=13)
Q = unit_rows(4, D, seed=14)
ERRORS = (*ERRNOS, KeyboardInterrupt)  # cycled over the fault positions


@pytest.fixture(autouse=True)
def fast(one_thread):
    """Hundreds of tiny writes and searches: fsyncs counted but not made (no power is lost here)."""
    with FaultInjector(sync=False):
        yield


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """An on-disk index of 40 rows, ids 0..39, ids 0 and 1 removed."""
    path = tmp_path_factory.mktemp("faults") / "index"
    with TurboQuantIndex(D, 2, path=path) as index:
        index.add(X)
        index.remove_ids([0, 1])
    return path


def state(index: TurboQuantIndex) -> tuple:
    """What a user can see of the rows: count, live ids, search results, decoded vectors."""
    ids = np.sort(np.asarray(index._store.column("ids"))[~index._deleted])
    scores, found = index.search(Q, 5)
    return index.ntotal, ids.tolist(), scores.tolist(), found.tolist(), index.reconstruct(ids).tolist()


OPERATIONS = {
    "add": lambda index: index.add(NEW),
    "add_with_ids": lambda index: index.add_with_ids(NEW, np.arange(1000, 1007)),
    "remove_ids": lambda index: index.remove_ids([3, 4, 5]),
}


def fresh(template: Path, where: Path) -> TurboQuantIndex:
    return tqindex.open(shutil.copytree(template, where), "a")


def expected_states(template: Path, tmp_path: Path, operation) -> tuple[tuple, tuple, int]:
    """The state before and after ``operation`` without faults, and how many I/O calls it makes."""
    with fresh(template, tmp_path / "reference") as index:
        before = state(index)
        with FaultInjector() as counter:
            operation(index)
        return before, state(index), counter.count


def raises_injected(error, call) -> None:
    """``call()`` raises the injected ``error`` (an errno or an exception class)."""
    with pytest.raises(OSError if isinstance(error, int) else error) as raised:
        call()
    assert not isinstance(error, int) or raised.value.errno == error


def still_works(index: TurboQuantIndex, path: Path, seen: tuple) -> None:
    """The index (and reopened, the directory) holds ``seen``, takes new rows and verifies."""
    ids = index.add(MORE)
    np.testing.assert_array_equal(index.reconstruct(ids), index.codec.decode(index.codec.encode(MORE)))
    after_add = state(index)
    index.close()
    with tqindex.open(path, "a") as reopened:
        assert state(reopened) == after_add
        reopened.add(MORE)
        assert reopened.verify()["ntotal"] == seen[0] + 2 * len(MORE)


@pytest.mark.parametrize("name", ["add", "remove_ids"])
def test_every_io_call_of_a_write_can_fail_and_nothing_is_lost(name, template, tmp_path):
    operation = OPERATIONS[name]
    before, after, calls = expected_states(template, tmp_path, operation)
    assert calls >= 7  # column writes, fsyncs, the manifest's write, fsync and rename, the directory's fsync
    for n in range(1, calls + 1):
        error = ERRORS[n % len(ERRORS)]
        path = tmp_path / f"n{n}"
        index = fresh(template, path)
        with FaultInjector(fail_at=n, error=error) as faults:
            raises_injected(error, lambda: operation(index))
        assert faults.injected == 1, f"call {n}"
        seen = state(index)
        # an OSError rolls back; an interrupt after the manifest's rename leaves the call committed
        assert seen == before if isinstance(error, int) else seen in (before, after), f"call {n} ({faults.log[-1]}) failing"
        still_works(index, path, seen)


@pytest.mark.parametrize("name", ["add_with_ids", "remove_ids"])
def test_a_fault_that_persists_leaves_the_call_all_or_nothing(name, template, tmp_path):
    """Every call from the n-th on fails (a disk that stays full): the rollback's own cuts and the
    manifest's restore fail too; the next writer cuts the residue off."""
    operation = OPERATIONS[name]
    before, after, calls = expected_states(template, tmp_path, operation)
    for n in range(1, calls + 1):
        path = tmp_path / f"n{n}"
        index = fresh(template, path)
        with FaultInjector(fail_at=n, error=errno.ENOSPC, persistent=True):
            raises_injected(errno.ENOSPC, lambda: operation(index))
        seen = state(index)
        assert seen in (before, after), f"from call {n} on"
        still_works(index, path, seen)


def test_a_failing_cut_of_the_residue_refuses_the_append_and_is_retried(template, tmp_path):
    """An add whose rollback could not cut its bytes off leaves residue; the next add cuts it
    first (a truncate); if that fails, the add raises and its rollback cuts it."""
    path = tmp_path / "index"
    index = fresh(template, path)
    before = state(index)
    committed = index._store.rows("codes") * index.codec.code_bytes
    with FaultInjector(fail_at=1, error=errno.EIO, persistent=True):
        raises_injected(errno.EIO, lambda: index.add(NEW))
    assert (path / "codes.col").stat().st_size > committed  # the residue
    with FaultInjector(fail_at=1, error=errno.EIO) as faults:
        raises_injected(errno.EIO, lambda: index.add(NEW))
    assert faults.log[0] == "truncate" and "truncate" in faults.log[1:] and state(index) == before
    assert (path / "codes.col").stat().st_size == committed
    still_works(index, path, before)


def test_flush_and_close_have_nothing_left_to_write(template, tmp_path):
    """Every index call commits before it returns, so flush() and close() make no I/O call to fail."""
    index = fresh(template, tmp_path / "index")
    index.add(NEW)
    with FaultInjector(fail_at=1) as faults:
        index.flush()
        index.close()
    assert faults.count == 0


@pytest.mark.parametrize("closing", [False, True], ids=["commit", "close"])
def test_store_commit_and_close_with_pending_rows_fail_without_loss(closing, tmp_path):
    """At the store level rows can be pending: a failed commit (or close, which commits) raises,
    keeps every committed row and a reopened store appends after them."""
    spec = {"v": ColumnSpec("int64", (2,))}
    template = tmp_path / "template"
    with ColumnStore.create(template, format_name="t", meta={}, fixed={}, columns=spec) as store:
        store.append("v", np.arange(20).reshape(10, 2))
    with ColumnStore.open(shutil.copytree(template, tmp_path / "count"), format_name="t", mode="a") as store:
        store.append("v", np.ones((3, 2), np.int64))
        with FaultInjector() as counter:
            store.close() if closing else store.commit()
    assert counter.count >= 6  # two fsyncs of the column, the manifest's write, fsync, rename, the directory's fsync
    for n in range(1, counter.count + 1):
        path = shutil.copytree(template, tmp_path / f"n{n}")
        store = ColumnStore.open(path, format_name="t", mode="a")
        store.append("v", np.ones((3, 2), np.int64))
        with FaultInjector(fail_at=n, error=errno.EIO):
            with pytest.raises(OSError):
                store.close() if closing else store.commit()
        store.rollback()
        store.close()
        with ColumnStore.open(path, format_name="t", mode="a") as reopened:
            np.testing.assert_array_equal(reopened.column("v"), np.arange(20).reshape(10, 2))
            reopened.append("v", np.full((1, 2), 7, np.int64))
        with ColumnStore.open(path, format_name="t") as reader:
            assert reader.rows("v") == 11 and reader.verify()["bytes"] == 11 * 16


@pytest.mark.parametrize("overwrite", [False, True], ids=["new-path", "overwrite"])
def test_every_io_call_of_save_can_fail_and_leaves_no_partial_index(overwrite, template, tmp_path):
    index = tqindex.open(template)
    source = state(index)
    old = TurboQuantIndex(D, 2, seed=5)
    old.add(MORE)
    old_state = state(old)
    with FaultInjector() as counter:
        old.save(tmp_path / "count")
    for n in range(1, counter.count + 1):
        target = tmp_path / f"n{n}" / "saved"
        if overwrite:
            old.save(target)
        with FaultInjector(fail_at=n, error=ERRORS[n % len(ERRORS)]):
            raises_injected(ERRORS[n % len(ERRORS)], lambda: index.save(target, overwrite=overwrite))
        assert not list(target.parent.glob(".saved.*")), f"call {n}: staging files left"
        try:
            saved = tqindex.open(target)
        except IndexFormatError:
            assert not overwrite and not target.exists(), f"call {n}"
            continue
        with saved:  # the old index untouched, or (a fault after the rename) the whole new one
            assert state(saved) in (old_state, source) and saved.verify(), f"call {n}"
    assert state(index) == source
    index.close()


def test_every_io_call_of_creating_an_index_can_fail_and_leaves_nothing(tmp_path):
    with FaultInjector() as counter:
        TurboQuantIndex(D, 2, path=tmp_path / "count").close()
    for n in range(1, counter.count + 1):
        path = tmp_path / f"n{n}"
        with FaultInjector(fail_at=n, error=ERRORS[n % len(ERRORS)]):
            raises_injected(ERRORS[n % len(ERRORS)], lambda: TurboQuantIndex(D, 2, path=path))
        assert not path.exists(), f"call {n}"
        TurboQuantIndex(D, 2, path=path).close()  # the path is free again, and no lock is left
