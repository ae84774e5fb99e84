"""tqindex: vector search and KV caches over TurboQuant codes (rotation + Lloyd-Max codebook, no training)."""

from tqindex.codec import CodecConfig, Codes, TurboQuantCodec
from tqindex.index import TurboQuantIndex, open
from tqindex.storage import StorageError

__all__ = ["CodecConfig", "Codes", "StorageError", "TurboQuantCodec", "TurboQuantIndex", "open"]
__version__ = "0.1.0"
