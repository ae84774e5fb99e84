"""Trellis codes: a bitshift trellis over the rotated coordinates, searched by Viterbi (numba).

``TurboQuantCodec(quantizer="trellis")`` keeps the layout of the scalar codes (``k_j`` bits
per coordinate, ``packing.BitLayout``) but reads them differently: the codes of one vector,
taken in the *visiting order* ``visit`` and concatenated, form a cyclic bit stream of
``B = sum_j k_j`` bits, and coordinate ``visit[j]``'s value is ``table[w_j]``, where the window
``w_j`` is the ``L`` stream bits that start at coordinate ``visit[j]``'s own code (``L`` =
``WINDOW_BITS``). Consecutive windows overlap by ``L - k`` bits, so the codes form a path
through a trellis of ``2^L`` states; the encoder picks the path closest to the vector with the
Viterbi algorithm, tail-biting (the stream wraps around, so no bit is spent on a start state).
Each coordinate still decodes on its own, from its window: random access, no sequential decode.

This is the bitshift trellis of QTIP (Tseng et al., 2024) with a fixed table of Gaussian
quantiles in a seeded random order (no training: Lloyd updates of the table on Gaussian data
gained 1%). At 3.25-3.375 bits it cuts the mean squared error of a rotated unit vector by
36-50% against the Lloyd-Max scalar codes with code search (21-41% at 2 and 4 bits;
``benchmarks/bench_trellis.py``), for ~1000x the encode work: it suits codes written once and
read often, where memory counts more than encode time. The encoder also searches the vector's
scale (``SCALES``): the trellis's levels are fixed, and one of several gains fits each vector
better (the per-vector factor absorbs it).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

#: window bits ``L``: 2^L trellis states. 10 -> 12 cut the error by 8% at 3.25-3.375 bits, 12 -> 14
#: by a further ~3% for 4x the encode work (prototype measurements, docs/kv-cache.md "Trellis codes")
WINDOW_BITS = 12
#: scalings ``t`` of the unit vector tried per vector, and tail-biting starts tried per scaling:
#: (5, 3) has 27-38% lower error than (1, 1) at head_dim 64-32, 3.375-3.25 bits, for 10x the passes;
#: (5, 10) a further 6% for 2.3x the time
SCALES = np.linspace(0.85, 1.15, 5).astype(np.float32)
STARTS = 3
_TABLE_SEED_STREAM = 0x54524C  # "TRL": independent of the rotation's and the QJL matrix's streams
_BLOCK = 16  # rows per parallel task (they share the scratch arrays)
_FAR = np.float32(1e30)  # the cost of a barred start (finite: the kernels are compiled with fastmath)


def trellis_table(rotated_dim: int, seed: int, window_bits: int = WINDOW_BITS) -> np.ndarray:
    """The reconstruction table, float32 ``(2^L,)``: the ``2^L`` quantiles of N(0, 1/D) in a seeded random order.

    N(0, 1/D) is the law of a rotated unit vector's coordinates for large ``D``; the scale
    search absorbs the difference for small ``D``.
    """
    size = 1 << window_bits
    quantiles = torch.special.ndtri(torch.arange(0.5, size, dtype=torch.float64) / size).numpy() / np.sqrt(rotated_dim)
    order = np.random.default_rng([seed, _TABLE_SEED_STREAM]).permutation(size)
    return quantiles[order].astype(np.float32)


def visiting_order(bit_counts: np.ndarray) -> np.ndarray:
    """The trellis's order of the coordinates, int64 ``(D,)``: the extra-bit coordinates spread evenly.

    ``bit_counts`` int ``(D,)``, the layout's bits per coordinate (the first ones may have one
    more). Spreading them keeps every window's share of fresh bits even: 8% lower error at
    head_dim 64, 3.375 bits, than visiting them first.
    """
    dim = bit_counts.shape[0]
    high = np.flatnonzero(bit_counts > bit_counts.min())
    if high.size == 0 or high.size == dim:
        return np.arange(dim)
    slots = np.floor(np.arange(high.size) * dim / high.size).astype(np.int64)
    order = np.full(dim, -1, np.int64)
    order[slots] = high
    order[order < 0] = np.flatnonzero(bit_counts == bit_counts.min())
    return order


@njit(inline="always", fastmath=True)
def _viterbi(target, ks, table, window_bits, fixed, cost, best_tail, back, windows):  # pragma: no cover - compiled
    """Fill ``windows`` int64 ``(D,)`` with the trellis path closest to ``target`` float32 ``(D,)``
    (visiting order); return its squared error.

    ``fixed < 0``: any start; else tail-biting: the first window's top ``L - k_last`` bits are
    ``fixed`` and the last window's low ``L - k_last`` bits must equal them.
    """
    dim = target.shape[0]
    size = 1 << window_bits
    k_last = ks[dim - 1]
    for w in range(size):
        e = target[0] - table[w]
        cost[w] = e * e if fixed < 0 or (w >> k_last) == fixed else _FAR
    for j in range(dim - 1):
        k = ks[j]
        tails = size >> k
        step_back = back[j + 1]
        for t in range(tails):  # best predecessor (h << (L - k)) | t of each tail t
            best_tail[t] = cost[t]
            step_back[t] = 0
        for h in range(1, 1 << k):
            block = cost[h * tails : (h + 1) * tails]
            for t in range(tails):
                c = block[t]
                better = c < best_tail[t]
                best_tail[t] = c if better else best_tail[t]
                step_back[t] = h if better else step_back[t]
        value = target[j + 1]
        for w in range(size):
            e = value - table[w]
            cost[w] = e * e
        fan = 1 << k
        for t in range(tails):
            prior = best_tail[t]
            for i in range(t * fan, (t + 1) * fan):
                cost[i] += prior
    tail_mask = (1 << (window_bits - k_last)) - 1
    last, last_cost = 0, np.float32(np.inf)
    for w in range(size):
        if (fixed < 0 or (w & tail_mask) == fixed) and cost[w] < last_cost:
            last, last_cost = w, cost[w]
    windows[dim - 1] = last
    for j in range(dim - 1, 0, -1):
        k = ks[j - 1]
        t = windows[j] >> k
        windows[j - 1] = (np.int64(back[j, t]) << (window_bits - k)) | t
    return last_cost


@njit(inline="always")
def _cosine_key(units, r, visit, table, windows):  # pragma: no cover - compiled
    """``<u, c> |<u, c>| / |c|^2`` of the levels ``c = table[windows]``: the cosine's square, signed (float64)."""
    dot, norm2 = 0.0, 0.0
    for j in range(windows.shape[0]):
        level = np.float64(table[windows[j]])
        dot += level * units[r, visit[j]]
        norm2 += level * level
    return dot * abs(dot) / max(norm2, 1e-300)


@njit(parallel=True, cache=True, fastmath=True)
def trellis_encode(units, ks, visit, table, window_bits, scales, starts, indices, alignment, energy):  # pragma: no cover - compiled
    """Trellis codes of unit rows: ``units`` float32 ``(n, D)`` -> ``indices`` uint8 ``(n, D)`` (coordinate
    order), ``alignment`` ``<u, c>`` and ``energy`` ``|c|^2`` float32 ``(n,)`` of the decoded levels ``c``.

    Per row and scaling ``t`` in ``scales``: the free-start Viterbi pass over ``t u``; then, for
    each of the ``starts`` overlaps (the first window's top ``L - k_last`` bits) on which the
    cheapest free paths end, the tail-biting path with that overlap. Of these
    ``len(scales) * starts`` paths, the one whose levels have the largest cosine with ``u``.
    """
    rows, dim = units.shape
    size = 1 << window_bits
    k_last = ks[dim - 1]
    overlaps = 1 << (window_bits - k_last)
    for block in prange((rows + _BLOCK - 1) // _BLOCK):
        cost = np.empty(size, np.float32)
        best_tail = np.empty(size, np.float32)
        overlap_cost = np.empty(overlaps, np.float32)
        back = np.empty((dim, size >> 1), np.uint8)
        windows = np.empty(dim, np.int64)
        best_windows = np.empty(dim, np.int64)
        target = np.empty(dim, np.float32)
        for r in range(block * _BLOCK, min(rows, (block + 1) * _BLOCK)):
            best_key = -1e300
            for s in range(scales.shape[0]):
                for j in range(dim):
                    target[j] = scales[s] * units[r, visit[j]]
                _viterbi(target, ks, table, window_bits, -1, cost, best_tail, back, windows)
                overlap_cost[:] = _FAR
                for w in range(size):
                    o = w & (overlaps - 1)
                    overlap_cost[o] = min(overlap_cost[o], cost[w])
                for _ in range(starts):
                    fixed = np.argmin(overlap_cost)
                    overlap_cost[fixed] = _FAR
                    _viterbi(target, ks, table, window_bits, fixed, cost, best_tail, back, windows)
                    key = _cosine_key(units, r, visit, table, windows)
                    if key > best_key:
                        best_key = key
                        best_windows[:] = windows
            dot32, norm32 = np.float32(0.0), np.float32(0.0)
            for j in range(dim):
                level = table[best_windows[j]]
                dot32 += level * units[r, visit[j]]
                norm32 += level * level
                indices[r, visit[j]] = best_windows[j] >> (window_bits - ks[j])
            alignment[r] = dot32
            energy[r] = norm32


class TrellisDecoder:
    """Windows and levels of trellis codes, in torch (any device).

    Args:
        bit_counts: int ``(D,)``, bits of each coordinate's code (coordinate order).
        table: float32 ``(2^L,)`` (``trellis_table``).
    """

    def __init__(self, bit_counts: np.ndarray, table: np.ndarray, window_bits: int = WINDOW_BITS):
        self.window_bits = window_bits
        self.visit = visiting_order(bit_counts)
        self.ks = bit_counts[self.visit].astype(np.int64)
        if int(self.ks.sum()) < window_bits:
            raise ValueError(f"trellis codes need at least {window_bits} bits per vector, got {int(self.ks.sum())}")
        if int(self.ks.max()) >= window_bits:
            raise ValueError(f"trellis codes take fewer than {window_bits} bits per coordinate, got {int(self.ks.max())}")
        dim = self.ks.shape[0]
        # window j = the codes of visits j, j+1, ... (cyclic) until L bits: (visit, shift) terms
        terms = []
        for j in range(dim):
            taken, m, parts = 0, j, []
            while taken < window_bits:
                parts.append((m % dim, int(self.ks[m % dim])))
                taken += int(self.ks[m % dim])
                m += 1
            surplus, shift, row = taken - window_bits, 0, []
            for source, bits in reversed(parts):  # the last part's low bits fall off the window
                row.append((source, shift - surplus))
                shift += bits
            terms.append(row)
        width = max(len(row) for row in terms)
        self._sources = torch.tensor([[s for s, _ in row] + [0] * (width - len(row)) for row in terms], dtype=torch.int64)
        shifts = [[h for _, h in row] + [0] * (width - len(row)) for row in terms]
        used = [[1] * len(row) + [0] * (width - len(row)) for row in terms]
        self._shifts = torch.tensor(shifts, dtype=torch.int64)
        self._used = torch.tensor(used, dtype=torch.bool)
        self.table = torch.from_numpy(table)
        self._visit_t = torch.from_numpy(self.visit)
        self._devices: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def windows(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes in coordinate order, uint8 ``(n, D)`` -> each coordinate's window, int64 ``(n, D)`` (coordinate order)."""
        sources, shifts, used, visit, _ = self._on(indices.device)
        codes = indices.to(torch.int64)[:, visit]  # visiting order
        parts = codes[:, sources]  # (n, D, width)
        left = torch.where(shifts >= 0, parts << shifts.clamp_min(0), parts >> (-shifts).clamp_min(0))
        windows_visit = (left * used).sum(dim=2) & ((1 << self.window_bits) - 1)
        windows = torch.empty_like(windows_visit)
        windows[:, visit] = windows_visit
        return windows

    def levels(self, indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Codes uint8 ``(n, D)`` -> decoded levels ``table[window]``, ``dtype`` ``(n, D)``."""
        *_, table = self._on(indices.device)
        return table.to(dtype)[self.windows(indices)]

    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._devices:
            self._devices[device] = tuple(t.to(device) for t in (self._sources, self._shifts, self._used, self._visit_t, self.table))
        return self._devices[device]
