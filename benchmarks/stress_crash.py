"""Crash safety under SIGKILL: a writer process adds and removes batches, is killed at random moments.

Each writer opens the on-disk index in mode "a", works out the next batch from what is stored,
and loops: ``add_with_ids(batch)`` + ``flush()``, then tells the parent the batch number; every
fourth batch it also removes a fixed third of the previous batch's ids + ``flush()``. The parent
kills it with SIGKILL a random delay after it has opened the index (or, for half the writers,
after its first flush, so that every run makes progress), reopens the index and checks that

- every batch whose ``flush()`` returned is there, its ids, codes and factors bit-identical to
  what encoding the batch gives; no batch is there in part; batches are a prefix 0..B;
- every removal whose ``flush()`` returned is there; no removal is there in part; nothing else
  is removed;
- ``index.verify()`` accepts every byte.

Writers start from a forkserver that has imported tqindex, so a kill cycle costs ~0.1 s.

``--io-errors N`` runs the I/O-error mode instead (`run_io_errors`): one writer in this process
goes through the same batches and removals, and ``N`` times one of its calls (``add_with_ids``,
``remove_ids``, ``flush``, ``close`` and reopen, ``save``) gets an injected I/O error at its
n-th write, truncate, fsync or rename (`tqindex.faults.FaultInjector`: ENOSPC, EIO or EFBIG, a
quarter of them persisting to the call's end). After each: the call raised; the same check as
above on the index reopened (nothing flushed lost, nothing partial, every byte verified); the
writer's own view agrees with it; and the writer goes on adding. A save that failed leaves no
index at its target, or the previous one, or a whole copy.

    python benchmarks/stress_crash.py --kills 500 --json results/stress_crash.json
    python benchmarks/stress_crash.py --io-errors 1000 --json results/stress_io_errors.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numba
import numpy as np
import torch
from tqdm.auto import tqdm

import tqindex
from tqindex.codec import Codes
from tqindex.faults import ERRNOS, FaultInjector

DIM, BITS = 256, 4  # 128-byte codes: a few thousand rows cross a 1 MiB checksum block
ID_STRIDE = 1_000_000  # batch b holds ids b * ID_STRIDE + 0..n-1
MAX_BATCH = 400


numba.njit(lambda: 0)()  # load numba's CPU target here, so that writers forked from a process
# that imported this module (the forkserver) start in ~0.1 s; a serial function starts no threads


class CrashCheckError(AssertionError):
    """What a reopened index holds differs from what the killed writer had flushed."""


def batch_vectors(seed: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Batch ``batch``'s vectors float32 ``(n, DIM)`` and ids int64 ``(n,)``, n in 1..MAX_BATCH."""
    rng = np.random.default_rng([seed, batch])
    n = int(rng.integers(1, MAX_BATCH + 1))
    return rng.standard_normal((n, DIM), dtype=np.float32), batch * ID_STRIDE + np.arange(n, dtype=np.int64)


def removes_after(batch: int) -> bool:
    """Whether the writer removes part of batch ``batch - 1`` after adding ``batch``."""
    return batch % 4 == 3


def removed_ids(seed: int, batch: int) -> np.ndarray:
    """The ids of ``batch`` removed after batch ``batch + 1``: a third of them, int64."""
    ids = batch_vectors(seed, batch)[1]
    return ids[ids % 3 == 0]


def _writer(path: str, seed: int, conn) -> None:
    """Child process: add and remove batches until killed, reporting each flush that returned."""
    torch.set_num_threads(1)
    tqdm.set_lock(threading.RLock())  # not tqdm's default process lock: a killed writer would leak its semaphore
    index = tqindex.open(path, "a")
    index.codec.encode(np.zeros((1, DIM), np.float32))  # compile (or load) the kernels first
    ids = index._store.column("ids")
    batch = int(ids.max()) // ID_STRIDE + 1 if len(ids) else 0
    conn.send(("ready", batch))
    while True:
        vectors, ids = batch_vectors(seed, batch)
        index.add_with_ids(vectors, ids, progress=False)
        index.flush()
        conn.send(("added", batch))
        if removes_after(batch):
            index.remove_ids(removed_ids(seed, batch - 1))
            index.flush()
            conn.send(("removed", batch - 1))
        batch += 1


class ExpectedCodes:
    """Codes and factors of each batch as the writer encodes them (1 thread, same batch shape)."""

    def __init__(self, codec: tqindex.TurboQuantCodec, seed: int):
        self.codec, self.seed, self._by_batch = codec, seed, {}

    def __call__(self, batch: int) -> Codes:
        if batch not in self._by_batch:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                self._by_batch[batch] = self.codec.encode(batch_vectors(self.seed, batch)[0])
            finally:
                torch.set_num_threads(threads)
        return self._by_batch[batch]


def check(path: Path, expected: ExpectedCodes, added: set[int], removed: set[int], in_flight: set[int]) -> dict[str, int]:
    """Reopen the index at ``path`` and check it against what the writers reported flushed.

    ``added``: batches whose flush returned; ``removed``: batches whose removal's flush returned;
    ``in_flight``: the batch each killed writer was adding (there whole or not at all, since its
    commit may have finished before the kill). Raises CrashCheckError; returns the counts seen.
    """
    with tqindex.open(path) as index:
        store = index._store
        ids, codes, factors = (np.asarray(store.column(name)) for name in ("ids", "codes", "factors"))
        batch_of_row = ids // ID_STRIDE
        present = np.unique(batch_of_row)
        if not np.array_equal(present, np.arange(len(present))):
            raise CrashCheckError(f"batches present are not a prefix: {present.tolist()[:20]}")
        if not added <= set(present.tolist()):
            raise CrashCheckError(f"flushed batches lost: {sorted(added - set(present.tolist()))}")
        unexplained = set(present.tolist()) - added - in_flight
        if unexplained:
            raise CrashCheckError(f"batches {sorted(unexplained)[:5]} present, but neither flushed nor in flight at a kill")
        start = 0
        for batch in present.tolist():
            want_ids = batch_vectors(expected.seed, batch)[1]
            stop = start + len(want_ids)
            if not np.array_equal(ids[start:stop], want_ids):
                raise CrashCheckError(f"batch {batch}: ids at rows {start}..{stop - 1} are not the batch's ids (partial batch?)")
            want = expected(batch)
            if not (np.array_equal(codes[start:stop], want.packed) and np.array_equal(factors[start:stop], want.factors)):
                raise CrashCheckError(f"batch {batch}: codes or factors differ from the batch's encoding")
            start = stop
        if start != len(ids):
            raise CrashCheckError(f"{len(ids) - start} rows past the last whole batch")
        deleted_ids = ids[np.asarray(store.column("deleted"))]
        deleted_batches = set((deleted_ids // ID_STRIDE).tolist())
        for batch in deleted_batches | removed:
            want = removed_ids(expected.seed, batch)
            got = np.sort(deleted_ids[deleted_ids // ID_STRIDE == batch])
            if not np.array_equal(got, want):
                raise CrashCheckError(f"batch {batch}: removed ids {got.tolist()[:5]}... differ from the removal {want.tolist()[:5]}...")
        if not all(removes_after(batch + 1) for batch in deleted_batches):
            raise CrashCheckError(f"ids removed from batches that are never removed from: {sorted(deleted_batches)}")
        report = index.verify()
        return {"rows": len(ids), "batches": len(present), "removals": len(deleted_batches), "bytes": report["bytes"]}


def _messages(receive) -> list[tuple[str, int]]:
    """Everything a dead writer sent (whole messages: each is one write smaller than PIPE_BUF)."""
    messages = []
    try:
        while True:
            messages.append(receive.recv())
    except EOFError:
        receive.close()
    return messages


def run(path: Path, kills: int, *, seed: int = 0, max_delay: float = 0.15, progress: bool = True) -> dict:
    """Kill ``kills`` writers of a new index at ``path``; returns counts (raises CrashCheckError)."""
    tqindex.TurboQuantIndex(DIM, BITS, path=path, seed=seed).close()
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["tqindex", "stress_crash"])
    with tqindex.open(path) as index:
        expected = ExpectedCodes(index.codec, seed)
    rng = np.random.default_rng(seed)
    added: set[int] = set()
    removed: set[int] = set()
    in_flight: set[int] = set()
    counts = {"kills": 0, "checks": 0, "writers_that_flushed": 0, "corrupt_opens": 0}
    start = time.perf_counter()
    for _ in tqdm(range(kills), desc="kill -9", unit="kill", disable=not progress):
        receive, send = context.Pipe(duplex=False)
        writer = context.Process(target=_writer, args=(str(path), seed, send), daemon=True)
        writer.start()
        send.close()
        first_flush = rng.random() < 0.5  # half the kills wait for a flush, so every run makes progress
        messages = []
        for _ in range(2 if first_flush else 1):  # "ready", then the first "added"
            if not receive.poll(60):
                raise RuntimeError(f"writer stalled: exit code {writer.exitcode}")
            messages.append(receive.recv())
        counts["writers_that_flushed"] += first_flush
        time.sleep(rng.uniform(0, max_delay))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        counts["kills"] += writer.exitcode == -signal.SIGKILL
        messages += _messages(receive)
        first_batch = messages[0][1]  # ("ready", the batch it starts with)
        flushed = [batch for kind, batch in messages if kind == "added"]
        added.update(flushed)
        removed.update(batch for kind, batch in messages if kind == "removed")
        in_flight.add(max(flushed, default=first_batch - 1) + 1)
        try:
            seen = check(path, expected, added, removed, in_flight)
        except tqindex.CorruptIndexError:
            counts["corrupt_opens"] += 1
            raise
        counts["checks"] += 1
    return {
        **counts,
        **seen,
        "flushed_batches": len(added),
        "flushed_removals": len(removed),
        # killed after the commit, before flush() returned: kept whole, as the commit point says
        "batches_committed_unacknowledged": seen["batches"] - len(added),
        "lost_flushed_batches": 0,  # check() raises on the first one
        "seconds": round(time.perf_counter() - start, 1),
        "max_delay_s": max_delay,
    }


def _next_action(index: tqindex.TurboQuantIndex, seed: int) -> tuple[str, int]:
    """What the writer does next, from what it has committed: ("add", batch) or ("remove", batch)."""
    ids = np.asarray(index._store.column("ids"))
    last = int(ids.max()) // ID_STRIDE if len(ids) else -1
    if last >= 1 and removes_after(last):
        deleted = ids[np.asarray(index._store.column("deleted"))]
        if not np.any(deleted // ID_STRIDE == last - 1):
            return "remove", last - 1
    return "add", last + 1


def _saved_whole_or_absent(target: Path, source: tqindex.TurboQuantIndex, previous: int | None) -> None:
    """After a failed save: no index at ``target`` (or the previous one, ``previous`` rows), or a whole copy of ``source``."""
    try:
        saved = tqindex.open(target)
    except tqindex.IndexFormatError:
        if previous is not None:
            raise CrashCheckError(f"{target}: the index a failed save(overwrite=True) was to replace is gone")
        return
    with saved:
        saved.verify()
        if saved.ntotal not in ({previous} if previous is not None else set()) | {source.ntotal}:
            raise CrashCheckError(f"{target}: a failed save left an index of {saved.ntotal} vectors, neither the old nor the new")
    if any(target.parent.glob(f".{target.name}.*")):
        raise CrashCheckError(f"{target}: a failed save left its staging directory")


def run_io_errors(path: Path, faults: int, *, seed: int = 0, progress: bool = True) -> dict:
    """Inject ``faults`` I/O errors into a writer of a new index at ``path`` (see the module's
    docstring); returns the counts. Raises CrashCheckError (or CorruptIndexError) on the first loss."""
    tqindex.TurboQuantIndex(DIM, BITS, path=path, seed=seed).close()
    with tqindex.open(path) as index:
        expected = ExpectedCodes(index.codec, seed)
    rng = np.random.default_rng(seed)
    added: set[int] = set()
    removed: set[int] = set()
    in_flight: set[int] = set()
    counts = {"faults_injected": 0, "calls_that_raised": 0, "checks": 0, "corrupt_opens": 0, "calls_committed_despite_error": 0}
    by_kind = {kind: 0 for kind in ("write", "truncate", "fsync", "rename")}
    by_call = {call: 0 for call in ("add_with_ids", "remove_ids", "flush", "close", "save")}
    saves = [path.parent / "saved-a", path.parent / "saved-b"]
    saved_rows: dict[Path, int] = {}
    start = time.perf_counter()
    threads = torch.get_num_threads()
    expected.codec.encode(np.zeros((1, DIM), np.float32))  # numba's first parallel launch resets torch's threads:
    torch.set_num_threads(1)  # let it happen first, then encode as ExpectedCodes does (bit-identical factors)
    index = tqindex.open(path, "a")
    with FaultInjector(sync=False), tqdm(total=faults, desc="I/O errors", unit="fault", disable=not progress) as bar:
        while counts["faults_injected"] < faults:
            action, batch = _next_action(index, seed)
            call = rng.choice(["save", "flush", "close"], p=[0.5, 0.25, 0.25]) if rng.random() < 0.1 else action
            error = int(rng.choice(ERRNOS))
            last = {"add": 26, "remove": 14, "save": 68}.get(call, 16)  # about twice the call's I/O calls: half of them fail
            injector = FaultInjector(fail_at=int(rng.integers(1, last + 1)), error=error, persistent=rng.random() < 0.25)
            target = saves[int(rng.integers(2))]
            try:
                with injector:
                    if call == "add":
                        in_flight.add(batch)
                        index.add_with_ids(*batch_vectors(seed, batch), progress=False)
                        index.flush()
                    elif call == "remove":
                        index.remove_ids(removed_ids(seed, batch))
                        index.flush()
                    elif call == "save":
                        index.save(target, overwrite=True)
                    elif call == "flush":
                        index.flush()
                    else:
                        index.close()
                        index = tqindex.open(path, "a")
            except OSError as failure:
                if failure.errno != error or not injector.injected:
                    raise
                counts["calls_that_raised"] += 1
            if call == "close" and index._closed:  # the reopen failed (it does not write): open again
                index = tqindex.open(path, "a")
            if not injector.injected:  # the call made fewer I/O calls than fail_at: it returned
                if call == "add":
                    added.add(batch)
                elif call == "remove":
                    removed.add(batch)
                elif call == "save":
                    saved_rows[target] = index.ntotal
                continue
            counts["faults_injected"] += 1
            by_kind[injector.log[min(injector.fail_at) - 1]] += 1
            by_call[{"add": "add_with_ids", "remove": "remove_ids"}.get(call, call)] += 1
            if call == "save":
                _saved_whole_or_absent(target, index, saved_rows.get(target))
                with contextlib.suppress(tqindex.IndexFormatError), tqindex.open(target) as saved:
                    saved_rows[target] = saved.ntotal
            try:
                seen = check(path, expected, added, removed, in_flight)
            except tqindex.CorruptIndexError:
                counts["corrupt_opens"] += 1
                raise
            if seen["rows"] != index._rows:
                raise CrashCheckError(f"the writer sees {index._rows} rows, the index on disk holds {seen['rows']}")
            after = _next_action(index, seed)
            counts["calls_committed_despite_error"] += after != (action, batch) and call in ("add", "remove")
            counts["checks"] += 1
            bar.update(1)
    index.close()
    torch.set_num_threads(threads)
    seen = check(path, expected, added, removed, in_flight)
    return {
        **counts,
        "faults_by_kind": by_kind,
        "faults_by_call": by_call,
        **seen,
        "flushed_batches": len(added),
        "flushed_removals": len(removed),
        "lost_flushed_batches": 0,  # check() raises on the first one
        "lost_rows": 0,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=500)
    parser.add_argument("--io-errors", type=int, metavar="N", help="inject N I/O errors instead of killing writers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=0.15, help="seconds a writer runs at most before the kill")
    parser.add_argument("--dir", type=Path, help="where to put the index (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="write the counts here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        where = (args.dir or Path(tmp)) / "index"
        if args.io_errors:
            result = run_io_errors(where, args.io_errors, seed=args.seed, progress=not args.quiet)
        else:
            result = run(where, args.kills, seed=args.seed, max_delay=args.max_delay, progress=not args.quiet)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # for the forkserver's preload
    main()
