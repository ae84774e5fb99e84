"""The exceptions tqindex raises for stores and indexes; each message names the file and the problem.

    TQIndexError                 base of everything below
    └── StorageError             a store or its arguments were refused (also a ValueError)
        ├── IndexFormatError     not a tqindex index: missing, foreign, or a newer format version
        ├── CorruptIndexError    an index that was damaged: truncated files, checksum mismatches,
        │                        an unreadable or inconsistent manifest
        └── IndexLockedError     another writer holds the directory (one writer at a time)
"""

from __future__ import annotations


class TQIndexError(Exception):
    """Base class of tqindex's own exceptions."""


class StorageError(TQIndexError, ValueError):
    """A store (or the arguments for one) was refused; the message names the path and problem."""


class IndexFormatError(StorageError):
    """The path holds no tqindex index: nothing there, something else, or a newer format version."""


class CorruptIndexError(StorageError):
    """The index's files are damaged or disagree with its manifest; the message names the file."""


class IndexLockedError(StorageError):
    """The directory is already open for writing (mode "a") by another index or process."""
