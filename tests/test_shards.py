"""ShardedIndex on a local Ray cluster (started here, one per module: Ray starts slowly)."""

import os
import signal
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import tqindex  # noqa: E402
from tqindex import TurboQuantIndex, TurboQuantIVFIndex  # noqa: E402
from tqindex.ivf import train_centroids  # noqa: E402
from tqindex.shards import ShardedIndex, ShardUnavailableError, shard_of  # noqa: E402

DIM = 32
SHARD_CPUS = 0.5  # four shards on a two-CPU cluster


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((2000, DIM)).astype(np.float32), rng.standard_normal((8, DIM)).astype(np.float32)


def assert_same(a, b):
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-6)


def test_ids_spread_over_the_shards():
    counts = np.bincount(shard_of(np.arange(40_000), 4), minlength=4)
    assert counts.min() > 9_500  # sequential ids do not pile up in one shard
    assert np.array_equal(shard_of(np.array([7, 7]), 4), shard_of(np.array([7, 7]), 4))


def test_four_flat_shards_return_the_single_index_results(tmp_path, data):
    x, q = data
    single = TurboQuantIndex(DIM, 3)
    single.add(x)
    with ShardedIndex(tmp_path / "sharded", 4, DIM, 3, num_cpus=SHARD_CPUS) as sharded:
        assert np.array_equal(sharded.add(x[:1200]), np.arange(1200))
        sharded.add(x[1200:])
        assert sharded.ntotal == len(x) and sum(w["ntotal"] for w in sharded.workers()) == len(x)
        assert min(w["ntotal"] for w in sharded.workers()) > 400  # every shard holds rows
        assert_same(sharded.search(q, 10), single.search(q, 10))
        allowed = np.arange(0, len(x), 3)
        assert_same(sharded.search(q, 10, filter=allowed), single.search(q, 10, filter=allowed))
        gone = single.search(q, 3)[1].ravel()
        assert sharded.remove_ids(gone) == single.remove_ids(gone)
        assert_same(sharded.search(q, 10), single.search(q, 10))
        with pytest.raises(ValueError, match="already in the index"):
            sharded.add_with_ids(x[:2], [5, 6])
        with pytest.raises(KeyError, match="not in the index"):
            sharded.remove_ids([gone[0]])


def test_l2_shards_merge_the_smallest_distances(tmp_path, data):
    x, q = data
    single = TurboQuantIndex(DIM, 3, metric="l2")
    single.add(x)
    with ShardedIndex(tmp_path / "l2", 4, DIM, 3, metric="l2", num_cpus=SHARD_CPUS) as sharded:
        sharded.add(x)
        assert_same(sharded.search(q, 10), single.search(q, 10))
        D, I = sharded.search(q, 10, filter=[3, 5, 8])  # fewer rows than k: +inf / -1 padding, as one index
        assert_same((D, I), single.search(q, 10, filter=[3, 5, 8]))
        assert np.isposinf(D[:, 3:]).all() and (I[:, 3:] == -1).all()
    with tqindex.open(tmp_path / "l2", num_cpus=SHARD_CPUS) as reopened:  # the metric comes from the manifest
        assert_same(reopened.search(q, 10), single.search(q, 10))


def test_ivf_shards_share_one_set_of_centroids_and_match_one_ivf_index(tmp_path, data):
    x, q = data
    with ShardedIndex(tmp_path / "ivf", 2, DIM, 4, nlist=8, num_cpus=SHARD_CPUS) as sharded:
        with pytest.raises(ValueError, match="not trained"):
            sharded.add(x)
        sharded.train(x, progress=False)
        ids = np.arange(len(x)) * 3
        sharded.add_with_ids(x, ids)
        single = TurboQuantIVFIndex(DIM, 8, 4, centroids=train_centroids(x, 8, progress=False))
        single.add_with_ids(x, ids, progress=False)
        for nprobe in (2, 8):
            assert_same(sharded.search(q, 10, nprobe=nprobe), single.search(q, 10, nprobe=nprobe))


def test_a_killed_worker_is_reported_by_name_and_the_index_reopens_from_its_directory(tmp_path, data):
    x, q = data
    single = TurboQuantIndex(DIM, 3, metric="cosine")
    single.add(x)
    sharded = ShardedIndex(tmp_path / "sharded", 2, DIM, 3, metric="cosine", num_cpus=SHARD_CPUS)
    sharded.add(x)
    victim = sharded.workers()[1]
    os.kill(victim["pid"], signal.SIGKILL)
    time.sleep(0.5)
    with pytest.raises(ShardUnavailableError) as failure:
        sharded.search(q, 10)
    message = str(failure.value)
    assert "shard 1 " in message and victim["name"] in message and f"pid {victim['pid']}" in message
    assert victim["directory"] in message
    with tqindex.open(victim["directory"]) as alone:  # its committed rows are all there
        assert alone.ntotal == victim["ntotal"]
    sharded.reopen_shard(1)
    assert sharded.workers()[1]["pid"] != victim["pid"]
    assert_same(sharded.search(q, 10), single.search(q, 10))
    sharded.close()
    with tqindex.open(tmp_path / "sharded", "a", num_cpus=SHARD_CPUS) as reopened:
        assert isinstance(reopened, ShardedIndex) and reopened.ntotal == len(x)
        assert_same(reopened.search(q, 10), single.search(q, 10))
        assert np.array_equal(reopened.add(x[:2]), [len(x), len(x) + 1])
