"""Exhaustive top-k search over chunks of packed codes, with exact rescoring of candidates.

A scanner (CPU or Triton) picks ``candidates`` rows per query from each chunk in reduced
precision; the running top-k keeps the best across chunks; the survivors are rescored with the
codec's float32 estimator and the best ``k`` returned. The ranking is therefore the codec's
own (``TurboQuantCodec.inner_products``), ties aside, at the speed of the reduced-precision scan.
Kernels know nothing of ids or files: rows are positions, chunks come from the caller.

A per-row ``bias`` (float32, one value per stored row, the same for every query) turns the
score into ``<q, x_hat> + bias``, in the scan and in the rescoring alike; kernels stay
metric-agnostic. The index uses it for L2: ``bias = -||x||^2 / 2`` ranks rows by
``<q, x> - ||x||^2 / 2 = (||q||^2 - ||q - x||^2) / 2``.

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
from tqindex.kernels.gemm import GemmScanner
from tqindex.kernels.topk import RunningTopK

_RESCORE_QUERY_BLOCK = 256
_EXACT_CHUNK_ROWS = 1 << 16  # rows per step of exact_topk (it decodes them to float32)


@dataclass(frozen=True)
class Chunk:
    """Rows ``[start, start + n)``: packed uint8 ``(n, B)``, factors float32 ``(n, F)``, optional bool
    ``valid`` ``(n,)`` and optional float32 ``bias`` ``(n,)`` added to every query's score of the row.

    ``key_columns``: optional, the fast-scan's layout of the same rows (``FastScanner.key_columns``),
    where the caller keeps one; ``start`` is then a multiple of 32. Other scanners ignore it.
    """

    start: int
    packed: torch.Tensor
    factors: torch.Tensor
    valid: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    key_columns: np.ndarray | None = None


@dataclass(frozen=True)
class QueryChunk:
    """A `Chunk` scanned for the queries ``queries`` only (int64 ``(q,)``, distinct positions in the batch).

    ``bias``: float32 ``(q,)``, one per query, added to its scores of every row of the chunk (on
    top of the chunk's per-row ``bias``); None: 0. ``rows``: int64 ``(n,)`` the global row of each
    chunk row, for chunks gathered from scattered rows; None: ``chunk.start + position``.
    """

    queries: torch.Tensor
    chunk: Chunk
    bias: torch.Tensor | None = None
    rows: torch.Tensor | None = None


class Scanner(Protocol):
    """``prepare`` once per search, ``chunk_topk`` per chunk: the best ``k`` rows per query of
    ``score + bias`` (bias float32 ``(n,)`` or None, added before the selection; -inf where not
    ``valid``): scores float32 ``(m, <=k)`` and chunk-local rows int64, best first. A scanner that
    also has ``candidates`` (``TritonScanner``) scans resident rows in one call (``search_resident``);
    one with ``search`` and ``search_groups`` (``FastScanner``) keeps its own exact top-k over the
    chunks (``scan_topk``) or groups (``scan_groups_topk``)."""

    def prepare(self, rotated_queries: torch.Tensor) -> torch.Tensor: ...
    def chunk_topk(
        self,
        queries: torch.Tensor,
        packed: torch.Tensor,
        factors: torch.Tensor,
        valid: torch.Tensor | None,
        k: int,
        bias: torch.Tensor | None = None,
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
    fetch_bias: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` rows per query over all chunks.

    Args:
        rotated_queries: float32 ``(m, W)`` from ``codec.rotate_queries``.
        chunks: the rows to scan, in any order; with ``fetch_bias``, each carries its ``bias``.
        fetch: rows int64 ``(u,)`` -> their (packed, factors), for rescoring.
        fetch_bias: rows int64 ``(u,)`` -> their float32 bias ``(u,)``; None: no bias.

    Returns:
        scores float32 ``(m, k)`` best first (``-inf`` past the rows that qualified) and rows int64 ``(m, k)`` (``-1`` there).
    """
    search = getattr(scanner, "search", None)
    if search is not None:  # the scanner keeps its own exact top-k (the compiled fast-scan)
        return search(rotated_queries, chunks, k)
    m = rotated_queries.shape[0]
    wanted = candidate_count(k)
    running = RunningTopK(m, wanted, device=rotated_queries.device)
    queries = scanner.prepare(rotated_queries)
    for chunk in chunks:
        scores, local = scanner.chunk_topk(queries, chunk.packed, chunk.factors, chunk.valid, wanted, bias=chunk.bias)
        running.push(scores, local + chunk.start)
    return _rescore(codec, rotated_queries, running.rows, fetch, fetch_bias, k)


def search_resident(
    codec: TurboQuantCodec,
    scanner: Any,
    rotated_queries: torch.Tensor,
    packed: torch.Tensor,
    factors: torch.Tensor,
    valid: torch.Tensor | None,
    k: int,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``scan_topk`` over rows resident on one device, for a scanner with ``candidates``: one kernel
    over all rows, the merge and the exact rescoring on the device, and one synchronisation at the
    end: one transfer brings the results to the host with the flags that tell whether any query
    needs the exact rescan and whether the queries overflowed the scanner's precision. Same
    arguments as ``scan_topk``, and its results on the CPU; ``valid`` bool ``(n,)`` or None,
    ``bias`` float32 ``(n,)`` or None.
    """
    scores, found, flags = resident_candidates(codec, scanner, rotated_queries, packed, factors, valid, k, bias)
    return finish_resident(codec, scanner, rotated_queries, packed, factors, valid, k, bias, *to_host(scores, found, flags))


def to_host(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` (contiguous or not, any dtypes) on the CPU, from a device in one transfer: one
    synchronisation instead of one each. CPU tensors come back as they are."""
    if all(t.device.type == "cpu" for t in tensors):
        return tensors
    return _one_buffer(tensors)


def _one_buffer(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """`to_host`'s copy: the tensors' bytes concatenated on their device, copied, and viewed apart."""
    order = sorted(range(len(tensors)), key=lambda i: -tensors[i].element_size())  # each part starts aligned for its dtype
    parts = [tensors[i].contiguous().reshape(-1).view(torch.uint8) for i in order]
    host = torch.cat(parts).cpu()
    out: list[torch.Tensor] = [host] * len(tensors)
    start = 0
    for i, part in zip(order, parts):
        out[i] = host[start : start + part.numel()].view(tensors[i].dtype).view(tensors[i].shape)
        start += part.numel()
    return tuple(out)


def resident_candidates(
    codec: TurboQuantCodec,
    scanner: Any,
    rotated_queries: torch.Tensor,
    packed: torch.Tensor,
    factors: torch.Tensor,
    valid: torch.Tensor | None,
    k: int,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The device part of `search_resident`, with no synchronisation (so a CUDA graph can hold it):
    rescored ``(scores, rows)`` and ``flags`` bool ``(m + 1,)``: the queries whose candidates may
    miss a row (they need `finish_resident`'s exact rescan), then whether the queries were finite
    in the scanner's precision."""
    queries = scanner.cast(rotated_queries)
    finite = scanner.finite(queries)
    count = candidate_count(k)
    bounds, rows, overflow = scanner.candidates(queries, packed, factors, valid, count, bias)
    rescore = getattr(scanner, "rescore", None)  # a scanner's own kernel for it (the Triton scan's), else torch
    if rescore is not None:
        scores, found = rescore(rotated_queries, rows, packed, factors, bias, k)
    else:
        scores, found = rescore_resident(codec, rotated_queries, rows, packed, factors, bias, k)
    if getattr(scanner, "bounds", False):  # candidates by upper bounds: a row left out is below the last
        overflow = overflow | below_bounds(bounds, count, scores, k)
    return scores, found, torch.cat([overflow, finite[None]])


def below_bounds(bounds: torch.Tensor, count: int, scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool ``(m,)``: queries where a row outside the candidates might beat the ``k``-th best.

    ``bounds`` float32 ``(m, c)``: the candidates' upper bounds, best first, ``c <= count`` (fewer:
    every row that could qualify was kept); ``scores`` float32 ``(m, >= 1)``: the rescored best, best first.
    """
    if bounds.shape[1] < count or scores.shape[1] == 0:
        return torch.zeros(bounds.shape[0], dtype=torch.bool, device=bounds.device)
    return scores[:, min(k, scores.shape[1]) - 1] < bounds[:, -1]


def finish_resident(
    codec: TurboQuantCodec,
    scanner: Any,
    rotated_queries: torch.Tensor,
    packed: torch.Tensor,
    factors: torch.Tensor,
    valid: torch.Tensor | None,
    k: int,
    bias: torch.Tensor | None,
    scores: torch.Tensor,
    found: torch.Tensor,
    flags: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The host part of `search_resident`: ``flags`` (on the CPU) checked, the flagged queries
    rescanned exactly (rare); ``scores`` and ``found`` (on the CPU) updated in place and returned."""
    if not bool(flags[-1]):
        raise scanner.overflow_error()
    redo = flags[:-1].nonzero().flatten()
    if redo.numel():
        at = redo.to(packed.device)
        _, exact_rows = exact_topk(codec, rotated_queries[at], packed, factors, valid, candidate_count(k), bias)
        exact = rescore_resident(codec, rotated_queries[at], exact_rows, packed, factors, bias, k)
        scores[redo], found[redo] = to_host(*exact)
    return scores, found


def rescore_resident(
    codec: TurboQuantCodec,
    rotated_queries: torch.Tensor,
    rows: torch.Tensor,
    packed: torch.Tensor,
    factors: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact scores (+ ``bias``) of each query's candidate ``rows`` int64 ``(m, c)`` (``-1``: none) of
    resident columns, the best ``k`` kept: float32 scores and rows ``(m, k)``, best first (``(-inf,
    -1)`` past the candidates), no synchronisation."""
    fetch_bias = None if bias is None else lambda at: bias[at]
    return padded(*_rescore(codec, rotated_queries, rows, lambda at: (packed[at], factors[at]), fetch_bias, k, dedupe=False), k)


def padded(scores: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Results ``(m, c)``, ``c <= k``, padded to ``(m, k)`` with ``(-inf, -1)``."""
    missing = k - scores.shape[1]
    if missing <= 0:
        return scores, rows
    pad = (0, missing)
    return torch.nn.functional.pad(scores, pad, value=float("-inf")), torch.nn.functional.pad(rows, pad, value=-1)


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
        bias_of: candidate rows int64 ``(m, c)`` -> the bias of each, float32 ``(m, c)`` (what its
            group and chunk added; ``-1`` rows are padding), for exact rescoring. None: no bias.

    Returns ``(scores, rows)`` as `scan_topk`, scores including the bias.
    """
    search_groups = getattr(scanner, "search_groups", None)
    if search_groups is not None:  # the scanner keeps its own exact top-k (the compiled fast-scan)
        return search_groups(rotated_queries, groups, k)
    m = rotated_queries.shape[0]
    wanted = candidate_count(k)
    running = RunningTopK(m, wanted, device=rotated_queries.device)
    prepared = scanner.prepare(rotated_queries)
    for group in groups:
        chunk = group.chunk
        queries = take_queries(scanner, prepared, group.queries)
        scores, local = scanner.chunk_topk(queries, chunk.packed, chunk.factors, chunk.valid, wanted, bias=chunk.bias)
        if group.bias is not None:
            scores = scores + group.bias[:, None]
        running.push_at(group.queries, scores, local + chunk.start if group.rows is None else group.rows[local])
    bias = None if bias_of is None else bias_of(running.rows)
    return _rescore(codec, rotated_queries, running.rows, fetch, None, k, bias)


def _rescore(
    codec: TurboQuantCodec,
    rotated_queries: torch.Tensor,
    rows: torch.Tensor,
    fetch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    fetch_bias: Callable[[torch.Tensor], torch.Tensor] | None,
    k: int,
    bias: torch.Tensor | None = None,
    dedupe: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float32 scores (plus bias) of each query's candidate ``rows`` ``(m, c)``; best ``k`` kept.

    ``fetch_bias``: rows int64 ``(u,)`` -> their per-row bias float32 ``(u,)``; ``bias``: float32
    ``(m, c)``, one per query and candidate; either or both may be None. ``dedupe``: fetch each
    distinct row once (``torch.unique``, which waits for the device); without it every
    (query, candidate) is fetched, with no synchronisation.
    """
    m = rows.shape[0]
    if dedupe:
        unique, inverse = torch.unique(rows.clamp_min(0), return_inverse=True)
    else:
        unique, inverse = rows.clamp_min(0).flatten(), torch.arange(rows.numel(), device=rows.device).view(rows.shape)
    packed, factors = fetch(unique)
    row_bias = None if fetch_bias is None else fetch_bias(unique).to(rows.device)
    exact = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
    for start in range(0, m, _RESCORE_QUERY_BLOCK):
        block = slice(start, start + _RESCORE_QUERY_BLOCK)
        at = inverse[block]
        exact[block] = codec.score(rotated_queries[block, None, :], packed[at], factors[at])[:, 0]
        if row_bias is not None:
            exact[block] += row_bias[at]
    if bias is not None:
        exact += bias
    exact.masked_fill_(rows < 0, float("-inf"))  # not exact[mask] = ...: that waits for the device
    # best first; among equal scores the lower row first, so results are deterministic
    by_row = torch.argsort(rows.clamp_min(0), dim=1, stable=True)
    exact, rows = exact.gather(1, by_row), rows.gather(1, by_row)
    best = torch.argsort(exact, dim=1, descending=True, stable=True)[:, :k]
    scores, best_rows = exact.gather(1, best), rows.gather(1, best)
    best_rows.masked_fill_(scores == float("-inf"), -1)
    return scores, best_rows


def exact_topk(
    codec: TurboQuantCodec,
    queries: torch.Tensor,
    packed: torch.Tensor,
    factors: torch.Tensor,
    valid: torch.Tensor | None,
    k: int,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` rows per query by full float32 scores (+ ``bias``; decode + GEMM, ``_EXACT_CHUNK_ROWS`` at a time).

    The fallback for queries whose buckets overflowed: queries float32 ``(m, W)`` -> scores float32
    ``(m, k)`` best first and rows int64 ``(m, k)``, ``(-inf, -1)`` past the valid rows.
    """
    scanner = GemmScanner(codec, dtype=torch.float32)
    running = RunningTopK(queries.shape[0], k, device=queries.device)
    for start in range(0, packed.shape[0], _EXACT_CHUNK_ROWS):
        stop = start + _EXACT_CHUNK_ROWS
        chunk_valid = None if valid is None else valid[start:stop]
        chunk_bias = None if bias is None else bias[start:stop]
        scores, rows = scanner.chunk_topk(queries, packed[start:stop], factors[start:stop], chunk_valid, k, bias=chunk_bias)
        running.push(scores, rows + start)
    return running.scores, running.rows
