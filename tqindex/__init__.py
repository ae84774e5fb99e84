"""tqindex: vector search and KV caches over TurboQuant codes (rotation + Lloyd-Max codebook, no training)."""

from tqindex import _fork  # noqa: F401  (a forked child of a threaded process: torch on one thread)
from tqindex.codec import CodecConfig, Codes, TurboQuantCodec
from tqindex.index import TurboQuantIndex
from tqindex.ivf import TurboQuantIVFIndex
from tqindex.opening import open
from tqindex.errors import CorruptIndexError, IndexFormatError, IndexLockedError, StorageError, TQIndexError

__all__ = [
    "CodecConfig",
    "Codes",
    "CorruptIndexError",
    "IndexFormatError",
    "IndexLockedError",
    "StorageError",
    "TQIndexError",
    "TurboQuantCodec",
    "TurboQuantIVFIndex",
    "TurboQuantIndex",
    "open",
]
__version__ = "0.1.0"
