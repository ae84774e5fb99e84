"""CUDA graphs of the resident search: the device part captured once per batch shape, then replayed.

A search over codes resident on a GPU (`scan.search_resident`) is one scan kernel and a few dozen
small torch operations (candidate merge, exact rescoring, top-k); launched one by one from
Python they cost more than the scan at a million rows. `SearchGraphs` captures the device part
(`scan.resident_candidates`) in a ``torch.cuda.CUDAGraph`` for each (scanner, batch size, k,
mask, bias) and replays it with the new queries copied into its input buffer, as serving engines
do for decode; the host part (`scan.finish_resident`) runs after the one synchronisation.

The captured graph reads the resident columns by address: when they change (rows added or
moved), `SearchGraphs` drops every graph. Batches above ``max_queries`` are not captured (their
buffers grow with the batch, and launches matter less), and a capture that fails leaves that
shape to the eager path. One index object serves searches from many threads: a lock holds each
graph's copy in, replay and copy out together (its buffers are shared), and captures are
thread-local, so another thread's synchronisation neither fails nor spoils one.

Off by default (``GRAPH_MAX_QUERIES = 0``): this was written after the last GPU session of its
round and has run only in its CPU fallback. tests/test_triton_scan.py compares it with the eager
search on a GPU, and benchmarks/bench_gpu.py times both; turn it on once those pass there.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from tqindex.codec import TurboQuantCodec
from tqindex.kernels.grid import on_device
from tqindex.kernels.scan import finish_resident, resident_candidates, search_resident, to_host

#: batches of up to this many queries are captured (the candidate buffers grow with the batch); 0: off,
#: until measured on a GPU (32 is what tests/test_triton_scan.py and benchmarks/bench_gpu.py use)
GRAPH_MAX_QUERIES = 0
#: graphs kept (least recently used dropped first): each holds its own buffers
GRAPH_CACHE = 8


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    queries: torch.Tensor  # the input buffer: rotated float32 queries (m, W)
    scores: torch.Tensor
    found: torch.Tensor
    flags: torch.Tensor


class SearchGraphs:
    """`scan.search_resident` through CUDA graphs, for one resident index.

    Args:
        max_queries: larger batches run eagerly.
        max_graphs: graphs kept, least recently used dropped first.
    """

    def __init__(self, max_queries: int = GRAPH_MAX_QUERIES, max_graphs: int = GRAPH_CACHE):
        self.max_queries, self.max_graphs = max_queries, max_graphs
        self._graphs: OrderedDict[tuple, _Captured | None] = OrderedDict()  # None: capture failed, eager
        self._resident: tuple | None = None
        self._lock = threading.RLock()  # one graph's buffers serve one search at a time

    def clear(self) -> None:
        """Drop every graph (and the buffers it holds), once no search is replaying one."""
        with self._lock:
            self._graphs.clear()
            self._resident = None

    def search(
        self,
        codec: TurboQuantCodec,
        scanner: Any,
        rotated_queries: torch.Tensor,
        packed: torch.Tensor,
        factors: torch.Tensor,
        valid: torch.Tensor | None,
        k: int,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same arguments and results as `scan.search_resident` (CUDA tensors in, CPU tensors out); replays a graph where one
        is (or can be) captured for this shape, else runs eagerly."""
        m = rotated_queries.shape[0]
        if packed.device.type != "cuda" or not 0 < m <= self.max_queries:
            return search_resident(codec, scanner, rotated_queries, packed, factors, valid, k, bias)
        return self._replayed(codec, scanner, rotated_queries, packed, factors, valid, k, bias)

    def _replayed(self, codec, scanner, rotated_queries, packed, factors, valid, k, bias) -> tuple[torch.Tensor, torch.Tensor]:
        """`search` through the graph of this shape, captured first if need be: queries copied in,
        the graph replayed and its outputs copied out under one lock (the buffers are the graph's)."""
        resident = tuple(None if t is None else (t.data_ptr(), tuple(t.shape)) for t in (packed, factors, valid, bias))
        key = (id(scanner), tuple(rotated_queries.shape), int(k))
        with self._lock, on_device(packed.device):
            if resident != self._resident:  # the graphs read the old columns by address
                self.clear()
                self._resident = resident
            if key not in self._graphs:
                self._graphs[key] = _capture(codec, scanner, rotated_queries, packed, factors, valid, k, bias)
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
            self._graphs.move_to_end(key)
            captured = self._graphs[key]
            if captured is not None:
                captured.queries.copy_(rotated_queries)
                captured.graph.replay()
                scores, found, flags = to_host(captured.scores, captured.found, captured.flags)  # copies: the next replay overwrites them
        if captured is None:
            return search_resident(codec, scanner, rotated_queries, packed, factors, valid, k, bias)
        return finish_resident(codec, scanner, rotated_queries, packed, factors, valid, k, bias, scores, found, flags)

    def __deepcopy__(self, memo: dict) -> "SearchGraphs":
        """A copy starts with no graphs (they belong to the original's columns)."""
        return SearchGraphs(self.max_queries, self.max_graphs)

    def __reduce__(self) -> tuple:
        return SearchGraphs, (self.max_queries, self.max_graphs)


def _capture(codec, scanner, rotated_queries, packed, factors, valid, k, bias) -> _Captured | None:
    """The device part captured for this shape (after one eager run on a side stream, which compiles
    the kernels); None if capture fails (that shape then runs eagerly)."""
    queries = rotated_queries.clone()
    side = torch.cuda.Stream(packed.device)
    side.wait_stream(torch.cuda.current_stream(packed.device))
    try:
        with torch.cuda.stream(side):
            resident_candidates(codec, scanner, queries, packed, factors, valid, k, bias)
        torch.cuda.current_stream(packed.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads may synchronise meanwhile
            scores, found, flags = resident_candidates(codec, scanner, queries, packed, factors, valid, k, bias)
    except RuntimeError:
        torch.cuda.synchronize(packed.device)
        return None
    return _Captured(graph, queries, scores, found, flags)


__all__ = ["GRAPH_CACHE", "GRAPH_MAX_QUERIES", "SearchGraphs"]
