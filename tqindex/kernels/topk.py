"""A running top-k over chunks of scores: best ``k`` per query, merged chunk by chunk."""

from __future__ import annotations

import torch


class RunningTopK:
    """Keeps, per query, the ``k`` largest scores seen so far and their global row numbers.

    ``scores`` float32 ``(m, k)`` (``-inf`` where fewer than ``k`` rows qualified) and
    ``rows`` int64 ``(m, k)`` (``-1`` there), best first.
    """

    def __init__(self, m: int, k: int, device: torch.device | str = "cpu"):
        self.k = k
        self.scores = torch.full((m, k), float("-inf"), device=device)
        self.rows = torch.full((m, k), -1, dtype=torch.int64, device=device)

    def push(self, scores: torch.Tensor, rows: torch.Tensor) -> None:
        """Merge candidates: ``scores`` ``(m, c)`` and their global ``rows`` ``(m, c)`` or ``(c,)``."""
        self.scores, self.rows = self._merged(self.scores, self.rows, scores, rows)

    def push_at(self, queries: torch.Tensor, scores: torch.Tensor, rows: torch.Tensor) -> None:
        """`push` for some queries only: ``queries`` int64 ``(q,)`` (distinct positions in the
        batch), their candidates' ``scores`` ``(q, c)`` and global ``rows`` ``(q, c)`` or ``(c,)``."""
        self.scores[queries], self.rows[queries] = self._merged(self.scores[queries], self.rows[queries], scores, rows)

    def _merged(
        self, held_scores: torch.Tensor, held_rows: torch.Tensor, scores: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The best ``k`` of the ``held`` ones ``(q, k)`` and the candidates ``(q, c)``."""
        if rows.ndim == 1:
            rows = rows.expand(scores.shape[0], -1)
        keep = min(self.k, scores.shape[1])
        if keep < scores.shape[1]:
            scores, at = scores.topk(keep, dim=1)
            rows = rows.gather(1, at)
        merged_scores = torch.cat([held_scores, scores.to(torch.float32)], dim=1)
        merged_rows = torch.cat([held_rows, rows], dim=1)
        best, at = merged_scores.topk(self.k, dim=1)
        best_rows = merged_rows.gather(1, at)
        best_rows.masked_fill_(best == float("-inf"), -1)  # no boolean indexing: it waits for the device
        return best, best_rows
