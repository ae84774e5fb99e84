"""TurboQuantIVFIndex on disk: save / open / reopen to append, crash safety, refusal of damaged or foreign stores."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import tqindex
from conftest import kmeans
from tqindex import TurboQuantIndex, TurboQuantIVFIndex
from tqindex.errors import CorruptIndexError, IndexFormatError, IndexLockedError
from tqindex.ivf import train_centroids

DIM, NLIST = 24, 8


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1200, DIM)).astype(np.float32)
    return x, rng.standard_normal((6, DIM)).astype(np.float32), kmeans(x, NLIST)


def same_results(a, b, q, nprobe=3):
    for left, right in zip(a.search(q, 8, nprobe=nprobe), b.search(q, 8, nprobe=nprobe)):
        np.testing.assert_array_equal(left, right)


def test_on_disk_index_reopens_with_tqindex_open_and_appends(tmp_path, data):
    x, q, centroids = data
    in_memory = TurboQuantIVFIndex(DIM, NLIST, 3, centroids=centroids)
    in_memory.add(x, progress=False)
    with TurboQuantIVFIndex(DIM, NLIST, 3, path=tmp_path / "idx", centroids=centroids) as index:
        index.add(x[:500], progress=False)
    with tqindex.open(tmp_path / "idx", "a") as index:
        assert isinstance(index, TurboQuantIVFIndex) and index.ntotal == 500
        index.add(x[500:], progress=False)
    with tqindex.open(tmp_path / "idx", nprobe=3) as index:
        assert index.nprobe == 3
        same_results(index, in_memory, q)
        assert index.verify()["ntotal"] == len(x)
        with pytest.raises(ValueError, match="read-only"):
            index.add(x[:1])
        index.to("cpu")  # codes held in RAM, in list order: same results
        same_results(index, in_memory, q)
        with pytest.raises(ValueError, match="CPU only"):
            index.to("meta")


def test_training_creates_the_store_and_its_centroids_persist(tmp_path, data):
    pytest.importorskip("faiss")
    x = data[0]
    index = TurboQuantIVFIndex(DIM, NLIST, 3, path=tmp_path / "idx")
    assert not (tmp_path / "idx").exists()  # created by train
    with index:
        index.train(x, progress=False)
        index.add(x[:100], progress=False)
    with tqindex.open(tmp_path / "idx") as reopened:
        assert reopened.is_trained and reopened.ntotal == 100
        assert np.array_equal(reopened.centroids, train_centroids(x, NLIST, progress=False))


def test_save_writes_each_list_in_one_run_without_removed_rows(tmp_path, data):
    x, q, centroids = data
    index = TurboQuantIVFIndex(DIM, NLIST, 3, centroids=centroids)
    index.add(x[:600], progress=False)
    index.add(x[600:], progress=False)
    index.remove_ids(np.arange(0, 1200, 5))
    index.save(tmp_path / "saved")
    with tqindex.open(tmp_path / "saved") as saved:
        assert saved.ntotal == index.ntotal == 960
        lists = np.asarray(saved._store.column("lists"))
        assert np.all(np.diff(lists) >= 0)  # sorted: one run per list
        assert np.array_equal(saved.list_sizes(), index.list_sizes())
        same_results(saved, index, q, nprobe=NLIST)


def test_a_reader_sees_new_rows_after_refresh(tmp_path, data):
    x, q, centroids = data
    with TurboQuantIVFIndex(DIM, NLIST, 3, centroids=centroids, path=tmp_path / "idx") as writer:
        writer.add(x[:300], progress=False)
        reader = tqindex.open(tmp_path / "idx")
        with pytest.raises(IndexLockedError):
            tqindex.open(tmp_path / "idx", "a")
        writer.add(x[300:], progress=False)
        assert reader.ntotal == 300
        assert reader.refresh() and reader.ntotal == len(x)
        same_results(reader, writer, q)
        reader.close()


def test_rows_added_before_a_kill_survive_and_a_failed_add_leaves_nothing(tmp_path, data):
    x, q, centroids = data
    np.save(tmp_path / "centroids.npy", centroids)
    script = textwrap.dedent(
        f"""
        import os, signal, numpy as np, tqindex
        x = np.random.default_rng(0).standard_normal((1200, {DIM})).astype(np.float32)
        index = tqindex.TurboQuantIVFIndex({DIM}, {NLIST}, 3, centroids=np.load({str(tmp_path / "centroids.npy")!r}),
                                           path={str(tmp_path / "idx")!r})
        index.add(x[:700], progress=False)
        index.remove_ids([3])
        try:
            bad = x[700:].copy()
            bad[-1, 0] = np.nan
            index.add(bad, progress=False)
        except ValueError:
            pass
        index.add(x[700:], progress=False)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    expected = TurboQuantIVFIndex(DIM, NLIST, 3, centroids=centroids)
    expected.add(x, progress=False)
    expected.remove_ids([3])
    with tqindex.open(tmp_path / "idx") as index:
        assert index.ntotal == len(x) - 1
        same_results(index, expected, q, nprobe=NLIST)


def test_a_writer_killed_mid_add_leaves_whole_batches(tmp_path, data):
    """SIGKILL at random moments while a writer adds batches: each reopening finds whole batches only."""
    x, q, centroids = data
    np.save(tmp_path / "centroids.npy", centroids)
    path = tmp_path / "idx"
    TurboQuantIVFIndex(DIM, NLIST, 3, centroids=centroids, path=path).close()
    script = textwrap.dedent(
        f"""
        import sys, numpy as np, tqindex
        index = tqindex.open({str(path)!r}, "a")
        batch = index.ntotal // 100
        while True:
            x = np.random.default_rng(batch).standard_normal((100, {DIM})).astype(np.float32)
            index.add_with_ids(x, batch * 100 + np.arange(100), progress=False)
            print(batch, flush=True)
            batch += 1
        """
    )
    for kill in range(2):
        writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert writer.stdout.readline(), writer.stderr.read().decode()  # a batch is committed
        time.sleep(0.1 * kill)
        writer.kill()
        writer.wait()
        with tqindex.open(path) as index:
            index.verify()
            batches, partial = divmod(index.ntotal, 100)
            assert partial == 0 and batches >= kill + 1
            last = np.random.default_rng(batches - 1).standard_normal((100, DIM)).astype(np.float32)
            recon = index.reconstruct(np.arange(100 * (batches - 1), 100 * batches))  # KeyError if one is missing
            assert np.linalg.norm(recon - last) / np.linalg.norm(last) < 0.25
            with pytest.raises(KeyError):
                index.reconstruct(100 * batches)


def test_damaged_or_foreign_stores_are_refused_clearly(tmp_path, data):
    x, _, centroids = data
    with TurboQuantIVFIndex(DIM, NLIST, 3, centroids=centroids, path=tmp_path / "ivf") as index:
        index.add(x[:100], progress=False)
    with pytest.raises(IndexFormatError, match="foreign store: format 'tqindex-ivf'"):
        TurboQuantIndex.open(tmp_path / "ivf")
    flat = TurboQuantIndex(DIM, 3, path=tmp_path / "flat")
    flat.close()
    with pytest.raises(IndexFormatError, match="foreign store: format 'tqindex'"):
        TurboQuantIVFIndex.open(tmp_path / "flat")
    assert isinstance(tqindex.open(tmp_path / "flat"), TurboQuantIndex)
    lists = tmp_path / "ivf" / "lists.col"
    values = np.fromfile(lists, dtype="<i4")
    values[0] = NLIST + 3
    values.tofile(lists)
    with pytest.raises(CorruptIndexError, match="lists outside 0..7"):
        tqindex.open(tmp_path / "ivf")
    manifest = json.loads((tmp_path / "ivf" / "manifest.json").read_text())
    assert manifest["meta"]["nlist"] == NLIST and "centroids" in manifest["fixed"]


def test_a_path_that_is_not_empty_is_refused_before_training(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    with pytest.raises(ValueError, match="not an empty directory"):
        TurboQuantIVFIndex(DIM, NLIST, 3, path=tmp_path / "full")


def test_an_on_disk_search_reads_only_the_probed_lists(tmp_path, data):
    x, q, centroids = data
    with TurboQuantIVFIndex(DIM, NLIST, 3, centroids=centroids, path=tmp_path / "idx") as index:
        for part in np.array_split(x, 4):  # added in batches: a list is a run per batch
            index.add(part, progress=False)
    with tqindex.open(tmp_path / "idx") as index:
        lists = np.asarray(index._store.column("lists"))
        read, real = [], index._store.read_at
        index._store.read_at = lambda name, rows: (read.append((name, np.array(rows))), real(name, rows))[1]
        for query in q:
            read.clear()
            index.search(query, 5, nprobe=2)
            probed = np.argsort(-(centroids @ query))[:2]
            rows = np.concatenate([rows for name, rows in read if name == "codes"])
            assert len(rows) and np.isin(lists[rows], probed).all()
            assert len(np.unique(rows)) <= np.isin(lists, probed).sum()
