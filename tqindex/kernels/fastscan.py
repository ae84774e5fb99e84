"""The SIMD fast-scan (compiled C++, ``csrc/``): 4-bit look-up tables in registers, exact top-k.

As in FAISS's fast-scan and turbovec, a query's score of a row is a sum of entries of 16-entry
tables, one per 4-bit *key* of the row, quantized to 7 bits (0..127, so a key pair's entries add
in one byte) with one scale and bias per query, and looked up 32 (AVX2) or 64 (AVX-512) rows at a
time with byte shuffles. The keys are read from the stored packed rows themselves
(``packing.py``), a block of rows transposed in registers, so the on-disk path streams each row
once; an index in RAM also keeps them as *key columns* (``KeyColumns``), the rows pre-transposed,
for ``n_keys / 2`` more bytes a row: single queries 1-2x faster where the keys are the packed
nibbles, 4-7x where they are gathered (docs/format.md, docs/benchmarks.md).

Keys (``_index_keys``, ``_sign_keys``): coordinates of at most 4 bits are grouped into 4-bit keys
(4 coordinates at 1 bit, 2 at 2 bits, one at 3 or 4 bits, mixed for fractional widths); a
coordinate of 5-8 bits keys on its top 4 bits, the table holding the midpoint of the levels
those bits leave open; QJL sign bits of prod codes form keys of 4 signs. Each key costs one
shuffle per block of rows.

Exactness: a row's table sum is within a per-query margin of its float estimate (the
quantization error, and for 5-8 bits the open low bits). Rows whose upper bound cannot reach
the k-th best exact score so far are skipped; the others are rescored exactly (float64) in the
kernel. With ``z <= 0`` the margin is the worst case and the result is the codec's own top-k
over every row, provably; with ``z > 0`` (the default, ``DEFAULT_Z``) it is ``min(worst case,
z`` standard deviations of the error), which rescores several times fewer rows.

A scan may serve some of a search's queries only, each with a constant added to its scores, and
number its rows from an array (`FastScanner.search_groups`: an inverted file's lists, each
scanned for the queries that probe it; each query's tables are made once per search).
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterable

import numpy as np
import torch

from tqindex.codec import TurboQuantCodec
from tqindex.kernels.scan import Chunk, QueryChunk
from tqindex.packing import BitLayout

#: the pruning margin, in standard deviations of a row's table rounding error (<= 0: the worst
#: case). At 5, no query of 6,000 (100k x 384, clustered and anisotropic synthetic sets, 2/3/4 bits,
#: k = 10) returned other rows than with the worst case, which rescored 1.5-16x more rows
DEFAULT_Z = 5.0
#: rows per block of the key-column layout
BLOCK_ROWS = 32
_KEY_BITS = 4

_MODULE: ModuleType | None = None
_LOAD_ERROR: str | None = None
#: the process this module was imported in: the only one whose searches may use the OpenMP team
_IMPORTED_IN = os.getpid()


def _openmp_is_safe() -> bool:
    """True where the kernels' threads may be torch's OpenMP team (GNU OpenMP hangs in a child
    forked after the parent used it): in the process that imported this module, when that is no
    multiprocessing child (its parent may have run torch's threads before it imported tqindex),
    unless ``TQINDEX_OPENMP=0``. A process forked by ``os.fork`` from a parent that ran threaded
    torch products and never imported tqindex is not recognised: set ``TQINDEX_OPENMP=0`` there
    (torch's own threaded products hang in such a child as well)."""
    return (
        os.getpid() == _IMPORTED_IN
        and multiprocessing.parent_process() is None
        and os.environ.get("TQINDEX_OPENMP", "1") != "0"
    )


def _load() -> ModuleType | None:
    """The best compiled build this CPU runs, or None (and why, in ``_LOAD_ERROR``)."""
    global _MODULE, _LOAD_ERROR
    if _MODULE is not None or _LOAD_ERROR is not None:
        return _MODULE
    try:
        generic = importlib.import_module("tqindex.kernels._fastscan_generic")
    except ImportError as error:
        _LOAD_ERROR = f"the compiled fast-scan extension is not built ({error})"
        return None
    _MODULE = generic
    # the SIMD builds may use their instructions anywhere, import included: ask the CPU first
    for isa, feature in (("avx512", "avx512bw"), ("avx2", "avx2")):
        if generic.cpu_supports(feature):
            try:
                _MODULE = importlib.import_module(f"tqindex.kernels._fastscan_{isa}")
                break
            except ImportError:
                continue
    if _openmp_is_safe():
        _MODULE.set_openmp_pid(os.getpid())
    return _MODULE


def available() -> bool:
    """True when the compiled extension is importable (any instruction set)."""
    return _load() is not None


def isa() -> str | None:
    """The instruction set of the build in use: "avx512", "avx2", "generic", or None without one."""
    module = _load()
    return None if module is None else module.isa


def warn_if_missing() -> None:
    """One warning, naming the reason, when searches fall back to the slower numba/torch kernels."""
    if _load() is None:
        warnings.warn(
            f"tqindex: {_LOAD_ERROR}; CPU searches use the numba/torch kernels, several times slower. "
            "Reinstall with a C++17 compiler (g++ or clang) and the Python headers to build it.",
            RuntimeWarning,
            stacklevel=3,
        )


def top_k_rows(scores: torch.Tensor, k: int, threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of each row of ``scores`` float32 ``(m, n)`` on the CPU: values
    float32 ``(m, k)`` best first and their columns int64 ``(m, k)`` (an inverted file's nprobe
    nearest lists). With the extension: one pass a row on ``threads`` (None:
    ``torch.get_num_threads()``), ties to the lower column, 1.5-2.4x faster than ``torch.topk`` for
    k = 8-64 of 1,024 (2 threads); without it, ``torch.topk``. ValueError for k outside 1..n."""
    module = _load()
    if module is None or scores.device.type != "cpu":
        if not 1 <= k <= scores.shape[1]:
            raise ValueError(f"k must be in 1..{scores.shape[1]}, got {k}")
        return scores.topk(k, dim=1)
    values, columns = module.top_k_rows(
        np.ascontiguousarray(scores.detach().numpy(), dtype=np.float32), int(k), torch.get_num_threads() if threads is None else threads
    )
    return torch.from_numpy(values), torch.from_numpy(columns)


@dataclass
class _Key:
    """One 4-bit key: the (byte, bit in byte, bit in key) of its bits and the levels per key value."""

    bits: list[tuple[int, int, int]]
    coords: list[int]  # query columns
    values: np.ndarray  # float64 (16, len(coords))
    errmax: np.ndarray  # float64 (len(coords),): keys of > 4 bits leave some levels open
    errvar: np.ndarray

    @property
    def parts(self) -> list[tuple[int, int, int, int]]:
        """Bits merged into (column, rshift, lshift, key mask): one shift-and-mask per byte and offset."""
        merged: dict[tuple[int, int], int] = {}
        for byte, bit, key_bit in self.bits:
            merged[(byte, bit - key_bit)] = merged.get((byte, bit - key_bit), 0) | (1 << key_bit)
        return [(byte, max(shift, 0), max(-shift, 0), mask) for (byte, shift), mask in sorted(merged.items())]

    @property
    def nibble(self) -> int | None:
        """2 c + h when the key is (part of) nibble h of byte c and nothing else, else None."""
        parts = self.parts
        if len(parts) != 1 or parts[0][1] not in (0, 4) or parts[0][2] or parts[0][3] & ~0xF:
            return None
        return 2 * parts[0][0] + parts[0][1] // 4


_EMPTY = _Key([], [], np.zeros((1 << _KEY_BITS, 0)), np.zeros(0), np.zeros(0))


def _bit_homes(layout: BitLayout) -> list[list[tuple[int, int]]]:
    """For each coordinate, the (byte, bit) of each of its index bits, lowest first."""
    homes: list[list[tuple[int, int, int]]] = [[] for _ in range(layout.dim)]
    for field in layout.index_fields:
        for j in range(field.stop):
            byte = field.offset + j // field.per_byte
            for k in range(field.width):
                homes[j].append((field.shift + k, byte, (j % field.per_byte) * field.width + k))
    return [[(byte, bit) for _, byte, bit in sorted(h)] for h in homes]


def _index_keys(codec: TurboQuantCodec) -> list[_Key]:
    """Keys of the code indices, coordinates in order (module docstring)."""
    layout, levels = codec.layout, codec.levels.numpy().astype(np.float64)
    offsets, homes = codec.level_offsets.numpy(), _bit_homes(layout)
    values_of = np.arange(1 << _KEY_BITS)
    keys, j = [], 0
    while j < layout.dim:
        width = len(homes[j])
        if width > _KEY_BITS:  # its top 4 bits; the table holds the midpoint of the levels left open
            low = width - _KEY_BITS
            cells = levels[offsets[j] + np.arange(1 << width)].reshape(1 << _KEY_BITS, 1 << low)
            mid = (cells.max(axis=1) + cells.min(axis=1)) / 2
            error = cells - mid[:, None]
            bits = [(byte, bit, k) for k, (byte, bit) in enumerate(homes[j][low:])]
            keys.append(_Key(bits, [j], mid[:, None], np.abs(error).max(keepdims=True)[0], (error**2).mean(keepdims=True)[0]))
            j += 1
            continue
        coords, position, bits = [], 0, []
        while j < layout.dim and len(coords) < 4 and position + len(homes[j]) <= _KEY_BITS:
            coords.append(j)
            bits += [(byte, bit, position + k) for k, (byte, bit) in enumerate(homes[j])]
            position += len(homes[j])
            j += 1
        values, position = np.zeros((1 << _KEY_BITS, len(coords))), 0
        for slot, c in enumerate(coords):
            values[:, slot] = levels[offsets[c] + ((values_of >> position) & ((1 << len(homes[c])) - 1))]
            position += len(homes[c])
        keys.append(_Key(bits, coords, values, np.zeros(len(coords)), np.zeros(len(coords))))
    return keys


def _sign_keys(layout: BitLayout) -> list[_Key]:
    """Keys of 4 QJL sign bits each (prod codes); their query columns are the second half."""
    sign, v = layout.sign_field, np.arange(1 << _KEY_BITS)
    if sign is None:
        return []
    keys = []
    for first in range(0, layout.dim, _KEY_BITS):
        coords = list(range(first, min(first + _KEY_BITS, layout.dim)))
        bits = [(sign.offset + c // 8, c % 8, slot) for slot, c in enumerate(coords)]
        values = np.stack([np.where((v >> slot) & 1, 1.0, -1.0) for slot in range(len(coords))], axis=1)
        keys.append(_Key(bits, [layout.dim + c for c in coords], values, np.zeros(len(coords)), np.zeros(len(coords))))
    return keys


def _as_direct(index: list[_Key], signs: list[_Key], index_bytes: int) -> tuple[list[_Key], int] | None:
    """Keys laid out as key 2c + h = nibble h of byte c (empty keys fill the gaps), or None if some key is not a nibble."""
    keys = index + signs
    nibbles = [key.nibble for key in keys]
    if any(n is None for n in nibbles) or nibbles != sorted(nibbles) or (index and nibbles[len(index) - 1] >= 2 * index_bytes):
        return None
    slots = [_EMPTY] * (2 * (max(nibbles) // 2 + 1) if keys else 0)
    for key, nibble in zip(keys, nibbles):
        slots[nibble] = key
    if len(slots) > len(keys) + 2:  # more than a padding nibble per segment: extracting keys costs less
        return None
    return slots, 2 * index_bytes if signs else len(slots)


def _even(keys: list[_Key]) -> list[_Key]:
    """``keys`` and an empty key if their count is odd: key columns hold two keys per byte."""
    return keys + [_EMPTY] * (len(keys) % 2)


def _pack_plan(keys: list[_Key]) -> dict[str, np.ndarray]:
    """The keys as the arrays ``make_plan`` takes."""
    count = len(keys)
    out = {
        "parts": np.zeros((0, 4), np.int32),
        "part_start": np.zeros(count + 1, np.int32),
        "coord": np.full((count, 4), -1, np.int32),
        "values": np.zeros((count, 16, 4), np.float32),
        "reachable": np.zeros((count, 16), np.uint8),
        "errmax": np.zeros((count, 4), np.float32),
        "errvar": np.zeros((count, 4), np.float32),
    }
    parts = []
    for g, key in enumerate(keys):
        parts += key.parts
        out["part_start"][g + 1] = len(parts)
        width = len(key.coords)
        out["coord"][g, :width] = key.coords
        out["values"][g, :, :width] = key.values
        out["reachable"][g, : 1 << len(key.bits)] = 1
        out["errmax"][g, :width] = key.errmax
        out["errvar"][g, :width] = key.errvar
    out["parts"] = np.array(parts, np.int32).reshape(-1, 4)
    return out


def supports(codec: TurboQuantCodec) -> bool:
    """True when the extension is built and the codec's codes are scalar (every width and variant)."""
    return available() and codec.trellis is None


class FastScanner:
    """Search over packed rows with the compiled fast-scan; the index's exact top-k, rescored in the kernel.

    ``z``: the pruning margin (module docstring): ``0`` for the worst case, which makes the result
    the codec's own top-k over every row; ``DEFAULT_Z`` standard deviations otherwise. Threads:
    ``torch.get_num_threads()`` at each search.
    """

    #: rows per chunk the scanner asks for: one kernel call per this many rows (a copy of this
    #: many rows is all an on-disk search holds)
    rows_per_call = 1 << 16

    def __init__(self, codec: TurboQuantCodec, z: float = DEFAULT_Z):
        module = _load()
        if module is None:
            raise RuntimeError(_LOAD_ERROR)
        if codec.trellis is not None:
            raise ValueError("the fast-scan reads scalar codes; trellis codes have no per-coordinate levels")
        self.codec, self.z, self._module = codec, float(z), module
        layout = codec.layout
        index, signs = _even(_index_keys(codec)), _even(_sign_keys(layout))
        index_bytes = sum(f.nbytes for f in layout.index_fields)
        direct = _as_direct(index, signs, index_bytes)
        keys, index_keys = direct if direct is not None else (index + signs, len(index))
        arrays = _pack_plan(keys)
        fields = np.array([[f.offset, f.width, f.stop, f.shift] for f in layout.index_fields], np.int32).reshape(-1, 4)
        sign = layout.sign_field
        sign_row = np.array([sign.offset, sign.width, sign.stop, sign.shift] if sign else [-1, 1, 0, 0], np.int32)
        self._plan_args = (
            layout.dim, codec.code_bytes, codec.n_factors, index_keys, direct is not None,
            arrays["parts"], arrays["part_start"], arrays["coord"], arrays["values"], arrays["reachable"],
            arrays["errmax"], arrays["errvar"], fields, sign_row, codec.levels.numpy(),
            codec.level_offsets.numpy().astype(np.int32),
        )  # fmt: skip
        self._plan = module.make_plan(*self._plan_args)
        #: keys per row (table look-ups per row and query), how many score code indices (the rest
        #: QJL signs), and whether they are the nibbles of the packed bytes as they stand
        self.n_keys, self.index_keys, self.direct = len(keys), index_keys, direct is not None

    def begin(self, rotated_queries: torch.Tensor, k: int, threads: int | None = None):
        """A search over rotated float32 queries ``(m, W)``: call ``scan`` per chunk, then ``result``.
        The queries' tables are built on ``threads`` (None: ``torch.get_num_threads()``)."""
        queries = np.ascontiguousarray(rotated_queries.detach().cpu().numpy(), dtype=np.float32)
        return self._module.Search(self._plan, queries, int(k), self.z, torch.get_num_threads() if threads is None else threads)

    def key_columns(self, packed: np.ndarray) -> np.ndarray:
        """The keys of packed rows ``(n, code_bytes)`` in the layout the kernel scans fastest:
        uint8 ``(ceil(n / 32), n_keys / 2, 32)``, blocks of 32 rows, byte ``r`` of column ``c``
        holding keys ``2c`` (low nibble) and ``2c + 1`` of row ``r``.

        Kept beside the packed rows of an index in RAM (``Chunk.key_columns``), they spare the
        scan the transposition (and, for regrouped layouts, the gather of each key's bits) for
        ``n_keys / 2`` more bytes a row.
        """
        return self._module.key_columns(self._plan, np.ascontiguousarray(packed, dtype=np.uint8), torch.get_num_threads())

    def search(self, rotated_queries: torch.Tensor, chunks: Iterable[Chunk], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-``k``: scores float32 ``(m, k)`` best first, rows int64 ``(m, k)``; ``-inf`` / ``-1`` past the valid rows."""
        search = self.begin(rotated_queries, k)
        for chunk in chunks:
            _scan(search, chunk)
        return _result(search)

    def search_groups(self, rotated_queries: torch.Tensor, groups: Iterable[QueryChunk], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`search` where each chunk is scanned for some queries only, with their biases added
        (`scan_groups_topk`): each query's tables are made once, and its top-k so far prunes
        every later group it is in."""
        search = self.begin(rotated_queries, k)
        for group in groups:
            _scan(search, group.chunk, group.rows, group.queries, group.bias)
        return _result(search)


    def search_lists(
        self,
        rotated_queries: torch.Tensor,
        packed: np.ndarray,
        factors: np.ndarray,
        key_columns: np.ndarray | None,
        starts: np.ndarray,
        stops: np.ndarray,
        offsets: np.ndarray,
        queries: np.ndarray,
        query_bias: np.ndarray | None,
        k: int,
        valid: np.ndarray | None = None,
        threads: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`search_groups` in one kernel call: group ``g`` is rows ``[starts[g], stops[g])`` of
        ``packed`` uint8 ``(n, code_bytes)`` / ``factors`` float32 ``(n, F)``, scanned for the
        queries ``queries[offsets[g]:offsets[g + 1]]`` (int64 positions, distinct within a group),
        each scoring the group's rows ``query_bias`` (float32, one per entry of ``queries``, or None)
        higher; ``valid`` bool ``(n,)`` or None. With ``key_columns`` (of all ``n`` rows) every start
        is a multiple of ``BLOCK_ROWS``. Whole groups go to the ``threads`` (None:
        ``torch.get_num_threads()``), so small groups (an inverted file's lists) scan in parallel.
        Returns scores float32 ``(m, k)`` and row positions int64 ``(m, k)`` (``-1`` past the rows
        that qualified). ValueError for groups outside the rows, unaligned starts, or a query twice
        in a group. `scan_lists` does the same in passes on one search.
        """
        search = self.begin(rotated_queries, k, threads)
        self.scan_lists(search, packed, factors, key_columns, starts, stops, offsets, queries, query_bias, valid, threads)
        return _result(search)

    def scan_lists(
        self,
        search: Any,
        packed: np.ndarray,
        factors: np.ndarray,
        key_columns: np.ndarray | None,
        starts: np.ndarray,
        stops: np.ndarray,
        offsets: np.ndarray,
        queries: np.ndarray,
        query_bias: np.ndarray | None,
        valid: np.ndarray | None = None,
        threads: int | None = None,
    ) -> None:
        """One pass of `search_lists` on a search from `begin` (``finish`` it for the results): a
        query's best scores so far prune its rows in later passes, so a first pass over each
        query's most promising group leaves few rows to rescore in the rest."""
        mask = None if valid is None else np.ascontiguousarray(valid).view(np.uint8)
        bias = None if query_bias is None else np.ascontiguousarray(query_bias, dtype=np.float32)
        search.scan_groups(
            packed, factors, mask, key_columns, *(np.ascontiguousarray(a, dtype=np.int64) for a in (starts, stops, offsets, queries)),
            bias, torch.get_num_threads() if threads is None else threads,
        )  # fmt: skip

    @staticmethod
    def finish(search: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """A search's results (`search_lists`)."""
        return _result(search)


class KeyColumns:
    """The key columns (``FastScanner.key_columns``) of a growing array of packed rows.

    ``update`` brings them up to the rows given, recomputing only the last partial block and the
    rows after it; ``rows(start, stop)`` is the view a ``Chunk`` carries (``start`` a multiple of 32).
    """

    def __init__(self, scanner: FastScanner):
        self.scanner = scanner
        self._data = np.zeros((0, scanner.n_keys // 2, BLOCK_ROWS), np.uint8)  # capacity grows by doubling
        self.count = 0  # rows covered

    @property
    def nbytes(self) -> int:
        return int(self._data.nbytes)

    def update(self, packed: np.ndarray) -> None:
        """Cover all of ``packed`` ``(n, code_bytes)``, whose first ``count`` rows are unchanged."""
        n = len(packed)
        if n < self.count:
            self.count = 0
        first = self.count // BLOCK_ROWS
        if n == self.count:
            return
        new = self.scanner.key_columns(packed[first * BLOCK_ROWS :])
        needed = first + len(new)
        if needed > len(self._data):
            grown = np.zeros((max(needed, 2 * len(self._data)), *self._data.shape[1:]), np.uint8)
            grown[:first] = self._data[:first]
            self._data = grown
        self._data[first:needed] = new
        self.count = n

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Blocks of rows ``[start, stop)``: uint8 ``(ceil((stop - start) / 32), n_keys / 2, 32)``."""
        if start % BLOCK_ROWS or stop > self.count:
            raise ValueError(f"key columns cover rows [0, {self.count}) in blocks of {BLOCK_ROWS}; asked for [{start}, {stop})")
        return self._data[start // BLOCK_ROWS : -(-stop // BLOCK_ROWS)]


def _scan(
    search: Any,
    chunk: Chunk,
    rows: torch.Tensor | None = None,
    queries: torch.Tensor | None = None,
    query_bias: torch.Tensor | None = None,
) -> None:
    """One kernel call of ``search`` (``FastScanner.begin``) over ``chunk``, on ``torch.get_num_threads()``
    threads: for the queries at positions ``queries`` (None: all), each scoring every row ``query_bias`` higher;
    the rows numbered ``rows`` (None: from ``chunk.start``)."""
    valid = None if chunk.valid is None else chunk.valid.cpu().numpy().view(np.uint8)
    optional = [None if a is None else _as_numpy(a) for a in (chunk.bias, rows, queries, query_bias)]
    search.scan(_as_numpy(chunk.packed), _as_numpy(chunk.factors), valid, chunk.start, torch.get_num_threads(), chunk.key_columns, *optional)


def _result(search: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A finished search's results as tensors: scores float32 ``(m, k)``, rows int64 ``(m, k)``."""
    scores, rows = search.result()
    return torch.from_numpy(scores), torch.from_numpy(rows)


def _as_numpy(values: torch.Tensor | np.ndarray) -> np.ndarray:
    return values if isinstance(values, np.ndarray) else values.numpy()
