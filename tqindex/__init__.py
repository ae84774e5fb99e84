"""tqindex: vector search and KV caches over TurboQuant codes (rotation + Lloyd-Max codebook, no training)."""

from tqindex.codec import CodecConfig, Codes, TurboQuantCodec

__all__ = ["CodecConfig", "Codes", "TurboQuantCodec"]
__version__ = "0.1.0"
