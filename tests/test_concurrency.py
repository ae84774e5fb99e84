"""One writer, many readers (threads and processes): each reader sees a committed snapshot made of
whole batches; a second writer is refused; one read-only index serves concurrent searches."""

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

import tqindex
from tqindex.errors import IndexLockedError
from tqindex.kernels import fastscan

DIM, BATCH, BATCHES = 32, 64, 40
TIMEOUT = 120  # seconds any reader may take: a hang fails the test instead of stalling the suite


def batch(b: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectors float32 ``(BATCH, DIM)`` and ids ``b * 1000 + 0..BATCH-1`` of batch ``b``."""
    rng = np.random.default_rng(b)
    return rng.standard_normal((BATCH, DIM), dtype=np.float32), b * 1000 + np.arange(BATCH, dtype=np.int64)


def check_snapshot(index: tqindex.TurboQuantIndex) -> int:
    """Assert the index holds batches 0..n-1 whole, and that searching it finds only their ids; returns n."""
    n, rest = divmod(index.ntotal, BATCH)
    assert rest == 0, f"{index.ntotal} vectors: a partial batch is visible"
    want = np.concatenate([batch(b)[1] for b in range(n)]) if n else np.zeros(0, np.int64)
    assert np.array_equal(np.sort(np.asarray(index._store.column("ids"))), want)
    if n:
        queries = batch(n - 1)[0][:4]  # the newest batch: its rows are the last committed
        _, ids = index.search(queries, 5)
        assert np.isin(ids, want).all()
        assert np.array_equal(ids[:, 0], batch(n - 1)[1][:4])  # each finds itself (4-bit codes, d=32)
    return n


def write_batches(path, start: int, stop: int) -> None:
    with tqindex.open(path, "a") as index:
        for b in range(start, stop):
            index.add_with_ids(*batch(b), progress=False)


def read_while_writing(path, rounds: int) -> list[int]:
    """Open the index read-only `rounds` times (and refresh it as often), checking each snapshot."""
    seen = []
    with tqindex.open(path) as reader:
        for _ in range(rounds):
            with tqindex.open(path) as fresh:
                seen.append(check_snapshot(fresh))
            reader.refresh()
            seen.append(check_snapshot(reader))
    return seen


@pytest.fixture
def index_path(tmp_path):
    path = tmp_path / "index"
    with tqindex.TurboQuantIndex(DIM, 4, path=path) as index:
        index.add_with_ids(*batch(0), progress=False)
    return path


def test_reader_threads_see_whole_batches_while_a_writer_adds(index_path):
    results, errors = [], []

    def reader():
        try:
            results.append(read_while_writing(index_path, 25))
        except BaseException as e:  # collected: an assertion in a thread must fail the test
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    write_batches(index_path, 1, BATCHES)
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive(), "a reader thread hung"
    assert not errors, errors[0]
    for seen in results:
        assert seen == sorted(seen) and 1 <= seen[0]  # snapshots only move forward
    with tqindex.open(index_path) as index:
        assert check_snapshot(index) == BATCHES


def _reader_process(path, rounds, conn) -> None:
    try:
        conn.send(("ok", read_while_writing(path, rounds)))
    except BaseException as e:
        conn.send(("error", repr(e)))


def test_reader_processes_see_whole_batches_while_a_writer_adds(index_path):
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["tqindex"])
    pipes, procs = [], []
    for _ in range(2):
        receive, send = context.Pipe(duplex=False)
        proc = context.Process(target=_reader_process, args=(str(index_path), 15, send))
        proc.start()
        pipes.append(receive)
        procs.append(proc)
    write_batches(index_path, 1, BATCHES)
    outcomes = []
    for receive, proc in zip(pipes, procs):
        assert receive.poll(TIMEOUT), f"reader process hung or died (exit code {proc.exitcode})"
        outcomes.append(receive.recv())
        proc.join(TIMEOUT)
    for kind, value in outcomes:
        assert kind == "ok", value
        assert value == sorted(value)


# A parent that built and searched an index on two torch threads, then a fork pool searching it:
# GNU OpenMP hung the workers' first threaded torch operation (the query rotation)
_FORK_POOL_SCRIPT = """
import multiprocessing as mp, sys
import numpy as np, torch, tqindex
torch.set_num_threads(2)
x = np.random.default_rng(0).standard_normal((20000, 64)).astype(np.float32)
index = tqindex.TurboQuantIndex(64, 4, backend=sys.argv[1])
index.add(x)
a = torch.randn(600, 600)
a @ a
want = index.search(x[:8], 5)[1]

def search(i):
    return index.search(x[i : i + 2], 5)[1], torch.get_num_threads()

if __name__ == "__main__":
    with mp.get_context("fork").Pool(2) as pool:
        found = pool.map(search, range(0, 8, 2))
    assert np.array_equal(np.concatenate([ids for ids, _ in found]), want)
    assert {threads for _, threads in found} == {1}
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="GNU OpenMP's fork hazard: Linux")
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_fork_pool_workers_search_an_index_the_threaded_parent_built(backend, tmp_path):
    """Workers forked from a process whose torch ran threads search on one torch thread and find
    what the parent finds (they hung in libgomp)."""
    if backend == "auto" and not fastscan.available():
        pytest.skip("without the compiled fast-scan, 'auto' searches with numba, whose OpenMP layer ends forked children")
    script = tmp_path / "fork_pool.py"
    script.write_text(_FORK_POOL_SCRIPT)
    process = subprocess.Popen([sys.executable, str(script), backend], stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the hung workers too
        process.communicate()
        pytest.fail("the fork pool's searches hung")
    assert process.returncode == 0, stderr


def test_a_second_writer_is_refused_in_this_process_and_in_another(index_path):
    with tqindex.open(index_path, "a") as writer:
        with pytest.raises(IndexLockedError, match="already open for writing"):
            tqindex.open(index_path, "a")
        code = f"import tqindex; tqindex.open({str(index_path)!r}, 'a')"
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
        assert other.returncode != 0 and "IndexLockedError" in other.stderr and str(index_path) in other.stderr
        with pytest.raises(IndexLockedError):  # nor may a new index be made over it
            tqindex.TurboQuantIndex(DIM, 4, path=index_path)
        writer.add_with_ids(*batch(1), progress=False)  # the refusals changed nothing for the writer
    with tqindex.open(index_path, "a") as index:  # the lock went with the first writer
        assert check_snapshot(index) == 2


def test_one_read_only_index_serves_searches_from_many_threads(index_path):
    write_batches(index_path, 1, 8)
    queries = np.random.default_rng(5).standard_normal((40, DIM), dtype=np.float32)
    with tqindex.open(index_path) as index:
        want = [index.search(queries[i : i + 1], 10) for i in range(len(queries))]
        got = [None] * len(queries)

        def search(i):
            got[i] = index.search(queries[i : i + 1], 10)

        threads = [threading.Thread(target=search, args=(i,)) for i in range(len(queries))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
    assert all(result is not None for result in got), "a search thread failed or hung"
    for (d1, i1), (d2, i2) in zip(want, got):
        assert np.array_equal(i1, i2) and np.array_equal(d1, d2)
