"""Ids: user ids, removal (tombstones), allow-list filters, reconstruct."""

import numpy as np
import pytest

from conftest import unit_rows
from tqindex import TurboQuantIndex


@pytest.fixture
def index_with_ids():
    x = unit_rows(400, 32, seed=1)
    index = TurboQuantIndex(32, 4, chunk_rows=64)
    ids = np.arange(400, dtype=np.int64) * 7 + 1000
    index.add_with_ids(x, ids)
    return index, x, ids


def test_user_ids_round_trip(index_with_ids):
    index, x, ids = index_with_ids
    D, I = index.search(x[:20], 1)
    # a vector's best match is itself at 4 bits for these random unit vectors
    assert np.array_equal(I[:, 0], ids[:20])
    assert set(index.search(x[:5], 30)[1].ravel()) <= set(ids.tolist())


def test_add_after_add_with_ids_continues_past_the_largest_id(index_with_ids):
    index, _, ids = index_with_ids
    new = index.add(unit_rows(3, 32, seed=2))
    assert np.array_equal(new, np.arange(3) + ids.max() + 1)


def test_removed_ids_are_never_returned(index_with_ids):
    index, x, ids = index_with_ids
    removed = ids[::3]
    assert index.remove_ids(removed) == len(removed)
    assert index.ntotal == len(ids) - len(removed) == len(index)
    _, I = index.search(x[:50], 100)
    assert not np.isin(I, removed).any()
    # ... and the query's own vector, when it was removed, is not its best match any more
    assert I[0, 0] != ids[0]


def test_remove_unknown_or_already_removed_ids_raises_and_removes_nothing(index_with_ids):
    index, _, ids = index_with_ids
    with pytest.raises(KeyError, match="12345"):
        index.remove_ids([ids[0], 12345])
    assert index.ntotal == len(ids)
    index.remove_ids(ids[:2])
    with pytest.raises(KeyError):
        index.remove_ids(ids[1:3])
    assert index.ntotal == len(ids) - 2


def test_removed_id_can_be_added_again(index_with_ids):
    index, x, ids = index_with_ids
    index.remove_ids(ids[:1])
    index.add_with_ids(x[:1], ids[:1])
    assert index.search(x[0], 1)[1][0, 0] == ids[0]


def test_filter_returns_only_allowed_ids_and_pads(index_with_ids):
    index, x, ids = index_with_ids
    allowed = ids[[5, 50, 300]]
    D, I = index.search(x[:4], 10, filter=allowed)
    assert np.all(np.isin(I[:, :3], allowed))
    assert np.all(I[:, 3:] == -1) and np.all(np.isneginf(D[:, 3:]))
    assert np.all(np.isfinite(D[:, :3]))
    # the allowed ids come back in the order of their scores
    scores = index.codec.inner_products(x[:4], index.codec.encode(x[[5, 50, 300]]))
    assert np.array_equal(I[:, :3], allowed[np.argsort(-scores, axis=1, kind="stable")])


def test_filter_and_removal_together(index_with_ids):
    index, x, ids = index_with_ids
    index.remove_ids(ids[:10])
    _, I = index.search(x[:3], 15, filter=ids[:20])
    assert set(I[:, :10].ravel()) <= set(ids[10:20].tolist())
    assert np.all(I[:, 10:] == -1)


def test_filter_with_no_known_ids_gives_all_padding(index_with_ids):
    index, x, _ = index_with_ids
    D, I = index.search(x[:2], 4, filter=[1, 2, 3])
    assert np.all(I == -1) and np.all(np.isneginf(D))


def test_reconstruct_decodes_the_stored_codes(index_with_ids):
    index, x, ids = index_with_ids
    rebuilt = index.reconstruct(ids[:10])
    assert rebuilt.shape == (10, 32) and rebuilt.dtype == np.float32
    assert np.mean(np.sum((rebuilt - x[:10]) ** 2, axis=1)) < 0.03  # 4-bit unbiased-scale codes
    assert index.reconstruct(ids[3]).shape == (32,)
    with pytest.raises(KeyError, match="99"):
        index.reconstruct([99])


def test_duplicate_ids_are_refused_and_nothing_is_added(index_with_ids):
    index, x, ids = index_with_ids
    with pytest.raises(ValueError, match="already in the index"):
        index.add_with_ids(x[:2], [ids[0], 1])
    with pytest.raises(ValueError, match="duplicate ids"):
        index.add_with_ids(x[:2], [5, 5])
    with pytest.raises(ValueError, match="2 vectors but 3 ids"):
        index.add_with_ids(x[:2], [5, 6, 7])
    with pytest.raises(TypeError, match="integers"):
        index.add_with_ids(x[:2], [5.0, 6.0])
    assert index.ntotal == len(ids)
