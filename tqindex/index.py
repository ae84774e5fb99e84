"""TurboQuantIndex: a FAISS-like exhaustive index over TurboQuant codes (inner product, cosine, L2).

Rows (codes, per-vector factors, user ids; for L2 also each vector's exact norm) live in a store: in RAM (`path=None`) or a
directory of memory-mapped column files (`path=...`, `tqindex.open`). Deletions are an
appended log of row numbers (tombstones); the scan skips them, and the rows of ids outside a
search's allow-list, inside the chunk loop. The ranking equals the codec's own estimator,
`TurboQuantCodec.inner_products` (see `kernels.scan`); for L2 it is the estimate
``||q||^2 + ||x||^2 - 2 <q, x_hat>`` with the stored exact ``||x||``, ranked through the scan's
per-row bias ``-||x||^2 / 2``.

A write that fails or is interrupted (an OSError such as ENOSPC or EFBIG, a KeyboardInterrupt)
changes nothing stored: the store drops its uncommitted rows and the index takes the committed
state again (`_writing`). An on-disk index holds open files and a lock, so it refuses to be
pickled or copied; an in-memory one copies whole.
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from tqindex._arrays import as_float_rows, as_id_array, is_torch, like, power_of_two_scaled, times_power_of_two, unit_rows
from tqindex.codec import CodecConfig, Codes, TurboQuantCodec
from tqindex.kernels import BACKENDS, Chunk, encode, get_scanner, scan_topk, search_resident
from tqindex.kernels.graphs import SearchGraphs
from tqindex.kernels.fastscan import FastScanner, KeyColumns
from tqindex.memstore import MemoryStore
from tqindex.resident import ResidentColumns
from tqindex.errors import CorruptIndexError
from tqindex.storage import ColumnSpec, ColumnStore

FORMAT_NAME = "tqindex"
METRICS = ("ip", "cosine", "l2")
_ENCODE_BATCH = 1 << 16
_RESIDENT_CHUNK_ROWS = 1 << 20  # rows per scan step over codes resident on an accelerator
#: scores (queries x rows) one scan step may hold: the query tile is this over the step's rows.
#: CPU: 128 MiB of float32, 4,096 queries at the default chunk_rows: measured as fast as one
#: untiled scan at 10k queries over 100k rows, where tiles of 1,024 took twice as long
#: (docs/reliability.md). An accelerator: 1 GiB, 256 queries per step of resident rows (a memory
#: bound, not timed here)
_UPLOAD_BYTES = 1 << 26  # host memory one step of making stored rows resident may take
_SCORE_ELEMENTS = {"cpu": 1 << 25, "accelerator": 1 << 28}


def _column_specs(codec: TurboQuantCodec, metric: str) -> dict[str, ColumnSpec]:
    specs = {
        "codes": ColumnSpec("uint8", (codec.code_bytes,)),
        "factors": ColumnSpec("float32", (codec.n_factors,)),
        "ids": ColumnSpec("int64", ()),
        "deleted": ColumnSpec("int64", ()),  # log of deleted row numbers
    }
    if metric == "l2":
        specs["norms"] = ColumnSpec("float32", ())  # exact ||x|| of each row
    return specs


def _scanned_columns(metric: str) -> tuple[str, ...]:
    """The columns a scan reads per row (and ``to()`` keeps resident)."""
    return ("codes", "factors", "norms") if metric == "l2" else ("codes", "factors")


def _check_scan_args(backend: str, chunk_rows: int) -> None:
    """Refuse a bad ``backend`` or ``chunk_rows`` (before any store is created or locked)."""
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _usable_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that this machine has; ValueError naming it otherwise."""
    try:
        parsed = torch.device(device)
        if parsed.type != "cpu":
            torch.empty(0, device=parsed)  # raises where torch lacks the backend or the device
    except (AssertionError, RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"device {device!r} is not available: {error}") from error
    return parsed


class TurboQuantIndex:
    """Exhaustive top-k search over b-bit TurboQuant codes: inner product, cosine or L2.

    Args:
        dim: vector dimension.
        bits: bits per coordinate (1..8, steps of 1/8); see `TurboQuantCodec`.
        metric: "ip" (inner product), "cosine" (vectors and queries normalised on the way in) or
            "l2" (squared Euclidean distance, FAISS's ``METRIC_L2``; stores each vector's exact
            norm, 4 more bytes per vector).
        variant, rotation, scale, seed, search: passed to `TurboQuantCodec`.
        path: None for an index in RAM, or a new directory for an on-disk index.
        backend: scan backend ("auto", "torch", "lut", "fastscan", "triton"), see `tqindex.kernels.get_scanner`.
        chunk_rows: rows scanned per step. With the query tile it bounds the memory a search
            holds whatever the number of queries: queries are scanned in tiles of
            ``2**25 // chunk_rows`` (at least one), so a step holds at most 2^25 scores (128 MiB
            of float32) on the CPU; the results ``(m, k)`` come on top. The fast-scan holds no
            scores: it reads at least ``FastScanner.rows_per_call`` rows a step.
        device: where codes are scanned; other than "cpu", the same as calling ``.to(device)``.

    `add` returns int64 ids; `search` returns ``(D, I)``: float32 ``(m, k)`` and int64 ``(m, k)``
    ids, best first: inner products descending ("ip", "cosine"; padded with ``-inf`` / ``-1``
    when fewer than k rows qualify) or squared distances ascending ("l2"; padded with ``+inf`` / ``-1``).
    """

    def __init__(
        self,
        dim: int,
        bits: float = 4,
        *,
        metric: str = "ip",
        variant: str = "mse",
        rotation: str = "auto",
        scale: str = "auto",
        seed: int = 0,
        search: bool | str = "auto",
        path: str | os.PathLike | None = None,
        backend: str = "auto",
        chunk_rows: int = 8192,
        device: str | torch.device = "cpu",
    ):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        _check_scan_args(backend, chunk_rows)
        device = _usable_device(device)
        codec = TurboQuantCodec(dim, bits, variant=variant, rotation=rotation, scale=scale, seed=seed, search=search)
        meta = {"codec": codec.config.to_dict(), "metric": metric}
        if path is None:
            store = MemoryStore(meta=meta, fixed=codec.state(), columns=_column_specs(codec, metric))
        else:
            columns = _column_specs(codec, metric)
            store = ColumnStore.create(path, format_name=FORMAT_NAME, meta=meta, fixed=codec.state(), columns=columns)
        self._attach(codec, metric, store, backend, chunk_rows)
        if device.type != "cpu":
            self.to(device)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r", *, backend: str = "auto", chunk_rows: int = 8192) -> "TurboQuantIndex":
        """Open an index saved at ``path``: mode "r" (read only) or "a" (append, remove)."""
        _check_scan_args(backend, chunk_rows)
        store = ColumnStore.open(path, format_name=FORMAT_NAME, mode=mode)
        try:
            config = CodecConfig.from_dict(store.meta["codec"])
            if config.quantizer != "scalar":
                raise ValueError(f"its codec writes {config.quantizer} codes, which the index's scanners do not read")
            codec = TurboQuantCodec.from_config(config, store.fixed)
            metric = store.meta["metric"]
            if metric not in METRICS:
                raise ValueError(f"unknown metric {metric!r}")
            expected = {n: (np.dtype(s.dtype), tuple(s.row_shape)) for n, s in _column_specs(codec, metric).items()}
            found = {n: (np.dtype(s.dtype), tuple(s.row_shape)) for n, s in store.columns.items()}
            if found != expected:
                raise ValueError(f"columns {found} do not match the codec's {expected}")
        except (KeyError, TypeError, ValueError) as error:
            store.close()
            raise CorruptIndexError(f"{path}: not a valid tqindex index: {error}") from error
        index = cls.__new__(cls)
        index._attach(codec, metric, store, backend, chunk_rows)
        return index

    def _attach(self, codec: TurboQuantCodec, metric: str, store: Any, backend: str, chunk_rows: int) -> None:
        self.codec, self.metric, self._store, self.chunk_rows, self.backend = codec, metric, store, chunk_rows, backend
        self.device = torch.device("cpu")
        #: the scanned columns (`_scanned_columns`) held on ``self.device`` after ``to()``; None: read from the store
        self._held: ResidentColumns | None = None
        #: with ``_resident``: bool ``(rows,)`` on ``self.device``, False for deleted rows (the scan's valid mask)
        self._live: torch.Tensor | None = None
        #: the fast-scan's key columns of codes in RAM (``_key_columns``), made at the first such search
        self._columns: KeyColumns | None = None
        #: CUDA graphs of unfiltered resident searches (`kernels.graphs`), and the L2 bias of the resident norms
        self._graphs = SearchGraphs()
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rows = 0
        self._n_deleted = 0
        self._deleted_mask = np.zeros(0, dtype=bool)  # capacity grows by doubling; see _deleted
        self._closed = False
        try:
            self._load_rows()
        except BaseException:
            store.close()
            raise

    def _load_rows(self) -> None:
        """Take the store's committed row count and deletion log (on open and on `refresh`)."""
        store = self._store
        counts = {name: store.rows(name) for name in (*_scanned_columns(self.metric), "ids")}
        if len(set(counts.values())) != 1:
            raise CorruptIndexError(f"{store.path}: columns hold different row counts {counts}")
        deleted_rows = store.column("deleted")
        if len(deleted_rows) and (deleted_rows.min() < 0 or deleted_rows.max() >= counts["ids"]):
            raise CorruptIndexError(f"{store.path}: deletion log names rows outside 0..{counts['ids'] - 1}")
        self._grow_rows(counts["ids"] - self._rows)
        self._deleted[:] = False
        self._deleted[deleted_rows] = True
        self._n_deleted = int(self._deleted.sum())
        self._id_lookup: tuple[np.ndarray, np.ndarray] | None = None
        self._next_id: int | None = None

    @property
    def _deleted(self) -> np.ndarray:
        """Tombstone of each stored row: bool ``(rows,)``, a view into a mask that grows by doubling."""
        return self._deleted_mask[: self._rows]

    def _grow_rows(self, n: int) -> None:
        """Count ``n`` more stored rows, not deleted."""
        needed = self._rows + n
        if needed > len(self._deleted_mask):
            grown = np.zeros(max(needed, 2 * len(self._deleted_mask)), dtype=bool)
            grown[: self._rows] = self._deleted
            self._deleted_mask = grown
        self._rows = needed

    # ---- sizes -------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.codec.dim

    @property
    def ntotal(self) -> int:
        """Vectors in the index (removed ones excluded)."""
        return self._rows - self._n_deleted

    def __len__(self) -> int:
        return self.ntotal

    @property
    def bytes_per_vector(self) -> int:
        """Bytes of codes and per-vector factors per vector, the L2 norm included (ids add 8 more)."""
        return self.codec.bytes_per_vector + (4 if self.metric == "l2" else 0)

    @property
    def _resident(self) -> tuple[torch.Tensor, ...] | None:
        """The resident columns' rows (`ResidentColumns.views`), or None where rows are read from the store."""
        return None if self._held is None else self._held.views

    def memory_usage(self) -> int:
        """Bytes this index holds in RAM (an on-disk index keeps its rows on disk)."""
        held = sum(a.nbytes for a in self._store.fixed.values()) + self._deleted.nbytes
        if isinstance(self._store, MemoryStore):
            held += sum(self._store.column(name).nbytes for name in self._store.columns)
        if self._id_lookup is not None:
            held += sum(a.nbytes for a in self._id_lookup)
        if self._held is not None and self.device.type == "cpu":
            held += self._held.nbytes  # spare rows included
        if self._columns is not None:
            held += self._columns.nbytes
        return held

    def to(self, device: str | torch.device) -> "TurboQuantIndex":
        """Keep codes and factors resident as tensors on ``device`` and scan them there; returns self.

        On "cuda" the scan runs there (Triton where installed); on "cpu" this loads an on-disk
        index into RAM. Rows added later are encoded on ``device`` and kept there too.
        """
        self._check_open()
        device = _usable_device(device)
        resident = ResidentColumns([self._uploaded(name, 0, self._rows, device) for name in _scanned_columns(self.metric)])
        self.device, self._held = device, resident
        self._live = torch.from_numpy(~self._deleted).to(device)
        return self

    def _uploaded(self, name: str, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """Committed rows ``[start, stop)`` of column ``name`` as a tensor on ``device``, copied
        `_UPLOAD_BYTES` at a time: an on-disk index is never whole in host memory on its way to a GPU."""
        column = self._store.column(name)
        dtype = torch.from_numpy(np.empty(0, column.dtype)).dtype
        out = torch.empty((stop - start, *column.shape[1:]), dtype=dtype, device=device)
        step = max(1, _UPLOAD_BYTES // max(1, column.dtype.itemsize * int(np.prod(column.shape[1:]))))
        for at in range(start, stop, step):
            end = min(at + step, stop)
            out[at - start : end - start] = torch.from_numpy(np.array(column[at:end]))
        return out

    # ---- adding and removing -----------------------------------------------------------
    def add(self, x: Any, *, progress: bool | None = None) -> np.ndarray:
        """Add vectors ``(n, dim)`` (or one ``(dim,)``); returns their int64 ids, sequential."""
        self._check_writable()
        vectors = self._vectors(x, "x")
        start = self._next_free_id()
        if start + vectors.shape[0] - 1 > np.iinfo(np.int64).max:
            raise ValueError(f"no {vectors.shape[0]} sequential int64 ids left after {start - 1}: use add_with_ids")
        ids = np.arange(start, start + vectors.shape[0], dtype=np.int64)
        self._append(vectors, ids, progress)
        return ids

    def add_with_ids(self, x: Any, ids: Any, *, progress: bool | None = None) -> None:
        """Add vectors ``(n, dim)`` under user ids (int64 ``(n,)``, non-negative, new and distinct)."""
        self._check_writable()
        vectors = self._vectors(x, "x")
        ids = as_id_array(ids)
        if len(ids) != vectors.shape[0]:
            raise ValueError(f"got {vectors.shape[0]} vectors but {len(ids)} ids")
        if len(ids) and ids.min() < 0:
            raise ValueError(f"ids must be >= 0 (-1 marks padding in search results), got {int(ids.min())}")
        unique, counts = np.unique(ids, return_counts=True)
        if np.any(counts > 1):
            raise ValueError(f"duplicate ids in the batch: {unique[counts > 1][:5].tolist()}")
        taken = ids[self._find_rows(ids) >= 0]
        if len(taken):
            raise ValueError(f"ids already in the index: {taken[:5].tolist()}")
        self._append(vectors, ids, progress)

    def _append(
        self, vectors: torch.Tensor, ids: np.ndarray, progress: bool | None, extra: dict[str, np.ndarray] | None = None
    ) -> None:
        """Encode and commit ``vectors`` under ``ids``; ``extra``: a subclass's own columns' rows
        (one per vector), committed with them. Batch by batch: each is encoded on ``self.device``,
        appended to the store and, on a resident index, written into its spare rows, which it holds
        once the store commits; device and host memory hold one batch beyond the rows."""
        n = vectors.shape[0]
        if n == 0:
            return
        scanned = _scanned_columns(self.metric)
        batches = range(0, n, _ENCODE_BATCH)
        with self._writing():
            if self._held is not None:
                self._held.reserve(self._rows + n)
            for i in tqdm(batches, desc="encode", unit="batch", disable=None if progress is None else not progress):
                batch = vectors[i : i + _ENCODE_BATCH]
                codes = encode(self.codec, batch.to(self.device))
                columns = {"codes": codes.packed, "factors": codes.factors}
                if self.metric == "l2":
                    columns["norms"] = torch.linalg.vector_norm(batch.double(), dim=1).float().to(self.device)
                for name, values in columns.items():
                    self._store.append(name, values.cpu().numpy())
                if self._held is not None:
                    self._held.stage(self._rows + i, [columns[name] for name in scanned])
            self._store.append("ids", ids)
            for name, values in (extra or {}).items():
                self._store.append(name, values)
            self._store.commit()
            if self._held is not None:
                self._held.hold(self._rows + n)
                self._live = torch.cat([self._live, torch.ones(n, dtype=torch.bool, device=self.device)])
            self._grow_rows(n)
            self._id_lookup = None
            self._next_id = max(self._next_free_id(), int(ids.max()) + 1)

    def remove_ids(self, ids: Any) -> int:
        """Remove vectors by id; returns how many were removed. Unknown ids: KeyError, nothing removed."""
        self._check_writable()
        ids = np.unique(as_id_array(ids))
        rows = self._find_rows(ids)
        if np.any(rows < 0):
            raise KeyError(f"ids not in the index: {ids[rows < 0][:5].tolist()}")
        if len(rows):
            with self._writing():
                self._store.append("deleted", rows)
                self._store.commit()
                self._deleted[rows] = True
                self._n_deleted += len(rows)
                if self._live is not None:
                    self._live[torch.from_numpy(rows).to(self.device)] = False
                self._id_lookup = None
        return len(rows)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """One write: on any exception (OSError, KeyboardInterrupt...) the store drops what was
        not committed and the index takes the committed rows again, so the call changed nothing
        stored (or, interrupted after its commit, is wholly there)."""
        try:
            yield
        except BaseException:
            self._store.rollback()
            self._sync()
            raise

    def _sync(self) -> None:
        """Take the store's committed rows, deletions and (if resident) codes: after `refresh`, and after a failed write."""
        self._load_rows()
        if self._held is not None:
            have = self._held.rows
            if have > self._rows:
                self._held.hold(self._rows)
            elif have < self._rows:
                self._held.append([self._uploaded(n, have, self._rows, self.device) for n in _scanned_columns(self.metric)])
            self._live = torch.from_numpy(~self._deleted).to(self.device)

    # ---- reading -----------------------------------------------------------------------
    def search(self, queries: Any, k: int, *, filter: Any = None) -> tuple[Any, Any]:
        """Top-``k`` neighbours of each query ``(m, dim)`` (or one ``(dim,)``).

        ``filter``: ids allowed in the result (array-like of int64); others are skipped in the scan.
        Returns ``(D, I)``: float32 ``(m, k)`` best first, int64 ``(m, k)`` ids; numpy, or torch
        for torch queries. D holds inner products, descending, with ``-inf`` / ``-1`` past the rows
        that qualify ("ip", "cosine"); or squared L2 distances ``||q||^2 + ||x||^2 - 2 <q, x_hat>``
        (clamped at 0), ascending, with ``+inf`` / ``-1`` there ("l2", as FAISS's ``METRIC_L2``).
        ``(0, dim)`` queries give ``(0, k)`` results; ``k`` must be in ``1..ntotal`` all the same.
        """
        self._check_open()
        rows = self._vectors(queries, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if self.ntotal == 0:
            raise ValueError("the index is empty: add vectors before searching")
        if k > self.ntotal:
            raise ValueError(f"k={k} exceeds the {self.ntotal} vectors in the index")
        allowed = None if filter is None else np.unique(as_id_array(filter, "filter"))
        exponents = None  # l2 distances depend on the query's scale: no rescaling there
        if self.metric != "l2":
            rows, exponents = power_of_two_scaled(rows)  # exact; the ranking of a query ignores its scale
        norm = float(torch.linalg.vector_norm(rows, dim=1).max()) if self.metric == "l2" and len(rows) else 0.0  # others are rescaled
        scanner = get_scanner(self.codec, self.backend, self.device, queries=rows.shape[0], query_norm=norm)
        budget = _SCORE_ELEMENTS["cpu" if self.device.type == "cpu" else "accelerator"]
        tile = max(1, budget // self._scan_step())
        if len(rows) <= tile:
            scores, ids = self._search_tile(scanner, rows, int(k), allowed)
        else:
            scores, ids = torch.empty((len(rows), int(k))), np.empty((len(rows), int(k)), np.int64)
            for i in range(0, len(rows), tile):
                scores[i : i + tile], ids[i : i + tile] = self._search_tile(scanner, rows[i : i + tile], int(k), allowed)
        scores = self._rescaled_scores(scores, ids, exponents)
        return (scores, torch.from_numpy(ids)) if is_torch(queries) else (scores.numpy(), ids)

    def _rescaled_scores(self, scores: torch.Tensor, ids: np.ndarray, exponents: torch.Tensor | None) -> torch.Tensor:
        """Scores float32 ``(m, k)`` (CPU) of queries divided by ``2 ** exponents`` (`power_of_two_scaled`)
        brought back to the queries' scale; ValueError naming the first query whose scores of the
        rows found (``ids >= 0``) overflow float32."""
        if exponents is not None:
            scores = times_power_of_two(scores, exponents.cpu())
        values = scores.numpy()
        overflow = None if np.isfinite(values).all() else ~np.isfinite(values) & (ids >= 0)  # -inf pads rows past those that qualify
        if overflow is not None and overflow.any():
            row = int(np.flatnonzero(overflow.any(axis=1))[0])
            what = "distances" if self.metric == "l2" else "inner products"
            raise ValueError(f"queries row {row}: its {what} overflow float32 (> {torch.finfo(torch.float32).max:.3g}): scale the queries down")
        return scores

    def _search_tile(self, scanner: Any, rows: torch.Tensor, k: int, allowed: np.ndarray | None) -> tuple[torch.Tensor, np.ndarray]:
        """`search` of one tile of queries ``(t, dim)``: scores float32 ``(t, k)`` on the CPU, ids int64 ``(t, k)``."""
        rotated = self.codec.rotate_rows(rows.to(self.device))  # rows are checked: no second pass over them
        if self._resident is not None and hasattr(scanner, "candidates"):  # one kernel over every row, no chunk loop
            packed, factors = self._resident[:2]
            bias = self._resident_bias() if self.metric == "l2" else None
            search = self._graphs.search if allowed is None else search_resident  # a filter's mask is new each search
            scores, found = search(self.codec, scanner, rotated, packed, factors, self._valid_rows(allowed), k, bias)
        else:
            fetch_bias = self._fetch_bias if self.metric == "l2" else None
            scores, found = scan_topk(self.codec, scanner, rotated, self._chunks(allowed, scanner), k, self._fetch, fetch_bias)
        if self.metric == "l2":  # score = <q, x> - ||x||^2 / 2 = (||q||^2 - ||q - x||^2) / 2
            query_norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True).to(scores.device)
            scores = (query_norms.square() - 2 * scores).clamp_min(0)  # -inf padding becomes +inf
        found = found.cpu().numpy()
        ids = self._store.read_at("ids", np.maximum(found, 0).ravel()).reshape(found.shape)
        ids[found < 0] = -1
        return scores.cpu(), ids

    def _resident_bias(self) -> torch.Tensor:
        """The L2 scan bias of the resident norms, made once per resident tensor (the graphs read it by address)."""
        norms = self._resident[2]
        if self._bias is None or self._bias[0] is not norms:
            self._bias = (norms, _l2_bias(norms))
        return self._bias[1]

    def _scan_step(self) -> int:
        """Rows per scan step: ``chunk_rows``, or at least ``_RESIDENT_CHUNK_ROWS`` on an accelerator."""
        return self.chunk_rows if self.device.type == "cpu" else max(self.chunk_rows, _RESIDENT_CHUNK_ROWS)

    def reconstruct(self, ids: Any) -> np.ndarray:
        """Decoded vectors of ``ids``: float32 ``(n, dim)``, or ``(dim,)`` for one scalar id."""
        self._check_open()
        wanted = as_id_array(ids)
        rows = self._find_rows(wanted)
        if np.any(rows < 0):
            raise KeyError(f"ids not in the index: {wanted[rows < 0][:5].tolist()}")
        packed, factors = self._fetch(torch.from_numpy(rows).to(self.device))
        vectors = self.codec.decode(Codes(packed.cpu().numpy(), factors.cpu().numpy()))
        return vectors[0] if np.ndim(ids) == 0 else vectors

    def _chunks(self, allowed: np.ndarray | None, scanner: Any) -> Iterator[Chunk]:
        """The rows to scan, chunk by chunk: from the resident tensors, or read from the store."""
        key_columns = self._key_columns(scanner)
        # the fast-scan over codes in RAM reads views, copies nothing: one kernel call for all rows
        step = self._rows if key_columns is not None else max(self._scan_step(), getattr(scanner, "rows_per_call", 0))
        for start in range(0, self._rows, step):
            stop = min(start + step, self._rows)
            valid_rows = None
            if allowed is not None or self._n_deleted:  # else every row of the chunk is live: no mask to make
                valid = ~self._deleted[start:stop]
                if allowed is not None:
                    valid &= np.isin(self._store.read_rows("ids", start, stop), allowed)
                if not valid.any():
                    continue
                valid_rows = None if valid.all() else torch.from_numpy(valid).to(self.device)
            if self._resident is not None:
                columns = [t[start:stop] for t in self._resident]
            else:
                columns = [torch.from_numpy(self._store.read_rows(n, start, stop)) for n in _scanned_columns(self.metric)]
            bias = _l2_bias(columns[2]) if self.metric == "l2" else None
            yield Chunk(start, columns[0], columns[1], valid_rows, bias, None if key_columns is None else key_columns.rows(start, stop))

    def _key_columns(self, scanner: Any) -> KeyColumns | None:
        """The fast-scan's key columns of codes held in RAM, brought up to date; None for other
        scanners and for codes read from disk (a search then holds only a chunk of rows)."""
        if not isinstance(scanner, FastScanner):
            return None
        if self._resident is not None:
            codes = self._resident[0].numpy()
        elif isinstance(self._store, MemoryStore):
            codes = self._store.column("codes")
        else:
            return None
        if self._columns is None or self._columns.scanner is not scanner:
            self._columns = KeyColumns(scanner)
        self._columns.update(codes)
        return self._columns

    def _valid_rows(self, allowed: np.ndarray | None) -> torch.Tensor | None:
        """Resident rows a search may return: bool ``(rows,)`` on ``self.device``, or None for all of them.

        A filter costs a look-up per allowed id (``_find_rows``), not a pass over every row."""
        if allowed is None:
            return self._live if self._n_deleted else None
        valid = torch.zeros(self._rows, dtype=torch.bool, device=self.device)
        rows = self._find_rows(allowed)
        valid[torch.from_numpy(rows[rows >= 0]).to(self.device)] = True  # live rows only
        return valid

    def _fetch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and factors of ``rows`` (int64 ``(u,)``), on ``self.device``."""
        if self._resident is not None:
            return self._resident[0][rows], self._resident[1][rows]
        at = rows.cpu().numpy()
        return torch.from_numpy(self._store.read_at("codes", at)), torch.from_numpy(self._store.read_at("factors", at))

    def _fetch_bias(self, rows: torch.Tensor) -> torch.Tensor:
        """The L2 scan bias ``-||x||^2 / 2`` of ``rows`` (int64 ``(u,)``): float32 ``(u,)`` on ``self.device``."""
        if self._resident is not None:
            return _l2_bias(self._resident[2][rows])
        return _l2_bias(torch.from_numpy(self._store.read_at("norms", rows.cpu().numpy())))

    def _vectors(self, x: Any, name: str) -> torch.Tensor:
        rows = as_float_rows(x, self.dim, name)
        if self.metric == "cosine":
            rows = unit_rows(rows)
        elif self.metric == "l2":
            squares = torch.linalg.vector_norm(rows.double(), dim=1).square()
            too_long = torch.nonzero(squares > torch.finfo(torch.float32).max).flatten()
            if len(too_long):
                raise ValueError(
                    f"{name} row {int(too_long[0])}: squared norm {float(squares[too_long[0]]):.3g} exceeds the float32 "
                    f"range, which metric 'l2' needs for ||q - x||^2"
                )
        return rows

    def _find_rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id among the live rows, -1 where absent: int64 ``(n,)``."""
        if self._id_lookup is None:
            live = np.flatnonzero(~self._deleted)
            live_ids = np.asarray(self._store.column("ids"))[live]
            order = np.argsort(live_ids, kind="stable")
            self._id_lookup = (live_ids[order], live[order])
        sorted_ids, sorted_rows = self._id_lookup
        if not len(sorted_ids):
            return np.full(len(ids), -1, dtype=np.int64)
        at = np.searchsorted(sorted_ids, ids).clip(max=len(sorted_ids) - 1)
        return np.where(sorted_ids[at] == ids, sorted_rows[at], -1).astype(np.int64)

    def _next_free_id(self) -> int:
        if self._next_id is None:
            ids = self._store.column("ids")
            self._next_id = int(ids.max()) + 1 if len(ids) else 0
        return self._next_id

    # ---- persistence -------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the index to directory ``path`` (open it again with ``tqindex.open``).

        ``path`` must be missing or empty; ``overwrite=True`` replaces an index there (one no
        writer holds), atomically where the OS can swap directories (Linux). The index is
        written beside ``path`` and renamed into place once complete, so a save that fails
        leaves ``path`` as it was (`ColumnStore.staged`).
        """
        self._check_open()
        if self._store.path is not None and os.path.exists(path) and os.path.samefile(path, self._store.path):
            raise ValueError(f"{path}: this index is open from there; save it to another directory")
        columns = _column_specs(self.codec, self.metric)
        spec = dict(format_name=FORMAT_NAME, meta=self._store.meta, fixed=self.codec.state(), columns=columns)
        with ColumnStore.staged(path, overwrite=overwrite, **spec) as target:
            for name in columns:
                for start in range(0, self._store.rows(name), _ENCODE_BATCH):
                    target.append(name, self._store.read_rows(name, start, min(start + _ENCODE_BATCH, self._store.rows(name))))

    def verify(self) -> dict[str, int]:
        """Re-read every byte of an on-disk index and check its checksums (and, cheaply, its row
        counts and deletion log); returns ``{"files", "bytes", "blocks", "rows", "ntotal"}``.

        Raises `tqindex.errors.CorruptIndexError` naming the file (and rows) that fail.
        """
        self._check_open()
        if self._store.path is None:
            raise ValueError("verify checks files on disk; this index is in memory")
        report = self._store.verify()
        return {**report, "rows": self._rows, "ntotal": self.ntotal}

    def refresh(self) -> bool:
        """Read-only index: take the rows and deletions committed by a writer since this index was
        opened; returns True if there were any. Searches before the call keep seeing the old snapshot."""
        self._check_open()
        if self._store.path is None or self._store.mode != "r":
            raise ValueError("refresh is for an index opened read-only (tqindex.open(path, 'r'))")
        if not self._store.refresh():
            return False
        self._sync()
        return True

    def flush(self) -> None:
        """Make everything added so far durable (``add`` and ``remove_ids`` already commit)."""
        self._check_open()
        if self._store.mode == "a":
            with self._writing():
                self._store.commit()

    def close(self) -> None:
        """Flush and release the files (and the writer lock, even if the flush raises); idempotent."""
        if not self._closed:
            try:
                self._store.close()
            finally:
                self._closed = True

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickling and copying: an in-memory index copies whole; an on-disk one is refused
        (TypeError) since a copy would share its files and writer lock: open the path again."""
        if self._store.path is not None:
            raise TypeError(
                f"an on-disk index holds open files (and, writing, the directory's lock), so it cannot be pickled or "
                f"copied: open it again with tqindex.open({str(self._store.path)!r}) where it is needed (in each worker)"
            )
        return super().__reduce_ex__(protocol)

    def __getstate__(self) -> dict[str, Any]:
        """The state pickled and copied, less the fast-scan's key columns (a cache holding the
        compiled scanner: rebuilt at the copy's first search)."""
        return {**self.__dict__, "_columns": None}

    def __copy__(self) -> "TurboQuantIndex":
        """A deep copy: a shallow one would share the rows and could not add to them safely."""
        return copy.deepcopy(self)

    def __enter__(self) -> "TurboQuantIndex":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the index is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._store.mode != "a":
            raise ValueError(f"the index at {self._store.path} is open read-only (mode='r')")

    def __repr__(self) -> str:
        c = self.codec.config
        where = "memory" if self._store.path is None else str(self._store.path)
        return f"TurboQuantIndex(dim={c.dim}, bits={c.bits}, metric={self.metric!r}, variant={c.variant!r}, ntotal={self.ntotal}, in {where})"


def _l2_bias(norms: torch.Tensor) -> torch.Tensor:
    """The scan's per-row bias for L2, ``-||x||^2 / 2``, from norms float32 ``(n,)``."""
    return norms.square().mul_(-0.5)


open = TurboQuantIndex.open
