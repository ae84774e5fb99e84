"""Crash safety: writers killed with SIGKILL at random moments lose no flushed batch and leave no
partial one (the harness is benchmarks/stress_crash.py, which runs the same check 500 times)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import stress_crash  # noqa: E402

import tqindex  # noqa: E402


def test_thirty_kills_lose_no_flushed_batch_and_leave_no_partial_one(tmp_path):
    result = stress_crash.run(tmp_path / "index", 30, seed=7, max_delay=0.15, progress=False)
    assert result["kills"] == 30 and result["checks"] == 30
    assert result["corrupt_opens"] == 0
    assert result["batches"] >= result["writers_that_flushed"] >= 5  # every batch found is whole and checked


def test_the_check_notices_a_lost_batch_a_partial_batch_and_a_flipped_code(tmp_path):
    """The harness's own check must fail on the damage it is there to find."""
    path = tmp_path / "index"
    with tqindex.TurboQuantIndex(stress_crash.DIM, stress_crash.BITS, path=path) as index:
        for batch in range(3):
            index.add_with_ids(*stress_crash.batch_vectors(0, batch), progress=False)
        expected = stress_crash.ExpectedCodes(index.codec, 0)
    assert stress_crash.check(path, expected, {0, 1, 2}, set(), set())["batches"] == 3
    assert stress_crash.check(path, expected, {0}, set(), {1, 2})["batches"] == 3  # two killed writers' batches
    with pytest.raises(stress_crash.CrashCheckError, match="neither flushed nor in flight"):
        stress_crash.check(path, expected, {0}, set(), {1})
    with pytest.raises(stress_crash.CrashCheckError, match="lost"):
        stress_crash.check(path, expected, {0, 1, 2, 3}, set(), set())
    with pytest.raises(stress_crash.CrashCheckError, match="removal"):
        stress_crash.check(path, expected, {0, 1, 2}, {1}, set())
    with tqindex.open(path, "a") as index:  # half a batch, committed as if it were whole
        vectors, ids = stress_crash.batch_vectors(0, 3)
        index.add_with_ids(vectors[: len(ids) // 2 + 1], ids[: len(ids) // 2 + 1], progress=False)
    with pytest.raises(stress_crash.CrashCheckError, match="partial"):  # even for the batch in flight at a kill
        stress_crash.check(path, expected, {0, 1, 2}, set(), {3})


def test_the_check_notices_codes_that_differ(tmp_path):
    path = tmp_path / "index"
    vectors, ids = stress_crash.batch_vectors(0, 0)
    with tqindex.TurboQuantIndex(stress_crash.DIM, stress_crash.BITS, path=path) as index:
        index.add_with_ids(vectors + np.float32(0.5), ids, progress=False)  # not the batch's vectors
        expected = stress_crash.ExpectedCodes(index.codec, 0)
    with pytest.raises(stress_crash.CrashCheckError, match="codes or factors differ"):
        stress_crash.check(path, expected, {0}, set(), set())


def test_injected_io_errors_lose_nothing_and_leave_nothing_partial(tmp_path, one_thread):
    """The I/O-error mode of the harness (1,000 faults in docs/reliability.md), briefly."""
    result = stress_crash.run_io_errors(tmp_path / "index", 25, seed=3, progress=False)
    assert result["faults_injected"] == result["calls_that_raised"] == result["checks"] == 25
    assert result["corrupt_opens"] == 0 and result["batches"] >= result["flushed_batches"] >= 3
