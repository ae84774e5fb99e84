"""TurboQuantIVFIndex: inverted-file (IVF) search over TurboQuant codes, with FAISS's habits.

A coarse quantizer of ``nlist`` centroids (k-means by `faiss.Kmeans`) splits the vectors into
lists: each vector goes to the list of its nearest centroid (L2) and is encoded by the flat
index's codec, either itself or, with ``by_residual=True`` (the default; it ranks better at equal
bytes: WordNet 100k x 384, nlist 1024, nprobe 32, 10-recall@10 0.844 / 0.887 / 0.911 against
0.830 / 0.880 / 0.905 at 2 / 3 / 4 bits, benchmarks/ivf_sweep.py), its residual to that centroid.
A search scores the centroids,
probes the ``nprobe`` lists of largest inner product with each query and scans only their rows,
with the flat index's scan kernels: over lists in RAM the compiled fast-scan (the default on the
CPU) scans every probed list for the queries that probe it in one or two kernel calls
(`FastScanner.scan_lists`: lists spread over the threads, each with its key columns, each
query's tables made once and its candidates rescored once a call); on disk and with the
other scanners, `kernels.scan_groups_topk` list by list or query by query, candidates rescored
exactly. With residuals a row scores ``<q, c_list> + <q, residual>``. This is IVFADC
(Jégou, Douze, Schmid, "Product quantization for nearest neighbor search", TPAMI 2011, sec. IV)
with TurboQuant codes in place of PQ.

Storage: the flat index's columns plus ``lists`` (int32, each row's list) in a ColumnStore of
format "tqindex-ivf", the centroids a fixed array beside the codec's (docs/format.md). Each add
is one commit, its rows ordered by list, so a list is read from disk in one run per add batch
(``save`` writes every list in one run); in RAM the index holds the rows' order by list, the
list offsets and the ids in that order (16 bytes per row). Deletions, filters, the one-writer
lock and the crash-safety contract are the flat index's (`TurboQuantIndex`).
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from tqindex._arrays import as_float_rows, as_id_array, is_torch, like, power_of_two_scaled
from tqindex.codec import CodecConfig, TurboQuantCodec
from tqindex.errors import CorruptIndexError
from tqindex.index import TurboQuantIndex, _check_scan_args, _column_specs
from tqindex.kernels import Chunk, QueryChunk, get_scanner, scan_groups_topk
from tqindex.kernels.fastscan import BLOCK_ROWS, FastScanner, top_k_rows
from tqindex.kernels.lut import LutScanner
from tqindex.memstore import MemoryStore
from tqindex.storage import ColumnSpec, ColumnStore

FORMAT_NAME = "tqindex-ivf"
METRICS = ("ip", "cosine")
_SCORED_AT_ONCE = 1 << 24  # rows x centroids scored in one matrix product (64 MiB of float32)
_LUT_QUERY_BLOCK = 64  # the numba look-up-table scanner holds ~200 KB of tables per query (4 bits, d=384)
_COPY_ROWS = 1 << 16  # rows per step when saving
#: nprobe from which the fast-scan over lists scans each query's nearest list in a pass of its
#: own first. Measured (WordNet 100k, nlist 1,024, 4 bits, 2 threads, interleaved in one process):
#: one pass 3-10% faster at nprobe 2-8 and at par at 16; two passes 1.5-4% faster at 32-128
_TWO_PASSES_FROM = 32
#: see TurboQuantIVFIndex.list_major_queries. Measured (WordNet 100k, 4 bits, nlist 1024, shared
#: 2-core machine, one thread): with the numba/torch scanners, at 3.9 queries per list query-major
#: ran 1.4x list-major, at 7.8 list-major ran 1.4x query-major; with the fast-scan the orders tie
#: near 4 queries per list at nprobe 8 and near 12 at nprobe 32, within 20% of each other from 4 to 16
#: (measured before the fast-scan over lists in RAM made one call of both; it still scans lists on disk)
_LIST_MAJOR_QUERIES = 6.0


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "TurboQuantIVFIndex.train clusters with FAISS's k-means: pip install 'tqindex[ivf]' (faiss-cpu), "
            "or give the centroids (TurboQuantIVFIndex(..., centroids=...))"
        ) from error
    return faiss


def train_centroids(x: np.ndarray, nlist: int, *, niter: int = 10, seed: int = 0, progress: bool | None = None) -> np.ndarray:
    """k-means centroids of the rows of ``x`` (float32 ``(n, d)``, ``n >= nlist``): float32 ``(nlist, d)``.

    FAISS's `faiss.Kmeans` (L2, its defaults: random initial centroids from the rows, at most 256
    training rows per centroid, sampled with ``seed``; 10 iterations as FAISS's IVF indexes),
    run one iteration per call so that a progress bar can follow it; the centroids are the same
    as one call of ``niter`` iterations (checked in tests/test_ivf.py).
    """
    faiss = _faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] < nlist:
        raise ValueError(f"k-means needs at least nlist={nlist} training vectors, got {x.shape[0]}")
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 1:
        raise ValueError(f"niter must be a positive integer, got {niter!r}")
    kmeans = faiss.Kmeans(x.shape[1], nlist, niter=1, seed=seed, verbose=False)
    centroids = None
    for _ in tqdm(range(niter), desc="k-means", unit="iter", disable=None if progress is None else not progress):
        kmeans.train(x, init_centroids=centroids)
        centroids = np.array(kmeans.centroids, dtype=np.float32)
    return centroids


def check_k(k: Any, ntotal: int) -> int:
    """``k`` as an int after checking it against ``ntotal`` (the flat index's rules)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if ntotal == 0:
        raise ValueError("the index is empty: add vectors before searching")
    if k > ntotal:
        raise ValueError(f"k={k} exceeds the {ntotal} vectors in the index")
    return int(k)


def _ivf_column_specs(codec: TurboQuantCodec, metric: str) -> dict[str, ColumnSpec]:
    """The flat index's columns and ``lists`` (int32, each row's list)."""
    return {**_column_specs(codec, metric), "lists": ColumnSpec("int32", ())}


class _OneIntraOpThread:
    """A context in which torch runs each op on one thread (and the numba scanners, which follow
    torch's count); nested and concurrent uses share it, and the last one out restores the count.

    An IVF search scans many small chunks: a parallel region per small op costs more than it
    gains, the more so on a loaded machine (measured on the shared 2-core machine: WordNet 100k,
    1,000 queries, nprobe 32, 1,618 QPS on one thread against 73 on two). Spreading query blocks
    over a pool of Python threads gained nothing (CPU time = wall time: the many small ops hold the
    GIL between them) and cost 1.5x the CPU (each block scans every list): an IVF search uses one
    core; shards (`tqindex.shards`) use more.
    """

    def __init__(self) -> None:
        self._lock, self._depth, self._saved = threading.Lock(), 0, 1

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._saved = torch.get_num_threads()
                torch.set_num_threads(1)
            self._depth += 1

    def __exit__(self, *exc: Any) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                torch.set_num_threads(self._saved)


_ONE_INTRA_OP_THREAD = _OneIntraOpThread()


def _check_nprobe(nprobe: Any) -> int:
    if isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or nprobe < 1:
        raise ValueError(f"nprobe must be a positive integer, got {nprobe!r}")
    return int(nprobe)


@dataclass(frozen=True)
class _Lists:
    """The live rows ordered by list ("slots"): list ``l`` is slots ``offsets[l]:offsets[l + 1]``."""

    order: np.ndarray  # int64 (live,): the row number of each slot
    offsets: np.ndarray  # int64 (nlist + 1,)
    ids: np.ndarray  # int64 (live,): the id of each slot
    packed: torch.Tensor | None  # uint8 (live, code_bytes) in slot order, held in RAM; None: read from the store
    factors: torch.Tensor | None  # float32 (live, F), the same
    blocks: dict = field(default_factory=dict)  # "blocks": the fast-scan's `_Blocks`, made at its first search


@dataclass(frozen=True)
class _Blocks:
    """The lists in RAM laid out again for the fast-scan: each list starts at a multiple of
    ``BLOCK_ROWS`` positions, so its key columns are a run of whole blocks (the pads between lists
    are never scanned: a list's rows end where it does)."""

    packed: np.ndarray  # uint8 (positions, code_bytes)
    factors: np.ndarray  # float32 (positions, F)
    key_columns: np.ndarray  # uint8 (positions / BLOCK_ROWS, n_keys / 2, BLOCK_ROWS)
    starts: np.ndarray  # int64 (nlist,): the first position of each list
    slots: np.ndarray  # int64 (positions,): the slot at each position, -1 at pads

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.packed, self.factors, self.key_columns, self.starts, self.slots))

    @classmethod
    def of(cls, lists: _Lists, scanner: FastScanner) -> "_Blocks":
        sizes = np.diff(lists.offsets)
        padded = -(-sizes // BLOCK_ROWS) * BLOCK_ROWS
        starts = np.concatenate([[0], np.cumsum(padded)[:-1]]).astype(np.int64)
        slots = np.full(int(padded.sum()), -1, dtype=np.int64)
        slot = np.arange(len(lists.order))
        positions = np.repeat(starts - lists.offsets[:-1], sizes) + slot
        slots[positions] = slot
        packed = np.zeros((len(slots), lists.packed.shape[1]), np.uint8)
        factors = np.zeros((len(slots), lists.factors.shape[1]), np.float32)
        packed[positions], factors[positions] = lists.packed.numpy(), lists.factors.numpy()
        return cls(packed, factors, scanner.key_columns(packed), starts, slots)


class TurboQuantIVFIndex(TurboQuantIndex):
    """Inverted-file top-k inner-product search over b-bit TurboQuant codes.

    Args:
        dim: vector dimension.
        nlist: number of lists (k-means centroids).
        bits, metric, variant, rotation, scale, seed, search, backend, chunk_rows: as
            `TurboQuantIndex` (metric "ip" or "cosine"); ``chunk_rows`` bounds the rows of one
            list scanned per step.
        by_residual: encode each vector's residual to its list's centroid (True) or the vector.
        nprobe: lists probed per query when ``search`` is not given one (FAISS's default, 1).
        centroids: float32 ``(nlist, dim)``: trained at once with these (shards of one index
            share them); None: call ``train`` first.
        path: None for an index in RAM, or a new directory, created by ``train`` (or at once with
            ``centroids``).

    ``train(x)``, then ``add`` / ``add_with_ids`` in batches (each batch one commit), ``search(q, k,
    filter=, nprobe=)``, ``remove_ids``, ``save`` and ``tqindex.open`` as the flat index. With
    ``nprobe = nlist`` every row is scanned and the results are the flat index's (same codec) for
    vectors, and the same ranking of ``<q, c> + <q, r>`` for residuals.
    """

    def __init__(
        self,
        dim: int,
        nlist: int,
        bits: float = 4,
        *,
        metric: str = "ip",
        by_residual: bool = True,
        nprobe: int = 1,
        centroids: Any = None,
        variant: str = "mse",
        rotation: str = "auto",
        scale: str = "auto",
        seed: int = 0,
        search: bool | str = "auto",
        path: str | os.PathLike | None = None,
        backend: str = "auto",
        chunk_rows: int = 8192,
    ):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if isinstance(nlist, bool) or not isinstance(nlist, (int, np.integer)) or nlist < 1:
            raise ValueError(f"nlist must be a positive integer, got {nlist!r}")
        if not isinstance(by_residual, (bool, np.bool_)):
            raise TypeError(f"by_residual must be a bool, got {by_residual!r}")
        _check_scan_args(backend, chunk_rows)
        codec = TurboQuantCodec(dim, bits, variant=variant, rotation=rotation, scale=scale, seed=seed, search=search)
        if codec.config.quantizer != "scalar":
            raise ValueError("the IVF index scans scalar codes only")
        self._setup(codec, metric, int(nlist), bool(by_residual), nprobe, backend, chunk_rows)
        self._path = None if path is None else os.fspath(path)
        if path is not None and os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise ValueError(f"{path}: exists and is not an empty directory")
        if centroids is not None:
            self._create(self._checked_centroids(centroids))

    def _setup(self, codec: TurboQuantCodec, metric: str, nlist: int, by_residual: bool, nprobe: int, backend: str, chunk_rows: int) -> None:
        self.codec, self.metric, self.nlist, self.by_residual = codec, metric, nlist, by_residual
        self.nprobe, self.backend, self.chunk_rows = nprobe, backend, chunk_rows
        #: a search is scanned list by list (each list once, for all the queries probing it) when
        #: its queries probe each list at least this many times on average (``m * nprobe / nlist``),
        #: else query by query (each query's lists gathered into one chunk, one scan per query).
        #: On disk and for the numba/torch scanners; the fast-scan over lists in RAM does both at once
        #: (`FastScanner.scan_lists`)
        self.list_major_queries = _LIST_MAJOR_QUERIES
        _check_nprobe(nprobe)
        self.device = torch.device("cpu")
        self._store: Any = None
        self._closed = False
        self._in_ram = False  # set by to("cpu"): hold an on-disk index's codes in RAM
        self._lists: _Lists | None = None  # built at the first search after a change
        self._centroids = torch.zeros((0, codec.dim))

    # ---- training -------------------------------------------------------------------------
    @property
    def is_trained(self) -> bool:
        return self._store is not None

    @property
    def centroids(self) -> np.ndarray:
        """The coarse centroids, float32 ``(nlist, dim)`` (read-only; empty before training)."""
        view = self._centroids.numpy().view()
        view.flags.writeable = False
        return view

    def train(self, x: Any, *, niter: int = 10, progress: bool | None = None) -> None:
        """Fit the ``nlist`` centroids to ``x`` ``(n, dim)`` (n >= nlist; a sample of the collection
        will do: k-means keeps at most 256 rows per centroid) and create the store."""
        if self._closed:
            raise ValueError("the index is closed")
        if self.is_trained:
            raise ValueError("the index is already trained")
        rows = self._vectors(x, "x").numpy()
        self._create(train_centroids(rows, self.nlist, niter=niter, seed=int(self.codec.config.seed), progress=progress))

    def _checked_centroids(self, centroids: Any) -> np.ndarray:
        rows = as_float_rows(centroids, self.dim, "centroids", allow_1d=False)
        if rows.shape[0] != self.nlist:
            raise ValueError(f"centroids must have shape ({self.nlist}, {self.dim}), got {tuple(rows.shape)}")
        return rows.numpy().copy()

    def _create(self, centroids: np.ndarray) -> None:
        meta = {"codec": self.codec.config.to_dict(), "metric": self.metric, "nlist": self.nlist, "by_residual": self.by_residual}
        fixed = {**self.codec.state(), "centroids": centroids}
        columns = _ivf_column_specs(self.codec, self.metric)
        if self._path is None:
            store = MemoryStore(meta=meta, fixed=fixed, columns=columns)
        else:
            store = ColumnStore.create(self._path, format_name=FORMAT_NAME, meta=meta, fixed=fixed, columns=columns)
        self._adopt(store, centroids)

    def _adopt(self, store: Any, centroids: np.ndarray) -> None:
        self._centroids = torch.from_numpy(np.array(centroids, dtype=np.float32))
        self._store = store
        self._attach(self.codec, self.metric, store, self.backend, self.chunk_rows)

    # ---- opening --------------------------------------------------------------------------
    @classmethod
    def open(
        cls, path: str | os.PathLike, mode: str = "r", *, backend: str = "auto", chunk_rows: int = 8192, nprobe: int = 1
    ) -> "TurboQuantIVFIndex":
        """Open an IVF index saved at ``path``: mode "r" (read only) or "a" (append, remove)."""
        _check_scan_args(backend, chunk_rows)
        _check_nprobe(nprobe)
        store = ColumnStore.open(path, format_name=FORMAT_NAME, mode=mode)
        try:
            meta = store.meta
            config = CodecConfig.from_dict(meta["codec"])
            if config.quantizer != "scalar":
                raise ValueError(f"its codec writes {config.quantizer} codes, which the index's scanners do not read")
            codec = TurboQuantCodec.from_config(config, store.fixed)
            metric, nlist, by_residual = meta["metric"], meta["nlist"], meta["by_residual"]
            if metric not in METRICS:
                raise ValueError(f"unknown metric {metric!r}")
            if not isinstance(nlist, int) or isinstance(nlist, bool) or nlist < 1 or not isinstance(by_residual, bool):
                raise ValueError(f"bad nlist {nlist!r} or by_residual {by_residual!r}")
            centroids = store.fixed["centroids"]
            if centroids.dtype != np.float32 or centroids.shape != (nlist, codec.dim):
                raise ValueError(f"centroids are {centroids.dtype} {centroids.shape}, expected float32 {(nlist, codec.dim)}")
            expected = {n: (np.dtype(s.dtype), tuple(s.row_shape)) for n, s in _ivf_column_specs(codec, metric).items()}
            found = {n: (np.dtype(s.dtype), tuple(s.row_shape)) for n, s in store.columns.items()}
            if found != expected:
                raise ValueError(f"columns {found} do not match the codec's {expected}")
            index = cls.__new__(cls)
            index._setup(codec, metric, nlist, by_residual, nprobe, backend, chunk_rows)
        except (KeyError, TypeError, ValueError) as error:
            store.close()
            raise CorruptIndexError(f"{path}: not a valid tqindex IVF index: {error}") from error
        index._path = os.fspath(path)
        index._adopt(store, centroids)
        return index

    def _load_rows(self) -> None:
        super()._load_rows()
        rows = self._store.rows("lists")
        if rows != self._rows:
            raise CorruptIndexError(f"{self._store.path}: column 'lists' holds {rows} rows, the others {self._rows}")
        lists = self._store.column("lists")
        if len(lists) and (lists.min() < 0 or lists.max() >= self.nlist):
            raise CorruptIndexError(f"{self._store.path}: column 'lists' names lists outside 0..{self.nlist - 1}")
        self._lists = None

    # ---- sizes ----------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return super().ntotal if self.is_trained else 0

    def list_sizes(self) -> np.ndarray:
        """Live vectors in each list: int64 ``(nlist,)``."""
        self._check_open()
        return np.diff(self._inverted().offsets)

    def memory_usage(self) -> int:
        """Bytes this index holds in RAM (an on-disk index keeps its codes on disk unless ``to("cpu")``)."""
        held = self._centroids.numel() * 4
        if not self.is_trained:
            return held
        held += super().memory_usage()
        if self._lists is not None:
            lists = self._lists
            held += lists.order.nbytes + lists.offsets.nbytes + lists.ids.nbytes
            if lists.packed is not None and not isinstance(self._store, MemoryStore):
                held += lists.packed.numel() + lists.factors.numel() * 4
            held += sum(blocks.nbytes for blocks in lists.blocks.values())
        return held

    def to(self, device: str | torch.device) -> "TurboQuantIVFIndex":
        """``to("cpu")``: hold the codes of an on-disk index in RAM, in list order; returns self.

        The IVF index scans on the CPU; other devices are refused."""
        self._check_open()
        if torch.device(device).type != "cpu":
            raise ValueError(f"TurboQuantIVFIndex scans on the CPU only, not {device!r}")
        self._in_ram, self._lists = True, None
        return self

    # ---- adding and removing ---------------------------------------------------------------
    def _append(self, vectors: torch.Tensor, ids: np.ndarray, progress: bool | None, extra: dict[str, np.ndarray] | None = None) -> None:
        lists = self._assign(vectors)
        order = np.argsort(lists, kind="stable")
        lists, ids = lists[order], ids[order]
        vectors = vectors[torch.from_numpy(order)]
        if self.by_residual:
            vectors = vectors - self._centroids[torch.from_numpy(lists)]
        super()._append(vectors, ids, progress, {"lists": lists.astype(np.int32)})
        self._lists = None

    def _assign(self, vectors: torch.Tensor) -> np.ndarray:
        """Nearest centroid (L2) of each row ``(n, dim)``: int64 ``(n,)``."""
        centroids = self._centroids
        half_norms = 0.5 * (centroids * centroids).sum(dim=1)
        step = max(1, _SCORED_AT_ONCE // self.nlist)
        parts = [(vectors[i : i + step] @ centroids.t() - half_norms).argmax(dim=1) for i in range(0, vectors.shape[0], step)]
        return torch.cat(parts).numpy() if parts else np.zeros(0, dtype=np.int64)

    def remove_ids(self, ids: Any) -> int:
        removed = super().remove_ids(ids)
        self._lists = None
        return removed

    remove_ids.__doc__ = TurboQuantIndex.remove_ids.__doc__

    # ---- reading --------------------------------------------------------------------------
    def search(self, queries: Any, k: int, *, filter: Any = None, nprobe: int | None = None) -> tuple[Any, Any]:
        """Top-``k`` inner products for each query ``(m, dim)`` (or one ``(dim,)``) among the rows of
        the ``nprobe`` lists (default ``self.nprobe``; above nlist means nlist) nearest to it.

        ``filter``, the results and the errors are the flat index's (`TurboQuantIndex.search`);
        fewer than ``k`` rows in the probed lists pad the results with ``-inf`` / ``-1``.
        """
        self._check_open()
        rows, exponents = power_of_two_scaled(self._vectors(queries, "queries"))  # exact; a query's ranking ignores its scale
        k = check_k(k, self.ntotal)
        nprobe = min(_check_nprobe(self.nprobe if nprobe is None else nprobe), self.nlist)
        allowed = None if filter is None else np.unique(as_id_array(filter, "filter"))
        lists = self._inverted()
        m = rows.shape[0]
        block = max(1, min(m, _SCORED_AT_ONCE // self.nlist))
        per_list = block * nprobe / self.nlist  # queries probing each list, on average
        query_major = per_list < self.list_major_queries
        scanner = get_scanner(self.codec, self.backend, "cpu", queries=1 if query_major else math.ceil(per_list))
        if isinstance(scanner, LutScanner):
            block = min(block, _LUT_QUERY_BLOCK)
        scores = torch.full((m, k), float("-inf"))
        found = np.full((m, k), -1, dtype=np.int64)

        threads = torch.get_num_threads()

        def run(start: int) -> None:
            stop = min(start + block, m)
            # the few large products on the caller's threads; the rest, many small operations, on one
            # (see _OneIntraOpThread), except the fast-scan over lists in RAM, which spreads the lists over them
            coarse = rows[start:stop] @ self._centroids.t()  # (b, nlist): <q, c> of every list
            rotated = self.codec.rotate_rows(rows[start:stop])  # rows checked above: no second pass over them
            with _ONE_INTRA_OP_THREAD:
                scores[start:stop], slots = self._search_block(scanner, rotated, coarse, k, nprobe, lists, allowed, query_major, threads)
            slots = slots.numpy()
            found[start:stop] = np.where(slots >= 0, lists.ids[np.maximum(slots, 0)], -1)

        for start in range(0, m, block):
            run(start)
        scores = self._rescaled_scores(scores, found, exponents)
        return like(scores, is_torch(queries)), like(torch.from_numpy(found), is_torch(queries))

    def _search_block(
        self, scanner: Any, rotated: torch.Tensor, coarse: torch.Tensor, k: int, nprobe: int, lists: _Lists, allowed: np.ndarray | None,
        query_major: bool, threads: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores float32 ``(b, k)`` and slots int64 ``(b, k)`` of a block of queries, rotated ``(b, W)``,
        with ``coarse`` ``(b, nlist)`` their inner products with the centroids."""
        probe_scores, probes = top_k_rows(coarse, nprobe, threads)
        bias_of = None
        if self.by_residual:
            offsets = lists.offsets

            def bias_of(slots: torch.Tensor) -> torch.Tensor:
                owner = np.searchsorted(offsets, slots.clamp_min(0).numpy(), side="right") - 1
                return coarse.gather(1, torch.from_numpy(owner))

        bias = probe_scores if self.by_residual else None
        if isinstance(scanner, FastScanner) and lists.packed is not None:
            return self._search_blocks(scanner, rotated, k, probes, bias, lists, allowed, threads)
        if query_major:
            groups = self._query_groups(lists, probes, bias, allowed)
        else:
            groups = self._list_groups(lists, probes, bias, allowed)
        return scan_groups_topk(self.codec, scanner, rotated, groups, k, self._fetch_slots, bias_of)

    def _search_blocks(
        self, scanner: FastScanner, rotated: torch.Tensor, k: int, probes: torch.Tensor, bias: torch.Tensor | None, lists: _Lists,
        allowed: np.ndarray | None, threads: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`_search_block` for the fast-scan over lists in RAM: every probed list scanned for the
        queries that probe it, with its key columns, in one kernel call (`FastScanner.scan_lists`), or
        from ``_TWO_PASSES_FROM`` probes in two: each query's nearest list, then the others."""
        blocks = lists.blocks.get("blocks")
        if blocks is None:
            blocks = lists.blocks["blocks"] = _Blocks.of(lists, scanner)
        valid = None if allowed is None else np.isin(lists.ids[np.maximum(blocks.slots, 0)], allowed) & (blocks.slots >= 0)
        search = scanner.begin(rotated, k, threads)
        # from _TWO_PASSES_FROM probes, each query's nearest list first, for every query: its k-th
        # best score then prunes the rows of its other lists (scanned first, a query's rows would
        # all be candidates); with fewer, that costs more than it saves
        passes = (slice(0, 1), slice(1, None)) if probes.shape[1] >= _TWO_PASSES_FROM else (slice(None),)
        for ranks in passes:
            pairs = probes[:, ranks]
            if pairs.numel() == 0:
                continue
            flat = pairs.reshape(-1).numpy()
            order = np.argsort(flat, kind="stable")  # (query, probe) pairs by list, queries ascending within a list
            used, first = np.unique(flat[order], return_index=True)
            starts = blocks.starts[used]
            query_bias = None if bias is None else bias[:, ranks].reshape(-1).numpy()[order]
            scanner.scan_lists(
                search, blocks.packed, blocks.factors, blocks.key_columns, starts, starts + np.diff(lists.offsets)[used],
                np.append(first, len(order)), order // pairs.shape[1], query_bias, valid, threads,
            )  # fmt: skip
        scores, positions = scanner.finish(search)
        positions = positions.numpy()
        return scores, torch.from_numpy(np.where(positions >= 0, blocks.slots[np.maximum(positions, 0)], -1))

    def _query_groups(self, lists: _Lists, probes: torch.Tensor, bias: torch.Tensor | None, allowed: np.ndarray | None) -> Iterator[QueryChunk]:
        """Query-major: each query's probed lists gathered into chunks of at most ``chunk_rows``
        rows (one scan per query instead of one per list; with residuals, ``<q, c>`` of each row's
        list as the chunk's per-row bias)."""
        sizes = lists.offsets[probes.numpy() + 1] - lists.offsets[probes.numpy()]  # (b, nprobe)
        for query in range(probes.shape[0]):
            starts = lists.offsets[probes[query].numpy()]
            total = int(sizes[query].sum())
            # the slots of every probed list, back to back: start of its list + position in it
            slots = np.repeat(starts - np.cumsum(sizes[query]) + sizes[query], sizes[query]) + np.arange(total)
            row_bias = None if bias is None else np.repeat(bias[query].numpy(), sizes[query])
            if allowed is not None:
                keep = np.isin(lists.ids[slots], allowed)
                slots, row_bias = slots[keep], None if row_bias is None else row_bias[keep]
            for start in range(0, len(slots), self.chunk_rows):
                part = slots[start : start + self.chunk_rows]
                packed, factors = self._gather(lists, part)
                part_bias = None if row_bias is None else torch.from_numpy(row_bias[start : start + self.chunk_rows])
                yield QueryChunk(torch.tensor([query]), Chunk(0, packed, factors, bias=part_bias), rows=torch.from_numpy(part))

    def _list_groups(self, lists: _Lists, probes: torch.Tensor, bias: torch.Tensor | None, allowed: np.ndarray | None) -> Iterator[QueryChunk]:
        """List-major: each probed list, in chunks of at most ``chunk_rows`` rows, scanned once for
        all the queries that probe it (and their ``<q, c>`` as the bias, for residuals)."""
        nprobe = probes.shape[1]
        flat = probes.reshape(-1).numpy()
        order = np.argsort(flat, kind="stable")
        by_list = flat[order]
        starts = np.flatnonzero(np.r_[True, by_list[1:] != by_list[:-1]])
        ends = np.r_[starts[1:], len(by_list)]
        flat_bias = None if bias is None else bias.reshape(-1)
        for first, last in zip(starts.tolist(), ends.tolist()):
            lo, hi = int(lists.offsets[by_list[first]]), int(lists.offsets[by_list[first] + 1])
            if lo == hi:
                continue
            at = torch.from_numpy(order[first:last])
            queries = at // nprobe
            group_bias = None if flat_bias is None else flat_bias[at]
            for start in range(lo, hi, self.chunk_rows):
                stop = min(start + self.chunk_rows, hi)
                valid = None
                if allowed is not None:
                    keep = np.isin(lists.ids[start:stop], allowed)
                    if not keep.any():
                        continue
                    valid = None if keep.all() else torch.from_numpy(keep)
                packed, factors = self._slot_rows(lists, start, stop)
                yield QueryChunk(queries, Chunk(start, packed, factors, valid), group_bias)

    def _slot_rows(self, lists: _Lists, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and factors of slots ``[start, stop)``."""
        if lists.packed is not None:
            return lists.packed[start:stop], lists.factors[start:stop]
        rows = lists.order[start:stop]
        return torch.from_numpy(self._store.read_at("codes", rows)), torch.from_numpy(self._store.read_at("factors", rows))

    def _gather(self, lists: _Lists, slots: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and factors of ``slots`` (int64 ``(u,)``, any order), copied out (numpy's take:
        ~40x torch's indexing for these small gathers, measured)."""
        if lists.packed is not None:
            return tuple(torch.from_numpy(np.take(a.numpy(), slots, axis=0)) for a in (lists.packed, lists.factors))
        return super()._fetch(torch.from_numpy(lists.order[slots]))

    def _fetch_slots(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and factors of ``slots`` (int64 ``(u,)``), for rescoring."""
        return self._gather(self._inverted(), slots.numpy())

    def _inverted(self) -> _Lists:
        """The lists of the live rows (built after each change, at the first use)."""
        if self._lists is None:
            live = np.flatnonzero(~self._deleted)
            of_live = np.asarray(self._store.column("lists"))[live]
            order = live[np.argsort(of_live, kind="stable")]
            offsets = np.zeros(self.nlist + 1, dtype=np.int64)
            np.cumsum(np.bincount(of_live, minlength=self.nlist), out=offsets[1:])
            packed = factors = None
            if self._in_ram or isinstance(self._store, MemoryStore):
                packed, factors = (torch.from_numpy(self._store.read_at(name, order)) for name in ("codes", "factors"))
            self._lists = _Lists(order, offsets, self._store.read_at("ids", order), packed, factors)
        return self._lists

    def reconstruct(self, ids: Any) -> np.ndarray:
        """Decoded vectors of ``ids`` (the centroid added back for residuals): float32 ``(n, dim)``, or ``(dim,)`` for one id."""
        self._check_open()
        wanted = as_id_array(ids)
        rows = self._find_rows(wanted)
        if np.any(rows < 0):
            raise KeyError(f"ids not in the index: {wanted[rows < 0][:5].tolist()}")
        vectors = super().reconstruct(ids)
        if self.by_residual:
            vectors = vectors + self._centroids[torch.from_numpy(self._store.read_at("lists", rows).astype(np.int64))].numpy().reshape(vectors.shape)
        return vectors

    # ---- persistence ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the live rows to directory ``path``, each list in one run (``tqindex.open`` reads it).

        ``path`` and ``overwrite`` as `TurboQuantIndex.save`: staged beside ``path`` and renamed
        into place once complete."""
        self._check_open()
        if self._store.path is not None and os.path.exists(path) and os.path.samefile(path, self._store.path):
            raise ValueError(f"{path}: this index is open from there; save it to another directory")
        lists = self._inverted()
        columns = _ivf_column_specs(self.codec, self.metric)
        spec = dict(format_name=FORMAT_NAME, meta=self._store.meta, fixed=self._store.fixed, columns=columns)
        with ColumnStore.staged(path, overwrite=overwrite, **spec) as target:
            for start in range(0, len(lists.order), _COPY_ROWS):
                rows = lists.order[start : start + _COPY_ROWS]
                for name in columns:
                    if name != "deleted":
                        target.append(name, self._store.read_at(name, rows))

    def close(self) -> None:
        if self._store is None:
            self._closed = True
        else:
            super().close()

    def _check_open(self) -> None:
        super()._check_open()
        if not self.is_trained:
            raise ValueError("the index is not trained: call train(x) first (or give centroids=)")

    def __repr__(self) -> str:
        c = self.codec.config
        where = "memory" if self._path is None else str(self._path)
        return (
            f"TurboQuantIVFIndex(dim={c.dim}, nlist={self.nlist}, bits={c.bits}, metric={self.metric!r}, "
            f"by_residual={self.by_residual}, nprobe={self.nprobe}, ntotal={self.ntotal}, trained={self.is_trained}, in {where})"
        )
