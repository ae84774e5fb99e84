"""Search memory does not grow with the number of queries: issue 15, item 4.

The index scans the queries in tiles of ``_SCORE_ELEMENTS // chunk_rows`` (at least one), so one
scan step holds at most that many scores whatever the batch; the results equal one untiled
search. benchmarks/search_memory.py measures the RSS this saves (docs/reliability.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tqindex
import tqindex.index as index_module
from conftest import unit_rows
from tqindex import TurboQuantIndex

pytestmark = pytest.mark.usefixtures("one_thread")
D = 24
X = unit_rows(900, D, seed=51)
Q = unit_rows(130, D, seed=52)


def recorded_tiles(monkeypatch) -> list[int]:
    """Queries per scan, recorded from every call of the index's scan."""
    tiles, scan = [], index_module.scan_topk

    def recording(codec, scanner, rotated, chunks, k, fetch, fetch_bias=None):
        tiles.append(rotated.shape[0])
        return scan(codec, scanner, rotated, chunks, k, fetch, fetch_bias)

    monkeypatch.setattr(index_module, "scan_topk", recording)
    return tiles


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_tiles_of_queries_give_the_results_of_one_search(where, tmp_path, monkeypatch):
    index = TurboQuantIndex(D, 3, chunk_rows=100, path=None if where == "memory" else tmp_path / "index")
    index.add_with_ids(X, np.arange(5000, 5900))
    index.remove_ids(np.arange(5000, 5900, 7))
    allowed = np.arange(5000, 5900, 3)
    tiles = recorded_tiles(monkeypatch)
    whole = [index.search(Q, 8), index.search(torch.from_numpy(Q), 8), index.search(Q, 8, filter=allowed)]
    assert tiles == [130, 130, 130]  # 2^25 scores over 100 rows: one tile
    monkeypatch.setitem(index_module._SCORE_ELEMENTS, "cpu", 100 * 16)  # 16 queries x 100 rows per step
    tiled = [index.search(Q, 8), index.search(torch.from_numpy(Q), 8), index.search(Q, 8, filter=allowed)]
    assert tiles[3:] == 3 * ([16] * 8 + [2])
    for (scores, ids), (want_scores, want_ids) in zip(tiled, whole):
        assert type(ids) is type(want_ids)
        np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))
        np.testing.assert_allclose(np.asarray(scores), np.asarray(want_scores), rtol=1e-6)  # GEMMs of other batch sizes
    index.close()


def test_a_tile_is_never_empty_and_no_queries_still_give_empty_results(monkeypatch):
    index = TurboQuantIndex(D, 2, chunk_rows=1 << 26)  # more rows per step than the score budget
    index.add(X[:50])
    tiles = recorded_tiles(monkeypatch)
    scores, ids = index.search(Q[:3], 4)
    assert tiles == [1, 1, 1] and scores.shape == ids.shape == (3, 4)
    scores, ids = index.search(Q[:0], 4)
    assert scores.shape == ids.shape == (0, 4)


def test_the_default_tile_is_4096_queries():
    index = tqindex.TurboQuantIndex(D, 2)
    assert index_module._SCORE_ELEMENTS["cpu"] // index._scan_step() == 4096
