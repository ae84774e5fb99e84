"""``tqindex.open``: open a saved index of any kind, by the format its manifest names."""

from __future__ import annotations

import os
from typing import Any

from tqindex import ivf
from tqindex.index import TurboQuantIndex
from tqindex.storage import store_format


def open(path: str | os.PathLike, mode: str = "r", **options: Any) -> Any:
    """Open the index saved at ``path`` (mode "r" or "a"): a `TurboQuantIndex`, a
    `TurboQuantIVFIndex`, or a `ShardedIndex` (which needs ray), by its manifest's format.

    ``options`` go to that class's ``open`` (``backend``, ``chunk_rows``; ``nprobe`` for IVF).
    Raises `tqindex.errors.IndexFormatError` where ``path`` holds no index.
    """
    kind = store_format(path)
    if kind == ivf.FORMAT_NAME:
        return ivf.TurboQuantIVFIndex.open(path, mode, **options)
    if kind == "tqindex-sharded":
        from tqindex.shards import ShardedIndex  # imported here: `import tqindex` never needs ray

        return ShardedIndex.open(path, mode, **options)
    return TurboQuantIndex.open(path, mode, **options)
