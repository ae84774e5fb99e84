"""ShardedIndex: one index split into on-disk shards, each held by a Ray actor.

Rows are routed to a shard by a hash of their id (splitmix64 of the id, modulo the shard count),
so an id lives in exactly one shard; a search is sent to every shard at once and the per-shard
top-k lists are merged by score, which gives the results of one index holding every row (the
same codec, and for IVF shards the same centroids, in every shard; ties aside). Each shard is an
ordinary on-disk index (`TurboQuantIndex` or `TurboQuantIVFIndex`) in ``<path>/shard-NNN``, with
the flat index's crash safety; ``<path>/manifest.json`` (format "tqindex-sharded") lists them.

A shard whose worker dies is reported with `ShardUnavailableError`, naming the Ray actor, its
process and node, the shard and its directory; ``reopen_shard`` starts a new actor on the
directory (its committed rows are all there), and ``tqindex.open(directory)`` opens it alone.

An add that spans several shards commits on each shard separately: a failure part way leaves
the shards that had committed with their rows (``contains`` tells which ids are stored).

Needs ray (``pip install 'tqindex[ray]'``). It uses the Ray cluster this process is connected
to (``ray.init(...)`` first to choose one; otherwise Ray starts a local one).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tqindex._arrays import as_float_rows, as_id_array, is_torch, like
from tqindex.errors import TQIndexError
from tqindex.ivf import check_k, train_centroids
from tqindex.storage import ColumnStore

FORMAT_NAME = "tqindex-sharded"


class ShardUnavailableError(TQIndexError, RuntimeError):
    """A shard's Ray actor died or cannot be reached; the message names it, its shard and directory."""


def _ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise ImportError("ShardedIndex runs its shards on Ray: pip install 'tqindex[ray]'") from error
    return ray


def shard_of(ids: np.ndarray, shards: int) -> np.ndarray:
    """The shard of each id: splitmix64(id) mod ``shards``, int64 ``(n,)`` (Steele, Lea, Flood,
    "Fast splittable pseudorandom number generators", OOPSLA 2014: its output mix)."""
    z = np.asarray(ids, dtype=np.int64).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((z ^ (z >> np.uint64(31))) % np.uint64(shards)).astype(np.int64)


def _open_when_unlocked(directory: str, mode: str, open_options: dict[str, Any], wait_s: float = 30.0) -> Any:
    """``tqindex.open``, retried while a writer that is being stopped (a replaced actor) still holds the lock."""
    import tqindex
    from tqindex.errors import IndexLockedError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return tqindex.open(directory, mode, **open_options)
        except IndexLockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class Shard:
    """What each Ray actor holds: one on-disk index, opened or created in its directory."""

    def __init__(self, directory: str, mode: str, create: dict[str, Any] | None, open_options: dict[str, Any]):
        import tqindex

        if create is None:
            self.index = _open_when_unlocked(directory, mode, open_options)
        elif "nlist" in create:
            self.index = tqindex.TurboQuantIVFIndex(path=directory, **create)
        else:
            self.index = tqindex.TurboQuantIndex(path=directory, **create)

    def describe(self) -> dict[str, Any]:
        """Process id, node address, live rows and the next free id of this shard."""
        import ray

        return {
            "pid": os.getpid(),
            "node": ray.util.get_node_ip_address(),
            "ntotal": self.index.ntotal,
            "next_id": self.index._next_free_id(),
        }

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Whether each id is stored (live): bool ``(n,)``."""
        return self.index._find_rows(ids) >= 0

    def add_with_ids(self, x: np.ndarray, ids: np.ndarray) -> int:
        self.index.add_with_ids(x, ids, progress=False)
        return self.index.ntotal

    def remove_ids(self, ids: np.ndarray) -> int:
        """Remove the stored ones of ``ids``; returns the live rows left."""
        present = ids[self.contains(ids)]
        if len(present):
            self.index.remove_ids(present)
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None, nprobe: int | None) -> tuple[np.ndarray, np.ndarray]:
        options = {} if nprobe is None else {"nprobe": nprobe}
        return self.index.search(queries, k, filter=allowed, **options)

    def close(self) -> None:
        self.index.close()


class ShardedIndex:
    """An index of ``shards`` on-disk shards in directory ``path``, each held by a Ray actor.

    Args:
        path: a new (or empty) directory; shard ``i`` lives in ``path/shard-{i:03d}``.
        shards: number of shards.
        dim, bits: as `TurboQuantIndex`.
        nlist: None for flat shards, or the lists of IVF shards (`TurboQuantIVFIndex`): then
            ``train`` on a sample first; every shard gets the same centroids.
        num_cpus: CPUs Ray reserves for each shard's actor.
        actor_options: more Ray actor options (e.g. ``{"scheduling_strategy": "SPREAD"}``).
        options: passed to each shard's index (metric, variant, seed, by_residual, nprobe, ...).

    ``add`` / ``add_with_ids`` / ``remove_ids`` / ``search(q, k, filter=, nprobe=)`` behave as on one
    index; ``workers()`` describes the actors; ``reopen_shard(i)`` replaces a dead one.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shards: int,
        dim: int,
        bits: float = 4,
        *,
        nlist: int | None = None,
        num_cpus: float = 1.0,
        actor_options: dict[str, Any] | None = None,
        **options: Any,
    ):
        _ray()
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise ValueError(f"shards must be a positive integer, got {shards!r}")
        self.path, self.mode = Path(path), "a"
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise ValueError(f"{self.path}: exists and is not an empty directory")
        create = {"dim": dim, "bits": bits, **options} | ({} if nlist is None else {"nlist": nlist})
        self._setup(shards, create, num_cpus, actor_options)
        # check the options once here, so that a bad one fails before any directory is made
        from tqindex import TurboQuantIndex, TurboQuantIVFIndex

        self._probe = TurboQuantIVFIndex(**create) if nlist is not None else TurboQuantIndex(**create)
        if nlist is None:
            self._start(create)

    def _setup(self, shards: int, create: dict[str, Any], num_cpus: float, actor_options: dict[str, Any] | None) -> None:
        self.shards, self._create_options = shards, create
        self._actor_options = {"num_cpus": num_cpus, **(actor_options or {})}
        self._store: ColumnStore | None = None
        self._actors: list[Any] = []
        self._workers: list[dict[str, Any]] = []
        self._closed = False

    @property
    def dim(self) -> int:
        return int(self._create_options["dim"])

    @property
    def is_trained(self) -> bool:
        return self._store is not None

    def directory(self, shard: int) -> Path:
        """The directory of shard ``shard``."""
        return self.path / f"shard-{shard:03d}"

    def train(self, x: Any, *, niter: int = 10, progress: bool | None = None) -> None:
        """IVF shards: fit the centroids on ``x`` (a sample) here, then create every shard with them."""
        if "nlist" not in self._create_options:
            raise ValueError("train is for IVF shards (ShardedIndex(..., nlist=...)); flat shards need none")
        if self.is_trained:
            raise ValueError("the index is already trained")
        rows = self._probe._vectors(x, "x").numpy()
        seed = int(self._probe.codec.config.seed)
        centroids = train_centroids(rows, self._create_options["nlist"], niter=niter, seed=seed, progress=progress)
        self._start(self._create_options | {"centroids": centroids})

    def _start(self, create: dict[str, Any]) -> None:
        """Write the manifest and start one actor per shard, creating its index."""
        meta = {"shards": self.shards, "directories": [self.directory(i).name for i in range(self.shards)]}
        meta["options"] = {key: value for key, value in self._create_options.items()}
        self._store = ColumnStore.create(self.path, format_name=FORMAT_NAME, meta=meta, fixed={}, columns={})
        self._launch([(i, create) for i in range(self.shards)], "a", {})

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        mode: str = "r",
        *,
        num_cpus: float = 1.0,
        actor_options: dict[str, Any] | None = None,
        **open_options: Any,
    ) -> "ShardedIndex":
        """Open a sharded index: one actor per shard opens its directory in ``mode`` ("r" or "a")."""
        _ray()
        store = ColumnStore.open(path, format_name=FORMAT_NAME, mode=mode)
        index = cls.__new__(cls)
        index.path, index.mode = Path(path), mode
        index._setup(int(store.meta["shards"]), dict(store.meta["options"]), num_cpus, actor_options)
        index._store = store
        index._launch([(i, None) for i in range(index.shards)], mode, open_options)
        return index

    def _launch(self, which: list[tuple[int, dict[str, Any] | None]], mode: str, open_options: dict[str, Any]) -> None:
        """Start actors for shards ``which`` ((shard, create options or None to open)), and describe them."""
        ray = _ray()
        remote = ray.remote(Shard)
        if not self._actors:
            self._actors, self._workers = [None] * self.shards, [{} for _ in range(self.shards)]
        for shard, create in which:
            name = f"tqindex-shard-{shard:03d}@{self.path.resolve()}"
            actor = remote.options(name=name, **self._actor_options).remote(str(self.directory(shard)), mode, create, open_options)
            self._actors[shard] = actor
            self._workers[shard] = {"shard": shard, "name": name, "directory": str(self.directory(shard))}
        described = self._call([shard for shard, _ in which], "describe")
        for shard, info in described.items():
            self._workers[shard] |= info

    def _call(self, shards: list[int], method: str, *args_of: Any) -> dict[int, Any]:
        """Call ``method`` on the actors of ``shards`` at once (``args_of[j]`` the arguments of
        ``shards[j]``, or none); their results by shard. A dead actor: ShardUnavailableError."""
        ray = _ray()
        futures = {}
        for j, shard in enumerate(shards):
            args = args_of[j] if args_of else ()
            futures[shard] = getattr(self._actors[shard], method).remote(*args)
        results = {}
        for shard, future in futures.items():
            try:
                results[shard] = ray.get(future)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as error:
                worker = self._workers[shard]
                where = f"pid {worker['pid']} on {worker['node']}" if "pid" in worker else "while starting"
                cause = " ".join(str(error).split())[:400]
                raise ShardUnavailableError(
                    f"shard {shard} is unavailable: its Ray actor {worker['name']!r} ({where}) died or cannot be reached "
                    f"({type(error).__name__}: {cause}). Its committed rows are in {worker['directory']}: "
                    f"reopen_shard({shard}) starts a new actor there, or tqindex.open({worker['directory']!r}) opens it alone."
                ) from error
        return results

    def reopen_shard(self, shard: int) -> None:
        """Start a new actor on shard ``shard``'s directory (after its worker died)."""
        self._check_open()
        if not 0 <= shard < self.shards:
            raise ValueError(f"shard must be in 0..{self.shards - 1}, got {shard}")
        try:
            _ray().kill(self._actors[shard])
        except Exception:  # noqa: BLE001 - already gone: nothing to stop
            pass
        self._launch([(shard, None)], self.mode, {})

    def workers(self) -> list[dict[str, Any]]:
        """Per shard: its number, actor name, pid and node, directory, and live rows when last asked."""
        return [dict(worker) for worker in self._workers]

    # ---- sizes ------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        """Live vectors over all shards."""
        return sum(worker.get("ntotal", 0) for worker in self._workers)

    def __len__(self) -> int:
        return self.ntotal

    # ---- adding and removing --------------------------------------------------------------------
    def add(self, x: Any) -> np.ndarray:
        """Add vectors ``(n, dim)`` under the next sequential ids (after the largest ever used); returns them."""
        self._check_writable()
        rows = as_float_rows(x, self.dim, "x")
        start = max(worker["next_id"] for worker in self._workers)
        ids = np.arange(start, start + rows.shape[0], dtype=np.int64)
        self._route(rows.numpy(), ids)
        return ids

    def add_with_ids(self, x: Any, ids: Any) -> None:
        """Add vectors ``(n, dim)`` under ``ids`` (int64, non-negative, new and distinct), each to its shard."""
        self._check_writable()
        rows = as_float_rows(x, self.dim, "x").numpy()
        ids = as_id_array(ids)
        if len(ids) != rows.shape[0]:
            raise ValueError(f"got {rows.shape[0]} vectors but {len(ids)} ids")
        if len(ids) and ids.min() < 0:
            raise ValueError(f"ids must be >= 0 (-1 marks padding in search results), got {int(ids.min())}")
        unique, counts = np.unique(ids, return_counts=True)
        if np.any(counts > 1):
            raise ValueError(f"duplicate ids in the batch: {unique[counts > 1][:5].tolist()}")
        taken = ids[self.contains(ids)]
        if len(taken):
            raise ValueError(f"ids already in the index: {taken[:5].tolist()}")
        self._route(rows, ids)

    def _route(self, rows: np.ndarray, ids: np.ndarray) -> None:
        owner = shard_of(ids, self.shards)
        shards = [s for s in range(self.shards) if np.any(owner == s)]
        added = self._call(shards, "add_with_ids", *[(rows[owner == s], ids[owner == s]) for s in shards])
        for shard, ntotal in added.items():
            self._workers[shard]["ntotal"] = ntotal
            self._workers[shard]["next_id"] = max(self._workers[shard]["next_id"], int(ids[owner == shard].max()) + 1)

    def contains(self, ids: Any) -> np.ndarray:
        """Whether each id is stored: bool ``(n,)``."""
        self._check_open()
        ids = as_id_array(ids)
        owner = shard_of(ids, self.shards)
        shards = [s for s in range(self.shards) if np.any(owner == s)]
        found = np.zeros(len(ids), dtype=bool)
        for shard, flags in self._call(shards, "contains", *[(ids[owner == s],) for s in shards]).items():
            found[owner == shard] = flags
        return found

    def remove_ids(self, ids: Any) -> int:
        """Remove vectors by id; returns how many. Unknown ids: KeyError, nothing removed."""
        self._check_writable()
        ids = np.unique(as_id_array(ids))
        missing = ids[~self.contains(ids)]
        if len(missing):
            raise KeyError(f"ids not in the index: {missing[:5].tolist()}")
        owner = shard_of(ids, self.shards)
        shards = [s for s in range(self.shards) if np.any(owner == s)]
        for shard, ntotal in self._call(shards, "remove_ids", *[(ids[owner == s],) for s in shards]).items():
            self._workers[shard]["ntotal"] = ntotal
        return len(ids)

    # ---- searching ------------------------------------------------------------------------------
    def search(self, queries: Any, k: int, *, filter: Any = None, nprobe: int | None = None) -> tuple[Any, Any]:
        """Top-``k`` over every shard: each shard's top-k, merged by score (by distance, smallest
        first, for metric "l2"). As `TurboQuantIndex.search` (``nprobe`` for IVF shards): float32
        ``(m, k)`` scores and int64 ``(m, k)`` ids, padded."""
        self._check_open()
        rows = as_float_rows(queries, self.dim, "queries").numpy()
        k = check_k(k, self.ntotal)
        allowed = None if filter is None else np.unique(as_id_array(filter, "filter"))
        owner = None if allowed is None else shard_of(allowed, self.shards)
        shared = _ray().put(rows)  # one copy in the object store, read by every shard
        shards, args = [], []
        for shard, worker in enumerate(self._workers):
            mine = None if allowed is None else allowed[owner == shard]
            if worker["ntotal"] and (mine is None or len(mine)):
                shards.append(shard)
                args.append((shared, min(k, worker["ntotal"]), mine, nprobe))
        ascending = self._create_options.get("metric") == "l2"  # squared distances: the smallest are best
        scores = np.full((rows.shape[0], k), np.inf if ascending else -np.inf, dtype=np.float32)
        found = np.full((rows.shape[0], k), -1, dtype=np.int64)
        if shards:
            results = self._call(shards, "search", *args)
            all_scores = np.concatenate([results[s][0] for s in shards], axis=1)
            all_ids = np.concatenate([results[s][1] for s in shards], axis=1)
            best = np.argsort(all_scores if ascending else -all_scores, axis=1, kind="stable")[:, :k]
            kept = min(k, best.shape[1])
            scores[:, :kept] = np.take_along_axis(all_scores, best, axis=1)
            found[:, :kept] = np.take_along_axis(all_ids, best, axis=1)
        return like(torch.from_numpy(scores), is_torch(queries)), like(torch.from_numpy(found), is_torch(queries))

    # ---- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Close every shard (committing what they hold) and stop their actors; idempotent."""
        if self._closed:
            return
        self._closed = True
        ray = _ray()
        live = [s for s, actor in enumerate(self._actors) if actor is not None]
        try:
            self._call(live, "close")
        except ShardUnavailableError:
            pass  # a dead shard has nothing left to commit: its rows are on disk
        finally:
            for actor in self._actors:
                if actor is not None:
                    ray.kill(actor)
            if self._store is not None:
                self._store.close()

    def __enter__(self) -> "ShardedIndex":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the index is closed")
        if not self.is_trained:
            raise ValueError("the index is not trained: call train(x) first (IVF shards)")

    def _check_writable(self) -> None:
        self._check_open()
        if self.mode != "a":
            raise ValueError(f"the sharded index at {self.path} is open read-only (mode='r')")

    def __repr__(self) -> str:
        return f"ShardedIndex(shards={self.shards}, ntotal={self.ntotal}, options={self._create_options}, in {self.path})"
