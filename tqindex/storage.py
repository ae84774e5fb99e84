"""On-disk format of an index: named fixed arrays and append-only columns in one directory.

Layout of a store::

    manifest.json   format name, version, user meta; per fixed array its file, dtype, shape and
                    sha256; per column its file, dtype, row_shape, committed row count and the
                    CRC-32 of its last partial block; the sha256 of all of that ("checksum")
    <name>.npy      one fixed array each (np.save, no pickle): loaded whole, verified on open
    <name>.col      one raw little-endian file per column, rows back to back
    <name>.crc      uint32 CRC-32 of each complete 1 MiB block of <name>.col, in order

Commit protocol: `append` writes rows after the pending ones; `commit` fsyncs the column files
written, then replaces manifest.json atomically (temp file, fsync, os.replace, fsync of the
directory). The row counts in the manifest are the commit point: bytes past them (a crash between
append and commit) are ignored on read and cut off by the next writer's first append.
Rows are never rewritten; deletions are the caller's own appended log. `verify` re-reads every
byte and checks it against the block checksums.

Failed writes: a write, fsync or rename that raises (ENOSPC, EIO, EFBIG, a KeyboardInterrupt)
leaves the committed rows as they were. The caller then calls `rollback`, which drops the
pending rows (cutting their bytes off) and takes the committed state from manifest.json again. A
commit that fails after its rename (in the directory fsync) puts the old manifest back, so it
too commits nothing unless that also fails; then it stays committed, whole. `staged` builds a
whole new store beside its path and renames it into place, so a failed or interrupted build never
leaves a store at the path. A store holds file descriptors and a lock: it refuses to be pickled
or copied (open it again by path).

One writer at a time: mode "a" holds an exclusive advisory lock (flock on the directory), so a
second writer is refused with IndexLockedError. Readers take no lock and see the rows committed
when they opened (or last called `refresh`). POSIX only (fcntl, os.pread). Storage knows nothing of the math or of ids.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import errno
import fcntl
import functools
import hashlib
import io
import json
import math
import os
import re
import secrets
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from tqindex.errors import CorruptIndexError, IndexFormatError, IndexLockedError, StorageError

FORMAT_VERSION = 2  # 2: manifest checksum and per-block CRC-32 of the columns
BLOCK_BYTES = 1 << 20  # column bytes per checksum block
MANIFEST = "manifest.json"
_MANIFEST_TMP = MANIFEST + ".tmp"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
_COLUMN_KINDS = "biufc"  # bool, int, uint, float, complex: plain fixed-size numbers
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


@dataclass(frozen=True)
class ColumnSpec:
    """Type of a column: `dtype` a numpy dtype string, `row_shape` the shape of one row."""

    dtype: str
    row_shape: tuple[int, ...] = ()


@dataclass
class _Column:
    file: Path
    dtype: np.dtype  # explicit little-endian
    row_shape: tuple[int, ...]
    rows: int  # committed
    pending: int  # committed + appended since
    tail_crc: int  # CRC-32 of the committed bytes after the last complete block
    pending_tail_crc: int  # the same for the pending bytes
    fd: int = -1
    crc_fd: int = -1  # the <name>.crc file: CRC-32 of each complete block
    residue: bool = False  # bytes of an interrupted append may follow the committed ones
    view: np.ndarray | None = None  # cached column(): the committed rows when it was made

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.row_shape)

    @property
    def crc_file(self) -> Path:
        return self.file.with_suffix(".crc")


class ColumnStore:
    """A directory: manifest.json + fixed arrays (.npy) + one raw binary file per column.

    Make one with `ColumnStore.create` or `ColumnStore.open`. `meta` is the user's JSON metadata,
    `fixed` the fixed arrays (read-only, in RAM), `columns` the ColumnSpec of each column.
    """

    def __init__(self, path: Path, mode: str, manifest: dict, dir_fd: int | None) -> None:
        """Internal: takes over `dir_fd` (the writer lock in mode "a") even when it raises."""
        self.path, self.mode = path, mode
        self._dir_fd = dir_fd
        self._manifest = manifest
        self._columns: dict[str, _Column] = {}
        self._closed = False
        self._unusable: str | None = None  # why writes are refused: the committed state could not be re-read
        try:
            self.meta: dict[str, Any] = copy.deepcopy(manifest["meta"])
            self.fixed: dict[str, np.ndarray] = {
                name: _load_fixed(path, name, entry) for name, entry in manifest["fixed"].items()
            }
            flags = os.O_RDWR if mode == "a" else os.O_RDONLY
            for name, entry in manifest["columns"].items():
                self._columns[name] = col = _parse_column(path, name, entry)
                col.fd, col.crc_fd = _open_fd(col.file, flags), _open_fd(col.crc_file, flags)
                _check_sizes(col, name)
                col.residue = mode == "a"  # cut off at the first append, once the caller has accepted the store
        except BaseException:
            self._release()
            raise

    # ---- making and opening ----

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        format_name: str,
        meta: dict,
        fixed: dict[str, np.ndarray],
        columns: dict[str, ColumnSpec],
        overwrite: bool = False,
    ) -> ColumnStore:
        """Make a new store at `path` (created if missing) and return it open in mode "a".

        An existing non-empty directory is refused unless `overwrite` is set and it is itself a
        store of `format_name`; then only the files its manifest names are removed. Overwriting
        is not atomic: a crash during it leaves a directory that is not a store (`staged` is).
        A create that raises removes what it wrote (and the directory, if it made it).
        """
        path = _as_path(path)
        if not isinstance(format_name, str) or not format_name:
            raise StorageError(f"{path}: format_name must be a non-empty string")
        meta = _check_meta(path, meta)
        blobs = {name: _npy_bytes(path, name, array) for name, array in fixed.items()}
        if not all(isinstance(spec, ColumnSpec) for spec in columns.values()):
            raise StorageError(f"{path}: columns must map names to ColumnSpec")
        specs = {name: _check_spec(str(path), name, s.dtype, s.row_shape) for name, s in columns.items()}
        if path.exists() and not path.is_dir():
            raise StorageError(f"{path}: exists and is not a directory")
        made = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        dir_fd = _lock_dir(path)
        written: list[Path] = []  # removed again if creating fails
        try:
            if any(path.iterdir()):
                if not overwrite:
                    raise StorageError(f"{path}: directory is not empty: a new store needs a missing or empty one")
                _remove_store(path, format_name)
            fixed_entries = {}
            for name, data in blobs.items():
                written.append(path / f"{name}.npy")
                _write_file(path / f"{name}.npy", data)
                array = np.load(io.BytesIO(data), allow_pickle=False)
                fixed_entries[name] = {
                    "file": f"{name}.npy",
                    "dtype": array.dtype.str,
                    "shape": list(array.shape),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            column_entries = {}
            for name, (dtype, row_shape) in specs.items():
                written += [path / f"{name}.col", path / f"{name}.crc"]
                _write_file(path / f"{name}.col", b"")
                _write_file(path / f"{name}.crc", b"")
                column_entries[name] = {
                    "file": f"{name}.col",
                    "dtype": dtype.str,
                    "row_shape": list(row_shape),
                    "rows": 0,
                    "tail_crc": 0,
                }
            manifest = {
                "format": format_name,
                "version": FORMAT_VERSION,
                "meta": meta,
                "fixed": fixed_entries,
                "columns": column_entries,
            }
            written += [path / MANIFEST, path / _MANIFEST_TMP]
            _replace_manifest(path, dir_fd, manifest)
        except BaseException:
            os.close(dir_fd)
            if made:
                shutil.rmtree(path, ignore_errors=True)
            else:
                for file in written:
                    with contextlib.suppress(OSError):
                        file.unlink(missing_ok=True)
            raise
        return cls(path, "a", manifest, dir_fd)

    @classmethod
    @contextlib.contextmanager
    def staged(
        cls,
        path: str | os.PathLike,
        *,
        format_name: str,
        meta: dict,
        fixed: dict[str, np.ndarray],
        columns: dict[str, ColumnSpec],
        overwrite: bool = False,
    ) -> Iterator[ColumnStore]:
        """A new store built beside `path` and moved there whole: ``with ColumnStore.staged(...) as s:``.

        Yields a store (mode "a") in a staging directory ``.<name>.staging-<hex>`` next to
        `path`; when the block returns, its rows are committed and the directory is renamed to
        `path`. A block or a write that fails leaves `path` as it was and removes the staging
        directory. `path` must be missing or an empty directory, or, with `overwrite`, hold a
        store of `format_name` with no other files and no writer (IndexLockedError): it is then
        swapped for the new one in one atomic rename (Linux renameat2 RENAME_EXCHANGE) and
        deleted. Where the system cannot swap directories the old store is renamed aside first,
        so a crash between the two renames leaves no store at `path` (both are kept beside it).
        """
        path = Path(path)
        _check_target(path, format_name, overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        stage = path.parent / f".{path.name}.staging-{secrets.token_hex(4)}"
        store = cls.create(stage, format_name=format_name, meta=meta, fixed=fixed, columns=columns)
        try:
            yield store
            store.close()
            _publish(stage, path, format_name, overwrite)
        except BaseException:
            store._release()
            shutil.rmtree(stage, ignore_errors=True)  # after a swap: the old store, replaced
            raise

    @classmethod
    def open(cls, path: str | os.PathLike, *, format_name: str, mode: str = "r") -> ColumnStore:
        """Open the store at `path`: mode "r" reads, "a" also appends (one writer at a time)."""
        path = _as_path(path)
        if mode not in ("r", "a"):
            raise StorageError(f"{path}: mode must be 'r' or 'a', not {mode!r}")
        _check_dir(path)
        dir_fd = _lock_dir(path) if mode == "a" else None
        try:
            manifest = _read_manifest(path, format_name)
        except BaseException:
            if dir_fd is not None:
                os.close(dir_fd)
            raise
        return cls(path, mode, manifest, dir_fd)

    # ---- reading ----

    @property
    def columns(self) -> dict[str, ColumnSpec]:
        """ColumnSpec of each column (dtype as an explicit little-endian string, e.g. "<f4")."""
        return {name: ColumnSpec(c.dtype.str, c.row_shape) for name, c in self._columns.items()}

    def rows(self, name: str) -> int:
        """Committed row count of column `name`."""
        return self._column(name).rows

    def pending_rows(self, name: str) -> int:
        """Rows appended to column `name`, committed or not."""
        return self._column(name).pending

    def column(self, name: str) -> np.ndarray:
        """Read-only memmap of the committed rows, shape (rows, *row_shape); remapped after commits."""
        col = self._column(name)
        if col.view is None or len(col.view) != col.rows:
            if col.rows == 0:  # np.memmap cannot map 0 bytes
                col.view = np.empty((0, *col.row_shape), col.dtype)
                col.view.flags.writeable = False
            else:
                col.view = np.memmap(col.file, col.dtype, mode="r", shape=(col.rows, *col.row_shape))
        return col.view

    def read_rows(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Copy committed rows [start, stop) into `out` (or a new array), shape (stop - start, *row_shape).

        Reads with os.preadv, not through a memmap, so scanning a file larger than RAM chunk by
        chunk keeps the memory held to the chunk. `out` must be C-contiguous, writeable and of the
        column's dtype.
        """
        col = self._column(name)
        if not (_is_int(start) and _is_int(stop) and 0 <= start <= stop <= col.rows):
            raise StorageError(f"{col.file}: rows [{start}, {stop}) out of range: {col.rows} committed rows")
        shape = (stop - start, *col.row_shape)
        if out is None:
            out = np.empty(shape, col.dtype)
        elif (
            not isinstance(out, np.ndarray)
            or out.shape != shape
            or out.dtype != col.dtype
            or not (out.flags.c_contiguous and out.flags.writeable)
        ):
            raise StorageError(
                f"{col.file}: out must be a writeable C-contiguous {col.dtype.name} array of shape {shape}"
            )
        _pread_into(col, name, memoryview(_as_bytes(out)), int(start) * col.row_bytes)
        return out

    def read_at(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Copy the committed rows ``rows`` (int64 ``(u,)``, any order) into a new array ``(u, *row_shape)``.

        One pread per run of consecutive rows, not a memmap: fetching scattered rows of a file
        larger than RAM then holds only those rows, where a mapping would keep every page the
        kernel's readahead brought in.
        """
        col = self._column(name)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= col.rows):
            raise StorageError(f"{col.file}: rows out of range: {col.rows} committed rows")
        out = np.empty((rows.size, *col.row_shape), col.dtype)
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        gathered = np.empty_like(out)
        view = memoryview(_as_bytes(gathered))
        runs = np.flatnonzero(np.diff(ordered) != 1) + 1
        for run in np.split(np.arange(rows.size), runs):
            if run.size:
                first, count = int(ordered[run[0]]), run.size
                chunk = view[int(run[0]) * col.row_bytes : (int(run[0]) + count) * col.row_bytes]
                _pread_into(col, name, chunk, first * col.row_bytes)
        out[order] = gathered
        return out

    def verify(self) -> dict[str, int]:
        """Re-read every committed byte and check it: fixed arrays against their sha256, column
        files block by block against their CRC-32s. Returns counts ``{"files", "bytes", "blocks"}``;
        raises CorruptIndexError naming the file and the rows of the first block that fails.
        """
        for name, entry in self._manifest["fixed"].items():
            _load_fixed(self.path, name, entry)
        files, total, blocks = len(self._manifest["fixed"]), 0, 0
        buffer = np.empty(BLOCK_BYTES, np.uint8)
        for name in self._manifest["columns"]:
            col = self._column(name)
            size = col.rows * col.row_bytes
            _check_sizes(col, name)
            expected = _read_crcs(col, size // BLOCK_BYTES)
            for block, start in enumerate(range(0, size, BLOCK_BYTES)):
                view = memoryview(buffer)[: min(BLOCK_BYTES, size - start)]
                _pread_into(col, name, view, start)
                want = int(expected[block]) if block < len(expected) else col.tail_crc
                if zlib.crc32(view) != want:
                    first, last = start // col.row_bytes, (start + len(view) - 1) // col.row_bytes
                    raise CorruptIndexError(
                        f"{col.file}: bytes [{start}, {start + len(view)}) (rows {first}..{last}) "
                        f"fail their checksum: the file was modified or damaged"
                    )
                blocks += 1
            if size % BLOCK_BYTES == 0 and col.tail_crc != 0:
                raise CorruptIndexError(f"{self.path / MANIFEST}: column {name!r} has a tail checksum but no tail")
            files, total = files + 2, total + size
        return {"files": files, "bytes": total, "blocks": blocks}

    def refresh(self) -> bool:
        """Mode "r": take the rows committed since this store was opened; True if there were any.

        The fixed arrays and column types must be the ones already open (an overwritten store is
        refused with StorageError); committed rows never go away, so a smaller count is corrupt.
        """
        if self._closed:
            raise StorageError(f"{self.path}: store is closed")
        if self.mode != "r":
            raise StorageError(f"{self.path}: refresh is for readers; a writer (mode 'a') already sees its rows")
        manifest = _read_manifest(self.path, self._manifest["format"])
        if manifest["fixed"] != self._manifest["fixed"] or set(manifest["columns"]) != set(self._columns):
            raise StorageError(f"{self.path}: the store was replaced since it was opened; open it again")
        parsed = {name: _parse_column(self.path, name, entry) for name, entry in manifest["columns"].items()}
        for name, new in parsed.items():  # every check before any change: a refusal keeps the old snapshot
            col = self._columns[name]
            if (new.dtype, new.row_shape) != (col.dtype, col.row_shape):
                raise StorageError(f"{self.path}: the store was replaced since it was opened; open it again")
            if new.rows < col.rows:
                raise CorruptIndexError(f"{col.file}: committed rows went from {col.rows} down to {new.rows}")
            _check_sizes(replace(col, rows=new.rows), name)
        grown = any(new.rows != self._columns[name].rows for name, new in parsed.items())
        for name, new in parsed.items():
            col = self._columns[name]
            col.rows = col.pending = new.rows
            col.tail_crc = col.pending_tail_crc = new.tail_crc
        self._manifest = manifest
        return grown

    # ---- writing ----

    def append(self, name: str, values: np.ndarray) -> None:
        """Append rows `values`, shape (n, *row_shape), after the pending rows; not committed yet.

        Refuses (writing nothing) a wrong row shape or a dtype that does not cast safely.
        """
        self._check_writable()
        col = self._column(name)
        values = np.asarray(values)
        if values.ndim != 1 + len(col.row_shape) or values.shape[1:] != col.row_shape:
            raise StorageError(
                f"{col.file}: column {name!r} takes arrays of shape (n, *{col.row_shape}), got {values.shape}"
            )
        if not np.can_cast(values.dtype, col.dtype, casting="safe"):
            raise StorageError(
                f"{col.file}: column {name!r} is {col.dtype.name}; {values.dtype} does not cast safely"
            )
        data = memoryview(_as_bytes(np.ascontiguousarray(values, dtype=col.dtype)))
        if col.residue:
            _check_sizes(col, name, cut_residue=True)
            col.residue = False
        start = col.pending * col.row_bytes
        finished, tail_crc = _block_crcs(data, start, col.pending_tail_crc)
        _pwrite_all(col.fd, data, start)
        if finished:
            _pwrite_all(col.crc_fd, memoryview(np.array(finished, "<u4").view(np.uint8)), 4 * (start // BLOCK_BYTES))
        col.pending += len(values)
        col.pending_tail_crc = tail_crc

    def commit(self) -> None:
        """Make the appended rows durable: fsync the column files, then replace the manifest.

        If it raises, nothing new is committed (see the module's "Failed writes"); call `rollback`.
        """
        self._check_writable()
        dirty = {name: c for name, c in self._columns.items() if c.pending != c.rows}
        if not dirty:
            return
        for col in dirty.values():
            os.fsync(col.fd)
            os.fsync(col.crc_fd)
        columns = {
            n: {**e, "rows": self._columns[n].pending, "tail_crc": self._columns[n].pending_tail_crc}
            for n, e in self._manifest["columns"].items()
        }
        manifest = {**self._manifest, "columns": columns}
        _replace_manifest(self.path, self._dir_fd, manifest, previous=self._manifest)
        self._manifest = manifest
        for col in dirty.values():
            col.rows, col.tail_crc = col.pending, col.pending_tail_crc

    def rollback(self) -> None:
        """Drop the rows appended since the last commit, after a failed or interrupted write.

        The committed row counts are read again from manifest.json (only this writer changes
        it), so a commit that was interrupted after its rename counts as done. The dropped bytes
        are cut off now, or by the next append if cutting fails. Never raises for an I/O error:
        if the manifest cannot be read, the store refuses further writes (open it again).
        No-op on a reader or a closed store.
        """
        if self._closed or self.mode != "a" or self._unusable:
            return
        try:
            manifest = _read_manifest(self.path, self._manifest["format"])
            parsed = {name: _parse_column(self.path, name, manifest["columns"][name]) for name in self._columns}
        except (OSError, KeyError, StorageError) as error:
            self._unusable = f"after a failed write its manifest could not be read back ({error})"
            return
        self._manifest = manifest
        for name, col in self._columns.items():
            col.rows = col.pending = parsed[name].rows
            col.tail_crc = col.pending_tail_crc = parsed[name].tail_crc
            col.residue = True
            with contextlib.suppress(OSError, StorageError):  # else the next append cuts them
                _check_sizes(col, name, cut_residue=True)
                col.residue = False

    def close(self) -> None:
        """Commit pending rows (mode "a") and close the files; idempotent. If the commit
        raises, the files are closed all the same and the pending rows dropped."""
        if self._closed:
            return
        try:
            if self.mode == "a" and not self._unusable:
                self.commit()
        finally:
            self._release()

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Refused: a copy would share this store's file descriptors and writer lock."""
        raise TypeError(
            f"{self.path}: a store holds open files (and, writing, the directory's lock) and cannot be pickled or copied; "
            "open it again by its path"
        )

    def __enter__(self) -> ColumnStore:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Close; on an exception the pending rows are dropped rather than committed."""
        if exc_type is None:
            self.close()
        else:
            self._release()

    def __del__(self) -> None:
        self._release()  # frees the files and the lock; never commits

    # ---- private ----

    def _column(self, name: str) -> _Column:
        if self._closed:
            raise StorageError(f"{self.path}: store is closed")
        if name not in self._columns:
            raise StorageError(f"{self.path}: no column {name!r} (has {sorted(self._columns)})")
        return self._columns[name]

    def _check_writable(self) -> None:
        if self._closed:
            raise StorageError(f"{self.path}: store is closed")
        if self.mode != "a":
            raise StorageError(f"{self.path}: store is open read-only (mode 'r')")
        if self._unusable:
            raise StorageError(f"{self.path}: {self._unusable}; close this writer and open the store again")

    def _release(self) -> None:
        """Close every file descriptor (and so the writer lock) without committing."""
        self._closed = True
        for col in self._columns.values():
            for fd in (col.fd, col.crc_fd):
                if fd >= 0:
                    os.close(fd)
            col.fd = col.crc_fd = -1
            col.view = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None


# ---- helpers: validation ----


def _as_path(path: Any) -> Path:
    """``path`` as a Path; TypeError naming the type for anything but a str or os.PathLike."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def _pread_into(col: _Column, name: str, view: memoryview, offset: int) -> None:
    """Fill ``view`` from the column file at byte ``offset``."""
    while view:
        n = os.preadv(col.fd, [view], offset)
        if n == 0:
            raise CorruptIndexError(f"{col.file}: column {name!r} is truncated (file shrank while open)")
        view, offset = view[n:], offset + n


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _block_crcs(data: memoryview, start: int, tail_crc: int) -> tuple[list[int], int]:
    """CRC-32s after appending ``data`` at byte ``start`` of a column whose partial last block so
    far has CRC ``tail_crc``: the CRCs of the blocks this completes, and the new tail CRC."""
    finished, offset = [], 0
    while offset < len(data):
        take = min(len(data) - offset, BLOCK_BYTES - (start + offset) % BLOCK_BYTES)
        tail_crc = zlib.crc32(data[offset : offset + take], tail_crc)
        offset += take
        if (start + offset) % BLOCK_BYTES == 0:
            finished.append(tail_crc)
            tail_crc = 0
    return finished, tail_crc


def _read_crcs(col: _Column, blocks: int) -> np.ndarray:
    """The first ``blocks`` CRC-32s of the column's .crc file: uint32 ``(blocks,)``."""
    data = bytearray(4 * blocks)
    view, offset = memoryview(data), 0
    while view:
        n = os.preadv(col.crc_fd, [view], offset)
        if n == 0:
            raise CorruptIndexError(f"{col.crc_file}: truncated (the manifest's rows need {blocks} checksums)")
        view, offset = view[n:], offset + n
    return np.frombuffer(bytes(data), "<u4")


def _check_sizes(col: _Column, name: str, *, cut_residue: bool = False) -> None:
    """Refuse a column whose files are shorter than its committed rows; ``cut_residue``: cut off
    what an interrupted append left past them."""
    committed = col.rows * col.row_bytes
    committed_crcs = 4 * (committed // BLOCK_BYTES)
    for fd, file, need in ((col.fd, col.file, committed), (col.crc_fd, col.crc_file, committed_crcs)):
        size = os.fstat(fd).st_size
        if size < need:
            raise CorruptIndexError(
                f"{file}: column {name!r} is truncated: {size} bytes, {col.rows} committed rows need {need}"
            )
        if cut_residue and size > need:
            os.ftruncate(fd, need)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_name(where: Path, what: str, name: Any) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise StorageError(f"{where}: bad {what} name {name!r} (letters, digits, '_' and '-')")


def _check_meta(path: Path, meta: Any) -> dict:
    """Return a copy of `meta` as JSON reads it back, refusing anything that does not read back exactly."""
    try:
        text = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise StorageError(f"{path}: meta is not JSON-serialisable ({e})") from None
    loaded = json.loads(text)
    if not isinstance(meta, dict) or loaded != meta:
        raise StorageError(f"{path}: meta must be a dict that JSON reads back exactly (str keys, no tuples)")
    return loaded


def _check_spec(where: str, name: Any, dtype: Any, row_shape: Any) -> tuple[np.dtype, tuple[int, ...]]:
    """Validate a column's name, dtype and row shape; return the little-endian dtype and the shape."""
    _check_name(Path(where), "column", name)
    try:
        dt = np.dtype(dtype) if isinstance(dtype, str) else None
    except TypeError:
        dt = None
    if dt is None or dt.kind not in _COLUMN_KINDS:
        raise StorageError(f"{where}: column {name!r}: dtype {dtype!r} is not a plain numeric numpy dtype")
    shape = tuple(row_shape) if isinstance(row_shape, (tuple, list)) else None
    if shape is None or not all(_is_int(s) and s > 0 for s in shape):
        raise StorageError(f"{where}: column {name!r}: row_shape {row_shape!r} is not a tuple of positive ints")
    return dt.newbyteorder("<"), tuple(int(s) for s in shape)


def _npy_bytes(path: Path, name: Any, array: Any) -> bytes:
    _check_name(path, "fixed array", name)
    buf = io.BytesIO()
    try:
        np.save(buf, np.asarray(array), allow_pickle=False)
    except ValueError as e:
        raise StorageError(f"{path}: fixed array {name!r} cannot be saved without pickle ({e})") from None
    return buf.getvalue()


# ---- helpers: reading the manifest ----


def _check_dir(path: Path) -> None:
    if not path.exists():
        raise IndexFormatError(f"{path}: no such directory")
    if not path.is_dir():
        raise IndexFormatError(f"{path}: not a directory (an index is a directory)")


def _manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON, without its own "checksum" entry."""
    body = {key: value for key, value in manifest.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


def _read_manifest(path: Path, format_name: str) -> dict:
    """Parse and check the manifest's top level: format, version, checksum and the three sections."""
    _check_dir(path)
    mpath = path / MANIFEST
    try:
        data = mpath.read_bytes()
    except FileNotFoundError:
        raise IndexFormatError(f"{path}: not a {format_name} index (no {MANIFEST})") from None
    try:
        m = json.loads(data)
    except ValueError as e:
        raise CorruptIndexError(f"{mpath}: corrupt manifest: not valid JSON ({e})") from None
    if not isinstance(m, dict) or not isinstance(m.get("format"), str):
        raise IndexFormatError(f"{mpath}: not a {format_name} manifest (no format name)")
    if m["format"] != format_name:
        raise IndexFormatError(f"{mpath}: foreign store: format {m['format']!r}, expected {format_name!r}")
    version = m.get("version")
    if type(version) is not int or version < 1:
        raise CorruptIndexError(f"{mpath}: corrupt manifest: bad version {version!r}")
    if version > FORMAT_VERSION:
        raise IndexFormatError(
            f"{mpath}: written by a newer tqindex (format version {version}; this one reads up to {FORMAT_VERSION})"
        )
    if version < FORMAT_VERSION:
        raise IndexFormatError(
            f"{mpath}: format version {version} predates checksums; rebuild the index with this tqindex"
        )
    if m.get("checksum") != _manifest_checksum(m):
        raise CorruptIndexError(f"{mpath}: corrupt manifest: its checksum does not match its content")
    for key in ("meta", "fixed", "columns"):
        if not isinstance(m.get(key), dict):
            raise CorruptIndexError(f"{mpath}: corrupt manifest: {key!r} missing or not an object")
    return m


def store_format(path: str | os.PathLike) -> str:
    """The format name the manifest of the store at ``path`` gives, so that a caller can open it
    with the reader of that format (which checks everything else). IndexFormatError where there
    is no store; CorruptIndexError for a manifest that is not JSON."""
    path = _as_path(path)
    _check_dir(path)
    try:
        data = (path / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise IndexFormatError(f"{path}: not a tqindex index (no {MANIFEST})") from None
    try:
        m = json.loads(data)
    except ValueError as e:
        raise CorruptIndexError(f"{path / MANIFEST}: corrupt manifest: not valid JSON ({e})") from None
    if not isinstance(m, dict) or not isinstance(m.get("format"), str):
        raise IndexFormatError(f"{path / MANIFEST}: not a tqindex manifest (no format name)")
    return m["format"]


def _field(path: Path, what: str, entry: Any, key: str, kind: type) -> Any:
    value = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CorruptIndexError(f"{path / MANIFEST}: corrupt manifest: {what} has no valid {key!r}")
    return value


def _file(path: Path, what: str, entry: Any) -> Path:
    """The file an entry names: a plain file name inside the store, never a path out of it."""
    name = _field(path, what, entry, "file", str)
    plain = os.path.basename(name) == name and "\\" not in name and "\0" not in name
    if not plain or name.endswith(".crc") or name in ("", ".", "..", MANIFEST, _MANIFEST_TMP):
        raise CorruptIndexError(f"{path / MANIFEST}: corrupt manifest: {what} names file {name!r}")
    return path / name


def _load_fixed(path: Path, name: str, entry: Any) -> np.ndarray:
    """Load a fixed array, checking its sha256, dtype and shape against the manifest."""
    what = f"fixed array {name!r}"
    file = _file(path, what, entry)
    dtype, shape = _field(path, what, entry, "dtype", str), _field(path, what, entry, "shape", list)
    sha256 = _field(path, what, entry, "sha256", str)
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise CorruptIndexError(f"{file}: {what} is missing") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CorruptIndexError(f"{file}: {what} is corrupt (sha256 differs from the manifest)")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CorruptIndexError(f"{file}: {what} is corrupt ({e})") from None
    if not isinstance(array, np.ndarray) or array.dtype.str != dtype or list(array.shape) != shape:
        raise CorruptIndexError(f"{file}: {what} is corrupt: dtype/shape differ from the manifest's {dtype} {shape}")
    array.flags.writeable = False
    return array


def _parse_column(path: Path, name: str, entry: Any) -> _Column:
    what = f"column {name!r}"
    file = _file(path, what, entry)
    rows, tail_crc = _field(path, what, entry, "rows", int), _field(path, what, entry, "tail_crc", int)
    if rows < 0 or not 0 <= tail_crc < 2**32:
        raise CorruptIndexError(f"{path / MANIFEST}: corrupt manifest: {what} has {rows} rows, tail CRC {tail_crc}")
    try:
        dtype, row_shape = _check_spec(
            f"{path / MANIFEST}: corrupt manifest",
            name,
            _field(path, what, entry, "dtype", str),
            _field(path, what, entry, "row_shape", list),
        )
    except CorruptIndexError:
        raise
    except StorageError as e:
        raise CorruptIndexError(str(e)) from None
    return _Column(file, dtype, row_shape, rows=rows, pending=rows, tail_crc=tail_crc, pending_tail_crc=tail_crc)


# ---- helpers: files ----


def _open_fd(file: Path, flags: int) -> int:
    try:
        return os.open(file, flags)
    except FileNotFoundError:
        raise CorruptIndexError(f"{file}: column file is missing") from None
    except OSError as e:
        raise StorageError(f"{file}: cannot open ({e.strerror})") from None


def _lock_dir(path: Path) -> int:
    """Open directory `path` and take the exclusive writer lock on it; return the descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise StorageError(f"{path}: cannot open directory ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise IndexLockedError(f"{path}: already open for writing elsewhere (one writer at a time)") from None
    return fd


def _as_bytes(array: np.ndarray) -> np.ndarray:
    """Flat uint8 view of a C-contiguous array (shares its memory)."""
    return array.reshape(-1).view(np.uint8)


def _write_file(file: Path, data: bytes) -> None:
    """Write `data` to `file` (replacing it) and fsync it."""
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_manifest(path: Path, dir_fd: int, manifest: dict, previous: dict | None = None) -> None:
    """The commit point: write a temp manifest, fsync it, rename it over the old, fsync the directory.

    If it raises, the old manifest is in place: a failed directory fsync (after the rename) puts
    ``previous`` back, unless that fails too (then the new one stays, whole).
    """
    _write_manifest(path, manifest)
    try:
        os.fsync(dir_fd)
    except OSError:
        if previous is not None:
            with contextlib.suppress(OSError):
                _write_manifest(path, previous)
                os.fsync(dir_fd)
        raise


def _write_manifest(path: Path, manifest: dict) -> None:
    """Write manifest.json through a fsynced temp file and an atomic rename (a failed write removes the temp file)."""
    manifest = {**manifest, "checksum": _manifest_checksum(manifest)}
    try:
        _write_file(path / _MANIFEST_TMP, json.dumps(manifest, indent=1, allow_nan=False).encode() + b"\n")
        os.replace(path / _MANIFEST_TMP, path / MANIFEST)
    except BaseException:
        with contextlib.suppress(OSError):
            (path / _MANIFEST_TMP).unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    """fsync directory ``path``, making the renames inside it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _renameat2() -> Any:
    """The C library's renameat2 (glibc >= 2.28), or None."""
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap the existing paths ``a`` and ``b`` in one atomic rename; False where the system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # no such call, or the file system lacks it
        return False
    raise OSError(code, os.strerror(code), str(b))


def _check_target(path: Path, format_name: str, overwrite: bool) -> None:
    """Refuse a `staged` target that is a file, a non-empty directory (without `overwrite`), or
    anything but a whole store of `format_name` with no writer (with it)."""
    if path.exists() and not path.is_dir():
        raise StorageError(f"{path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise StorageError(f"{path}: directory is not empty (overwrite=True replaces a store)")
        lock = _lock_dir(path)
        try:
            _replaceable(path, format_name)
        finally:
            os.close(lock)


def _replaceable(path: Path, format_name: str) -> None:
    """Refuse to replace the directory `path` unless it holds a store of `format_name` and nothing else."""
    others = _store_files(path, format_name)[1]
    if others:
        raise StorageError(f"{path}: refusing to overwrite: it holds files that are not the store's: {others[:5]}")


def _publish(stage: Path, path: Path, format_name: str, overwrite: bool) -> None:
    """Move the committed store at `stage` to `path` (see `ColumnStore.staged`)."""
    if not (overwrite and path.is_dir() and any(path.iterdir())):
        os.rename(stage, path)  # atomic; replaces an empty directory, refuses a non-empty one
        _fsync_dir(path.parent)
        return
    lock = _lock_dir(path)  # no writer may be in the store replaced
    try:
        _replaceable(path, format_name)
        old = stage
        if not _exchange(stage, path):
            old = path.parent / f".{path.name}.replaced-{secrets.token_hex(4)}"
            os.rename(path, old)
            try:
                os.rename(stage, path)
            except BaseException:
                os.rename(old, path)
                raise
        _fsync_dir(path.parent)
    finally:
        os.close(lock)
    shutil.rmtree(old)


def _store_files(path: Path, format_name: str) -> tuple[list[Path], list[str]]:
    """The files of the store at `path` (manifest first) and the names of any other entries in
    it; refuses anything but a readable store of `format_name`."""
    try:
        m = _read_manifest(path, format_name)
        files = [_file(path, f"{kind} {name!r}", e) for kind in ("fixed", "columns") for name, e in m[kind].items()]
        files += [_file(path, f"column {name!r}", e).with_suffix(".crc") for name, e in m["columns"].items()]
    except StorageError as e:
        raise StorageError(f"{path}: refusing to overwrite: not a readable {format_name!r} store ({e})") from None
    own = [path / MANIFEST, *files, path / _MANIFEST_TMP]
    return own, sorted(entry.name for entry in path.iterdir() if entry not in own)


def _remove_store(path: Path, format_name: str) -> None:
    """Delete the files of the store at `path` (others stay), refusing anything but a store of `format_name`."""
    for file in _store_files(path, format_name)[0]:  # manifest first: a crash leaves a non-store
        file.unlink(missing_ok=True)
