"""Bad input raises a clear error and leaves the index as it was."""

import numpy as np
import pytest
import torch

from conftest import unit_rows
from tqindex import TurboQuantIndex


@pytest.fixture
def index():
    index = TurboQuantIndex(16, 4)
    index.add(unit_rows(50, 16, seed=1))
    return index


def snapshot(index):
    return index.ntotal, index.search(unit_rows(3, 16, seed=2), 5)


def assert_unchanged(index, before):
    after = snapshot(index)
    assert after[0] == before[0]
    assert all(np.array_equal(a, b) for a, b in zip(after[1], before[1]))


@pytest.mark.parametrize(
    "bad,error,match",
    [
        (np.zeros((3, 15), np.float32), ValueError, "shape"),
        (np.full((2, 16), np.nan, np.float32), ValueError, "NaN"),
        (np.full((2, 16), -np.inf, np.float32), ValueError, "NaN"),
        (np.zeros((2, 16), np.int32), TypeError, "float"),
        (torch.zeros((2, 16), dtype=torch.complex64), TypeError, "float"),
        ("vectors", TypeError, "numpy array or a torch tensor"),
    ],
)
def test_bad_vectors_on_add_and_search(index, bad, error, match):
    before = snapshot(index)
    with pytest.raises(error, match=match):
        index.add(bad)
    with pytest.raises(error, match=match):
        index.search(bad, 1)
    assert_unchanged(index, before)


@pytest.mark.parametrize("k", [0, -1, 1.5, True, 51])
def test_bad_k(index, k):
    with pytest.raises(ValueError, match="k"):
        index.search(unit_rows(1, 16, seed=3), k)


def test_empty_index_search_is_refused():
    with pytest.raises(ValueError, match="empty"):
        TurboQuantIndex(16, 4).search(unit_rows(1, 16, seed=3), 1)


def test_index_with_every_row_removed_is_empty(index):
    index.remove_ids(np.arange(50))
    with pytest.raises(ValueError, match="empty"):
        index.search(unit_rows(1, 16, seed=3), 1)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="metric"):
        TurboQuantIndex(16, 4, metric="euclidean")
    with pytest.raises(ValueError, match="bits"):
        TurboQuantIndex(16, 0)
    with pytest.raises(ValueError, match="dim"):
        TurboQuantIndex(1, 4)
    with pytest.raises(ValueError, match="chunk_rows"):
        TurboQuantIndex(16, 4, chunk_rows=0)
    with pytest.raises(ValueError, match="backend"):
        TurboQuantIndex(16, 4, backend="cuda-magic")


def test_bad_filter(index):
    with pytest.raises(TypeError, match="filter"):
        index.search(unit_rows(1, 16, seed=3), 1, filter=np.array([1.5]))


def test_empty_add_is_a_no_op(index):
    before = snapshot(index)
    assert index.add(np.zeros((0, 16), np.float32)).shape == (0,)
    assert_unchanged(index, before)
