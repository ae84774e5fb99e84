"""Save/open, on-disk indices, append after reopen, durability across a kill -9."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tqindex
from conftest import unit_rows
from tqindex import StorageError, TurboQuantIndex


def test_save_open_search_gives_identical_results(tmp_path):
    x, q = unit_rows(1500, 48, seed=1), unit_rows(10, 48, seed=2)
    index = TurboQuantIndex(48, 2.5, variant="prod", seed=3)
    index.add(x)
    index.remove_ids([4, 5])
    index.save(tmp_path / "idx")
    with tqindex.open(tmp_path / "idx") as reopened:
        assert reopened.ntotal == index.ntotal and reopened.codec.config == index.codec.config
        for a, b in zip(index.search(q, 20), reopened.search(q, 20)):
            assert np.array_equal(a, b)
        assert np.array_equal(index.reconstruct([0, 7]), reopened.reconstruct([0, 7]))


def test_on_disk_index_appends_after_reopen(tmp_path):
    x = unit_rows(900, 32, seed=3)
    with TurboQuantIndex(32, 4, path=tmp_path / "idx", chunk_rows=256) as index:
        assert np.array_equal(index.add(x[:500]), np.arange(500))
    with tqindex.open(tmp_path / "idx", mode="a", chunk_rows=256) as index:
        assert np.array_equal(index.add(x[500:]), np.arange(500, 900))
        index.remove_ids([0])
    memory = TurboQuantIndex(32, 4)
    memory.add(x)
    memory.remove_ids([0])
    with tqindex.open(tmp_path / "idx") as index:
        assert index.ntotal == 899
        for a, b in zip(index.search(x[:5], 10), memory.search(x[:5], 10)):
            assert np.array_equal(a, b)


def test_read_only_index_refuses_writes_and_stays_intact(tmp_path):
    x = unit_rows(100, 16, seed=4)
    TurboQuantIndex(16, 3, path=tmp_path / "idx").add(x)
    before = {p.name: p.read_bytes() for p in (tmp_path / "idx").iterdir()}
    with tqindex.open(tmp_path / "idx") as index:
        for write in (lambda: index.add(x[:1]), lambda: index.remove_ids([1]), lambda: index.add_with_ids(x[:1], [500])):
            with pytest.raises(ValueError, match="read-only"):
                write()
    assert before == {p.name: p.read_bytes() for p in (tmp_path / "idx").iterdir()}


def test_added_rows_survive_a_kill_after_add_returns(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal, numpy as np, tqindex
        x = np.random.default_rng(0).standard_normal((300, 24)).astype(np.float32)
        index = tqindex.TurboQuantIndex(24, 3, path={str(tmp_path / "idx")!r})
        index.add(x[:200])
        index.remove_ids([3])
        index.add(x[200:])
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    x = np.random.default_rng(0).standard_normal((300, 24)).astype(np.float32)
    with tqindex.open(tmp_path / "idx") as index:
        assert index.ntotal == 299
        expected = TurboQuantIndex(24, 3)
        expected.add(x)
        expected.remove_ids([3])
        for a, b in zip(index.search(x[:4], 5), expected.search(x[:4], 5)):
            assert np.array_equal(a, b)


def test_search_over_more_rows_than_one_chunk_on_disk(tmp_path):
    x, q = unit_rows(5000, 32, seed=5), unit_rows(3, 32, seed=6)
    with TurboQuantIndex(32, 2, path=tmp_path / "idx") as index:
        index.add(x)
    in_memory = TurboQuantIndex(32, 2)
    in_memory.add(x)
    with tqindex.open(tmp_path / "idx", chunk_rows=333) as index:
        for a, b in zip(index.search(q, 25), in_memory.search(q, 25)):
            assert np.array_equal(a, b)


def test_opening_something_that_is_not_an_index_fails_clearly(tmp_path):
    with pytest.raises(StorageError, match="not a tqindex store|manifest"):
        tqindex.open(tmp_path)
    with pytest.raises(StorageError):
        tqindex.open(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError):
        tqindex.open(tmp_path / "file")


def test_corrupt_codebook_is_detected_on_open(tmp_path):
    TurboQuantIndex(16, 3, path=tmp_path / "idx").add(unit_rows(10, 16, seed=7))
    levels = tmp_path / "idx" / "levels.npy"
    data = bytearray(levels.read_bytes())
    data[-1] ^= 0xFF
    levels.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="levels"):
        tqindex.open(tmp_path / "idx")


def test_truncated_codes_file_is_detected_on_open(tmp_path):
    TurboQuantIndex(16, 3, path=tmp_path / "idx").add(unit_rows(10, 16, seed=8))
    codes = tmp_path / "idx" / "codes.col"
    codes.write_bytes(codes.read_bytes()[:-3])
    with pytest.raises(StorageError, match="truncated"):
        tqindex.open(tmp_path / "idx")


def test_creating_over_an_existing_directory_is_refused(tmp_path):
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "precious.txt").write_text("keep me")
    with pytest.raises(StorageError):
        TurboQuantIndex(16, 3, path=tmp_path / "idx")
    assert (tmp_path / "idx" / "precious.txt").read_text() == "keep me"
    index = TurboQuantIndex(16, 3)
    index.add(unit_rows(5, 16, seed=9))
    with pytest.raises(StorageError):
        index.save(tmp_path / "idx")


def test_closed_index_refuses_use(tmp_path):
    index = TurboQuantIndex(16, 3, path=tmp_path / "idx")
    index.add(unit_rows(5, 16, seed=10))
    index.close()
    index.close()
    with pytest.raises(ValueError, match="closed"):
        index.search(unit_rows(1, 16, seed=11), 1)
