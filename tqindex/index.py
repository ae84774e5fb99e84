"""TurboQuantIndex: a FAISS-like exhaustive inner-product index over TurboQuant codes.

Rows (codes, per-vector factors, user ids) live in a store: in RAM (`path=None`) or a
directory of memory-mapped column files (`path=...`, `tqindex.open`). Deletions are an
appended log of row numbers (tombstones); the scan skips them, and the rows of ids outside a
search's allow-list, inside the chunk loop. The ranking equals the codec's own estimator,
`TurboQuantCodec.inner_products` (see `kernels.scan`).
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from tqindex._arrays import as_float_rows, as_id_array, is_torch, like
from tqindex.codec import CodecConfig, Codes, TurboQuantCodec
from tqindex.kernels import BACKENDS, Chunk, get_scanner, scan_topk
from tqindex.memstore import MemoryStore
from tqindex.errors import CorruptIndexError
from tqindex.storage import ColumnSpec, ColumnStore

FORMAT_NAME = "tqindex"
METRICS = ("ip", "cosine")
_ENCODE_BATCH = 1 << 16
_RESIDENT_CHUNK_ROWS = 1 << 20  # rows per scan step over codes resident on an accelerator


def _column_specs(codec: TurboQuantCodec) -> dict[str, ColumnSpec]:
    return {
        "codes": ColumnSpec("uint8", (codec.code_bytes,)),
        "factors": ColumnSpec("float32", (codec.n_factors,)),
        "ids": ColumnSpec("int64", ()),
        "deleted": ColumnSpec("int64", ()),  # log of deleted row numbers
    }


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
    """Exhaustive top-k inner-product search over b-bit TurboQuant codes.

    Args:
        dim: vector dimension.
        bits: bits per coordinate (1..8, steps of 1/8); see `TurboQuantCodec`.
        metric: "ip" (inner product) or "cosine" (vectors and queries normalised on the way in).
        variant, rotation, scale, seed, search: passed to `TurboQuantCodec`.
        path: None for an index in RAM, or a new directory for an on-disk index.
        backend: scan backend ("auto", "torch", "lut", "triton"), see `tqindex.kernels.get_scanner`.
        chunk_rows: rows scanned per step; bounds the memory a search holds.
        device: where codes are scanned; other than "cpu", the same as calling ``.to(device)``.

    `add` returns int64 ids; `search` returns ``(D, I)``: float32 ``(m, k)`` scores best first
    and int64 ``(m, k)`` ids, padded with ``-inf`` / ``-1`` when fewer than k rows qualify.
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
            store = MemoryStore(meta=meta, fixed=codec.state(), columns=_column_specs(codec))
        else:
            store = ColumnStore.create(path, format_name=FORMAT_NAME, meta=meta, fixed=codec.state(), columns=_column_specs(codec))
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
            expected = {n: (np.dtype(s.dtype), tuple(s.row_shape)) for n, s in _column_specs(codec).items()}
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
        #: codes and factors as tensors on ``self.device`` after ``to()``; None: read from the store
        self._resident: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rows = 0
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
        counts = {name: store.rows(name) for name in ("codes", "factors", "ids")}
        if len(set(counts.values())) != 1:
            raise CorruptIndexError(f"{store.path}: columns hold different row counts {counts}")
        deleted_rows = store.column("deleted")
        if len(deleted_rows) and (deleted_rows.min() < 0 or deleted_rows.max() >= counts["ids"]):
            raise CorruptIndexError(f"{store.path}: deletion log names rows outside 0..{counts['ids'] - 1}")
        self._grow_rows(counts["ids"] - self._rows)
        self._deleted[deleted_rows] = True
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
        return self._rows - int(self._deleted.sum())

    def __len__(self) -> int:
        return self.ntotal

    @property
    def bytes_per_vector(self) -> int:
        """Bytes of codes and per-vector factors per vector (ids add 8 more)."""
        return self.codec.bytes_per_vector

    def memory_usage(self) -> int:
        """Bytes this index holds in RAM (an on-disk index keeps its rows on disk)."""
        held = sum(a.nbytes for a in self._store.fixed.values()) + self._deleted.nbytes
        if isinstance(self._store, MemoryStore):
            held += sum(self._store.column(name).nbytes for name in self._store.columns)
        if self._id_lookup is not None:
            held += sum(a.nbytes for a in self._id_lookup)
        if self._resident is not None and self.device.type == "cpu":
            held += sum(t.numel() * t.element_size() for t in self._resident)
        return held

    def to(self, device: str | torch.device) -> "TurboQuantIndex":
        """Keep codes and factors resident as tensors on ``device`` and scan them there; returns self.

        On "cuda" the scan runs there (Triton where installed); on "cpu" this loads an on-disk
        index into RAM. Rows added later are encoded on ``device`` and kept there too.
        """
        self._check_open()
        device = _usable_device(device)
        codes, factors = (torch.from_numpy(np.array(self._store.column(name))).to(device) for name in ("codes", "factors"))
        self.device, self._resident = device, (codes, factors)
        return self

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
        self, vectors: torch.Tensor, ids: np.ndarray, progress: bool | None, columns: dict[str, np.ndarray] | None = None
    ) -> None:
        """Encode and commit ``vectors`` under ``ids``; ``columns``: a subclass's own columns' rows
        (one per vector), committed with them."""
        batches = range(0, vectors.shape[0], _ENCODE_BATCH)
        encoded = [
            self.codec.encode(vectors[i : i + _ENCODE_BATCH].to(self.device))
            for i in tqdm(batches, desc="encode", unit="batch", disable=None if progress is None else not progress)
        ]
        if not encoded:
            return
        packed, factors = torch.cat([c.packed for c in encoded]), torch.cat([c.factors for c in encoded])
        self._store.append("codes", packed.cpu().numpy())
        self._store.append("factors", factors.cpu().numpy())
        self._store.append("ids", ids)
        for name, values in (columns or {}).items():
            self._store.append(name, values)
        self._store.commit()
        if self._resident is not None:
            self._resident = (torch.cat([self._resident[0], packed]), torch.cat([self._resident[1], factors]))
        self._grow_rows(len(ids))
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
            self._store.append("deleted", rows)
            self._store.commit()
            self._deleted[rows] = True
            self._id_lookup = None
        return len(rows)

    # ---- reading -----------------------------------------------------------------------
    def search(self, queries: Any, k: int, *, filter: Any = None) -> tuple[Any, Any]:
        """Top-``k`` inner products for each query ``(m, dim)`` (or one ``(dim,)``).

        ``filter``: ids allowed in the result (array-like of int64); others are skipped in the scan.
        Returns ``(D, I)``: float32 ``(m, k)`` best first, int64 ``(m, k)`` ids; numpy, or torch
        for torch queries; ``-inf`` / ``-1`` past the rows that qualify. ``(0, dim)`` queries
        give ``(0, k)`` results; ``k`` must be in ``1..ntotal`` all the same.
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
        rotated = self.codec.rotate_queries(rows.to(self.device))
        scanner = get_scanner(self.codec, self.backend, self.device, queries=rows.shape[0])
        scores, found = scan_topk(self.codec, scanner, rotated, self._chunks(allowed), int(k), self._fetch)
        found = found.cpu().numpy()
        ids = self._store.read_at("ids", np.maximum(found, 0).ravel()).reshape(found.shape)
        ids[found < 0] = -1
        return like(scores.cpu(), is_torch(queries)), like(torch.from_numpy(ids), is_torch(queries))

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

    def _chunks(self, allowed: np.ndarray | None) -> Iterator[Chunk]:
        """The rows to scan, chunk by chunk: from the resident tensors, or read from the store."""
        step = self.chunk_rows if self.device.type == "cpu" else max(self.chunk_rows, _RESIDENT_CHUNK_ROWS)
        for start in range(0, self._rows, step):
            stop = min(start + step, self._rows)
            valid = ~self._deleted[start:stop]
            if allowed is not None:
                valid &= np.isin(self._store.read_rows("ids", start, stop), allowed)
            if not valid.any():
                continue
            if self._resident is not None:
                packed, factors = (t[start:stop] for t in self._resident)
            else:
                packed, factors = (torch.from_numpy(self._store.read_rows(n, start, stop)) for n in ("codes", "factors"))
            yield Chunk(start, packed, factors, None if valid.all() else torch.from_numpy(valid).to(self.device))

    def _fetch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and factors of ``rows`` (int64 ``(u,)``), on ``self.device``."""
        if self._resident is not None:
            return self._resident[0][rows], self._resident[1][rows]
        at = rows.cpu().numpy()
        return torch.from_numpy(self._store.read_at("codes", at)), torch.from_numpy(self._store.read_at("factors", at))

    def _vectors(self, x: Any, name: str) -> torch.Tensor:
        rows = as_float_rows(x, self.dim, name)
        if self.metric == "cosine":
            rows = rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
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
    def save(self, path: str | os.PathLike) -> None:
        """Write the index to a new directory ``path`` (open it again with ``tqindex.open``)."""
        self._check_open()
        target = ColumnStore.create(
            path, format_name=FORMAT_NAME, meta=self._store.meta, fixed=self.codec.state(), columns=_column_specs(self.codec)
        )
        with target:
            for name in ("codes", "factors", "ids", "deleted"):
                for start in range(0, self._store.rows(name), _ENCODE_BATCH):
                    target.append(name, self._store.read_rows(name, start, min(start + _ENCODE_BATCH, self._store.rows(name))))
            target.commit()

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
        rows_before = self._rows
        if not self._store.refresh():
            return False
        self._load_rows()
        if self._resident is not None:
            new = [torch.from_numpy(self._store.read_rows(n, rows_before, self._rows)).to(self.device) for n in ("codes", "factors")]
            self._resident = (torch.cat([self._resident[0], new[0]]), torch.cat([self._resident[1], new[1]]))
        return True

    def flush(self) -> None:
        """Make everything added so far durable (``add`` and ``remove_ids`` already commit)."""
        self._check_open()
        if self._store.mode == "a":
            self._store.commit()

    def close(self) -> None:
        """Flush and release the files; idempotent."""
        if not self._closed:
            self._store.close()
            self._closed = True

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


open = TurboQuantIndex.open
