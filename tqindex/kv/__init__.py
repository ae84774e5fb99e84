"""KV-cache adapter for Hugging Face transformers: TurboQuant codes inside attention (extra ``kv``).

    from tqindex.kv import TurboQuantCache
    model.set_attn_implementation("turboquant")   # optional: attention on the codes
    model.generate(**inputs, cache=TurboQuantCache(key_bits=4, value_bits=4))

(``past_key_values=`` on transformers releases whose models do not take ``cache=`` yet; `cache_keyword`
says which keyword the installed one takes.)

Importing this package registers the "turboquant" attention (and its mask) with transformers.
"""

from tqindex.kv.attention import ATTENTION_NAME, codes_attention, register, turboquant_attention
from tqindex.kv.cache import MemoryReport, TurboQuantCache, TurboQuantLayer, cache_keyword
from tqindex.kv.compressed import CompressedKV

register()

__all__ = [
    "ATTENTION_NAME",
    "CompressedKV",
    "MemoryReport",
    "TurboQuantCache",
    "TurboQuantLayer",
    "cache_keyword",
    "codes_attention",
    "register",
    "turboquant_attention",
]
