"""Exhaustive top-k search over chunks of packed codes, with exact rescoring of candidates.

A scanner (CPU or Triton) picks ``candidates`` rows per query from each chunk in reduced
precision; the running top-k keeps the best across chunks; the survivors are rescored with the
codec's float32 estimator and the best ``k`` returned. The ranking is therefore the codec's
own (``TurboQuantCodec.inner_products``), ties aside, at the speed of the reduced-precision scan.
Kernels know nothing of ids or files: rows are positions, chunks come from the caller.

``scan_groups_topk`` is the same scan where each chunk is scanned for some of the queries only,
with a per-query constant added to their scores: an inverted-file index's lists, each probed by
the queries whose nearest centroids include it (``tqindex.ivf``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import torch

from tqindex.codec import TurboQuantCodec
from tqindex.kernels.topk import RunningTopK

_RESCORE_QUERY_BLOCK = 256


@dataclass(frozen=True)
class Chunk:
    """Rows ``[start, start + n)``: packed uint8 ``(n, B)``, factors float32 ``(n, F)``, optional bool ``valid`` ``(n,)``."""

    start: int
    packed: torch.Tensor
    factors: torch.Tensor
    valid: torch.Tensor | None = None


@dataclass(frozen=True)
class QueryChunk:
    """A `Chunk` scanned for the queries ``queries`` only (int64 ``(q,)``, distinct positions in the batch).

    ``bias``: float32 added to the scores: ``(q,)`` one per query, or ``(q, n)`` one per query and
    row (then every row of the chunk is ranked, not just the scanner's top candidates); None: 0.
    ``rows``: int64 ``(n,)`` the global row of each chunk row, for chunks gathered from scattered
    rows; None: ``chunk.start + position``.
    """

    queries: torch.Tensor
    chunk: Chunk
    bias: torch.Tensor | None = None
    rows: torch.Tensor | None = None


class Scanner(Protocol):
    def prepare(self, rotated_queries: torch.Tensor) -> torch.Tensor: ...
    def chunk_topk(
        self, queries: torch.Tensor, packed: torch.Tensor, factors: torch.Tensor, valid: torch.Tensor | None, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def take_queries(scanner: Scanner, prepared: Any, queries: torch.Tensor) -> Any:
    """The prepared form of the queries at positions ``queries`` (int64 ``(q,)``), cut from
    ``prepared`` = ``scanner.prepare`` of the whole batch: by the scanner's own ``take_queries``
    where it has one, else row by row from a tensor, an array or a tuple of them (None kept),
    whose first axis is the query. All queries in order: ``prepared`` itself, no copy.
    """
    if queries.shape[0] == _batch_size(prepared) and bool((queries == torch.arange(queries.shape[0])).all()):
        return prepared
    own = getattr(scanner, "take_queries", None)
    return own(prepared, queries) if own is not None else _take_rows(prepared, queries)


def _batch_size(prepared: Any) -> int | None:
    if isinstance(prepared, tuple):
        return next((size for size in map(_batch_size, prepared) if size is not None), None)
    return None if prepared is None else int(prepared.shape[0])


def _take_rows(prepared: Any, queries: torch.Tensor) -> Any:
    if prepared is None:
        return None
    if isinstance(prepared, tuple):
        return tuple(_take_rows(part, queries) for part in prepared)
    if isinstance(prepared, torch.Tensor):
        return prepared.index_select(0, queries.to(prepared.device))
    if isinstance(prepared, np.ndarray):
        return np.ascontiguousarray(prepared[queries.cpu().numpy()])
    raise TypeError(f"cannot take query rows from a prepared {type(prepared).__name__}: give the scanner a take_queries method")


def candidate_count(k: int) -> int:
    """Rows kept per query from the reduced-precision scan before exact rescoring."""
    return 2 * k + 16


def scan_topk(
    codec: TurboQuantCodec,
    scanner: Scanner,
    rotated_queries: torch.Tensor,
    chunks: Iterable[Chunk],
    k: int,
    fetch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` rows per query over all chunks.

    Args:
        rotated_queries: float32 ``(m, W)`` from ``codec.rotate_queries``.
        chunks: the rows to scan, in any order.
        fetch: rows int64 ``(u,)`` -> their (packed, factors), for rescoring.

    Returns:
        scores float32 ``(m, k)`` best first (``-inf`` past the rows that qualified) and rows int64 ``(m, k)`` (``-1`` there).
    """
    m = rotated_queries.shape[0]
    wanted = candidate_count(k)
    running = RunningTopK(m, wanted, device=rotated_queries.device)
    queries = scanner.prepare(rotated_queries)
    for chunk in chunks:
        scores, local = scanner.chunk_topk(queries, chunk.packed, chunk.factors, chunk.valid, wanted)
        running.push(scores, local + chunk.start)
    return _rescore(codec, rotated_queries, running.rows, fetch, k)


def scan_groups_topk(
    codec: TurboQuantCodec,
    scanner: Scanner,
    rotated_queries: torch.Tensor,
    groups: Iterable[QueryChunk],
    k: int,
    fetch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    bias_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`scan_topk` where each chunk is scanned for some queries only, with a per-query bias.

    Args:
        groups: the chunks and the queries (and biases) each is scanned for, in any order; a query
            may meet the same rows in one group only.
        bias_of: candidate rows int64 ``(m, c)`` -> the bias of each, float32 ``(m, c)`` (the one
            its group added; ``-1`` rows are padding), for exact rescoring. None: no bias.

    Returns ``(scores, rows)`` as `scan_topk`, scores including the bias.
    """
    m = rotated_queries.shape[0]
    wanted = candidate_count(k)
    running = RunningTopK(m, wanted, device=rotated_queries.device)
    prepared = scanner.prepare(rotated_queries)
    for group in groups:
        chunk, bias = group.chunk, group.bias
        queries = take_queries(scanner, prepared, group.queries)
        per_row = bias is not None and bias.ndim == 2
        scores, local = scanner.chunk_topk(queries, chunk.packed, chunk.factors, chunk.valid, chunk.packed.shape[0] if per_row else wanted)
        if per_row:
            scores, at = (scores + bias.gather(1, local)).topk(min(wanted, scores.shape[1]), dim=1)
            local = local.gather(1, at)
        elif bias is not None:
            scores = scores + bias[:, None]
        running.push_at(group.queries, scores, local + chunk.start if group.rows is None else group.rows[local])
    bias = None if bias_of is None else bias_of(running.rows)
    return _rescore(codec, rotated_queries, running.rows, fetch, k, bias)


def _rescore(
    codec: TurboQuantCodec,
    rotated_queries: torch.Tensor,
    rows: torch.Tensor,
    fetch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    k: int,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float32 scores (plus ``bias`` ``(m, c)`` where given) of each query's candidate ``rows`` ``(m, c)``; best ``k`` kept."""
    m = rows.shape[0]
    unique, inverse = torch.unique(rows.clamp_min(0), return_inverse=True)
    packed, factors = fetch(unique)
    exact = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
    for start in range(0, m, _RESCORE_QUERY_BLOCK):
        block = slice(start, start + _RESCORE_QUERY_BLOCK)
        at = inverse[block]
        exact[block] = codec.score(rotated_queries[block, None, :], packed[at], factors[at])[:, 0]
    if bias is not None:
        exact += bias
    exact[rows < 0] = float("-inf")
    # best first; among equal scores the lower row first, so results are deterministic
    by_row = torch.argsort(rows.clamp_min(0), dim=1, stable=True)
    exact, rows = exact.gather(1, by_row), rows.gather(1, by_row)
    best = torch.argsort(exact, dim=1, descending=True, stable=True)[:, :k]
    scores, best_rows = exact.gather(1, best), rows.gather(1, best)
    best_rows[scores == float("-inf")] = -1
    return scores, best_rows
