"""I/O fault injection into the storage layer, as SQLite's tests inject I/O errors.

    with FaultInjector(fail_at=3, error=errno.ENOSPC) as faults:
        index.add(x)      # the storage layer's 3rd write, truncate, fsync or rename raises OSError(ENOSPC)
    faults.count          # operations seen; faults.injected: how many were made to fail

While the block runs, the OS calls of `tqindex.storage` that change files (``os.write``,
``os.pwrite``, ``os.ftruncate``, ``os.fsync``, ``os.replace``, ``os.rename`` and its directory
swap) are counted, in every thread, and the ``fail_at``-th raises ``error``: an errno (an
``OSError`` carrying it) or an exception class such as ``KeyboardInterrupt``. A failing write
first writes half its bytes, as a full disk or a file size limit does. With ``persistent`` every
later operation fails too, as on a disk that stays full. With ``sync=False`` fsyncs are counted
but not made (tests that simulate no power loss run faster). Reads are never touched.
Injectors nest (the inner one sees the calls first). For tests and
``benchmarks/stress_crash.py --io-errors``; nothing else imports it.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterable
from typing import Any

from tqindex import storage

KINDS = ("write", "truncate", "fsync", "rename")
#: the errors a full disk (ENOSPC), a failing device (EIO) and a file size limit (EFBIG) give
ERRNOS = (errno.ENOSPC, errno.EIO, errno.EFBIG)


class FaultInjector:
    """Counts the storage layer's write, truncate, fsync and rename calls and fails the ``fail_at``-th.

    ``fail_at``: a call number (1-based), several, or None to only count. ``log`` is the kind of
    each call seen, in order. Use as a context manager.
    """

    def __init__(
        self,
        fail_at: int | Iterable[int] | None = None,
        error: int | type[BaseException] = errno.EIO,
        *,
        persistent: bool = False,
        sync: bool = True,
    ):
        self.fail_at = set() if fail_at is None else {fail_at} if isinstance(fail_at, int) else set(fail_at)
        self.error, self.persistent, self.sync = error, persistent, sync
        self.count = self.injected = 0
        self.log: list[str] = []
        self._lock = threading.Lock()
        self._saved: tuple[Any, Any] | None = None

    def __enter__(self) -> FaultInjector:
        if self._saved is not None:
            raise RuntimeError("this FaultInjector is already active")
        self._saved = (storage.os, storage._exchange)
        outer_os, outer_exchange = self._saved
        storage.os = _FaultyOS(self, outer_os)
        storage._exchange = lambda a, b: self._check("rename") or outer_exchange(a, b)
        return self

    def __exit__(self, *exc: Any) -> None:
        storage.os, storage._exchange = self._saved
        self._saved = None

    def _check(self, kind: str) -> bool:
        """Count one call of ``kind``; True when it is to fail (a write then fails after half its bytes)."""
        with self._lock:
            self.count += 1
            self.log.append(kind)
            due = self.count in self.fail_at or (self.persistent and bool(self.fail_at) and self.count > min(self.fail_at))
            self.injected += due
        if due and kind != "write":
            self._raise()
        return due

    def _raise(self) -> None:
        if isinstance(self.error, int):
            raise OSError(self.error, f"{os.strerror(self.error)} (injected)")
        raise self.error()


class _FaultyOS:
    """Stands in for the ``os`` module inside `tqindex.storage`: every name is ``inner``'s (the
    real module, or an outer injector's stand-in) except the calls `FaultInjector` counts."""

    def __init__(self, injector: FaultInjector, inner: Any):
        self._injector, self._inner = injector, inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def write(self, fd: int, data: Any) -> int:
        if self._injector._check("write"):
            self._inner.write(fd, memoryview(data)[: len(data) // 2])
            self._injector._raise()
        return self._inner.write(fd, data)

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        if self._injector._check("write"):
            self._inner.pwrite(fd, memoryview(data)[: len(data) // 2], offset)
            self._injector._raise()
        return self._inner.pwrite(fd, data, offset)

    def ftruncate(self, fd: int, length: int) -> None:
        self._injector._check("truncate")
        self._inner.ftruncate(fd, length)

    def fsync(self, fd: int) -> None:
        self._injector._check("fsync")
        if self._injector.sync:
            self._inner.fsync(fd)

    def replace(self, src: Any, dst: Any) -> None:
        self._injector._check("rename")
        self._inner.replace(src, dst)

    def rename(self, src: Any, dst: Any) -> None:
        self._injector._check("rename")
        self._inner.rename(src, dst)
