"""Pickling and copying: issue 15, item 2.

An on-disk index holds file descriptors and (writing) the directory's flock: a pickled or copied
one used to answer with whatever files later took those descriptor numbers, and closing a copy
closed the original's files and released its writer lock. Now it refuses (TypeError naming
``tqindex.open(path)``); an in-memory index, which holds only arrays, copies whole, and so does
the codec.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

import tqindex
from conftest import unit_rows
from tqindex import TurboQuantCodec, TurboQuantIndex
from tqindex.errors import IndexLockedError
from tqindex.kernels import fastscan
from tqindex.storage import ColumnStore

D = 16
X = unit_rows(80, D, seed=41)
Q = unit_rows(4, D, seed=42)
COPIES = {"pickle": lambda x: pickle.loads(pickle.dumps(x)), "copy": copy.copy, "deepcopy": copy.deepcopy}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("mode", ["a", "r"])
def test_an_open_on_disk_index_refuses_to_be_copied_and_keeps_its_lock(how, mode, tmp_path):
    with TurboQuantIndex(D, 2, path=tmp_path / "index") as index:
        index.add(X[:50])
    index = tqindex.open(tmp_path / "index", mode)
    before = index.search(Q, 5)
    with pytest.raises(TypeError, match=r"cannot be pickled or copied: open it again with tqindex.open\('.*index'\)"):
        COPIES[how](index)
    with pytest.raises(TypeError, match="open it again by its path"):
        COPIES[how](index._store)
    if mode == "a":
        with pytest.raises(IndexLockedError):  # the lock is still this writer's
            tqindex.open(tmp_path / "index", "a")
        index.add(X[50:60])
    np.testing.assert_array_equal(index.search(Q, 5)[1], before[1]) if mode == "r" else None
    index.close()
    tqindex.open(tmp_path / "index", "a").close()  # and free once it closes


def test_a_worker_gets_its_own_index_by_path_not_another_indexs_rows(tmp_path):
    """The issue's input: pickle index a, close it, open b, unpickle. Refused at the pickle."""
    for name, rows in (("a", X[:40]), ("b", X[40:80])):
        with TurboQuantIndex(D, 2, path=tmp_path / name) as index:
            index.add(rows)
    a = tqindex.open(tmp_path / "a")
    with pytest.raises(TypeError, match="in each worker"):
        pickle.dumps(a)
    a.close()
    with tqindex.open(tmp_path / "b") as b, tqindex.open(tmp_path / "a") as reopened:
        assert not np.array_equal(b.search(Q, 3)[0], reopened.search(Q, 3)[0])


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("backend", ["auto", "fastscan", "lut", "torch"])
def test_an_index_searched_before_it_is_copied_copies_whole(how, backend):
    """A search leaves caches on the index (the fast-scan's key columns hold the compiled
    scanner, which does not pickle): the copy is made without them and searches the same."""
    if backend == "fastscan" and not fastscan.available():
        pytest.skip("the compiled fast-scan is not built")
    index = TurboQuantIndex(D, 4, backend=backend)
    index.add(X)
    before = index.search(Q, 5)
    twin = COPIES[how](index)
    for a, b in zip(twin.search(Q, 5), before):
        np.testing.assert_array_equal(a, b)
    twin.add(X[:5])
    for a, b in zip(index.search(Q, 5), before):  # the original's caches are its own
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("how", list(COPIES))
def test_an_in_memory_index_copies_whole_and_independently(how):
    index = TurboQuantIndex(D, 3, metric="cosine")
    index.add_with_ids(X[:60], np.arange(1000, 1060))
    index.remove_ids([1003, 1007])
    twin = COPIES[how](index)
    for a, b in zip(twin.search(Q, 7), index.search(Q, 7)):
        np.testing.assert_array_equal(a, b)
    twin.add_with_ids(X[60:70], np.arange(2000, 2010))
    twin.remove_ids([1000])
    assert (twin.ntotal, index.ntotal) == (67, 58)
    index.add_with_ids(X[70:72], np.arange(3000, 3002))  # the original goes on by itself
    assert index.ntotal == 60 and 2000 not in index.search(X[60:70], 1)[1]
    # one row here, ten in the add: BLAS may round the rotation differently by shape (seen with MKL)
    np.testing.assert_allclose(twin.reconstruct(2005), twin.codec.decode(twin.codec.encode(X[65:66]))[0], rtol=1e-5, atol=1e-6)


def test_the_codec_pickles_without_its_device_cache():
    codec = TurboQuantCodec(D, 3, variant="prod")
    codec._on(codec.levels, torch.device("meta"))  # what a GPU search leaves behind: tensors keyed by id()
    assert codec.__dict__["_device_cache"]
    for how in COPIES.values():
        twin = how(codec)
        assert "_device_cache" not in twin.__dict__
        a, b = twin.encode(X), codec.encode(X)
        np.testing.assert_array_equal(a.packed, b.packed)
        np.testing.assert_array_equal(a.factors, b.factors)
        np.testing.assert_array_equal(twin.inner_products(Q, a), codec.inner_products(Q, b))


def test_a_store_refuses_pickling_even_when_closed(tmp_path):
    store = ColumnStore.create(tmp_path / "s", format_name="t", meta={}, fixed={}, columns={})
    store.close()
    with pytest.raises(TypeError, match="cannot be pickled or copied"):
        pickle.dumps(store)
