"""TurboQuantIVFIndex in RAM: training, probing, agreement with the flat index, filters, deletions, ids."""

import sys

import numpy as np
import pytest
import torch

from conftest import kmeans
from tqindex import TurboQuantIndex, TurboQuantIVFIndex
from tqindex.ivf import train_centroids
from tqindex.kernels import fastscan

DIM, NLIST = 32, 16


def clustered(n: int, seed: int) -> np.ndarray:
    """Rows around 16 random centres, float32 ``(n, DIM)``: lists of uneven sizes, as real data gives."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((16, DIM)).astype(np.float32) * 2
    return (centres[rng.integers(0, 16, n)] + rng.standard_normal((n, DIM)).astype(np.float32)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    x, q = clustered(3000, 0), clustered(12, 1)
    return x, q, kmeans(x, NLIST)


def ivf_index(centroids, x, **options) -> TurboQuantIVFIndex:
    index = TurboQuantIVFIndex(DIM, NLIST, 4, centroids=centroids, **options)
    index.add(x, progress=False)
    return index


def lists_of(index: TurboQuantIVFIndex, x: np.ndarray) -> np.ndarray:
    """Nearest centroid (L2) of each row."""
    return np.argmin(((x[:, None, :] - index.centroids[None]) ** 2).sum(axis=2), axis=1)


def test_probing_every_list_of_vector_codes_gives_the_flat_index_results(data):
    x, q, centroids = data
    ivf = ivf_index(centroids, x, by_residual=False)
    flat = TurboQuantIndex(DIM, 4)
    flat.add(x)
    for queries in (q, q[:1]):  # many queries (list by list) and one (its lists gathered)
        D, I = ivf.search(queries, 10, nprobe=NLIST)
        Df, If = flat.search(queries, 10)
        assert np.array_equal(I, If)
        np.testing.assert_allclose(D, Df, rtol=1e-6, atol=1e-6)


def test_probing_every_list_of_residual_codes_ranks_by_centroid_plus_residual_estimate(data):
    x, q, centroids = data
    ivf = ivf_index(centroids, x)
    lists = lists_of(ivf, x)
    estimate = q @ centroids[lists].T + ivf.codec.inner_products(q, ivf.codec.encode(x - centroids[lists]))
    D, I = ivf.search(q, 10, nprobe=NLIST)
    np.testing.assert_allclose(D, np.take_along_axis(estimate, I, axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(D, -np.sort(-estimate, axis=1)[:, :10], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("by_residual", [True, False])
def test_results_come_from_the_probed_lists_and_recall_grows_with_nprobe(data, by_residual):
    x, q, centroids = data
    ivf = ivf_index(centroids, x, by_residual=by_residual)
    lists = lists_of(ivf, x)
    true = np.argsort(-(q @ x.T), axis=1)[:, :10]
    recalls = []
    for nprobe in (1, 3, NLIST):
        _, I = ivf.search(q, 10, nprobe=nprobe)
        probed = np.argsort(-(q @ centroids.T), axis=1)[:, :nprobe]
        found = I >= 0
        assert all(np.isin(lists[I[i][found[i]]], probed[i]).all() for i in range(len(q)))
        recalls.append(np.mean([len(set(a) & set(b)) for a, b in zip(I, true)]) / 10)
    assert recalls[0] < recalls[1] <= recalls[2]
    assert recalls[2] > 0.7  # 4-bit codes of d=32: the flat index reaches ~0.8 here


def test_a_probed_list_with_fewer_than_k_rows_pads_the_results(data):
    x, _, centroids = data
    ivf = ivf_index(centroids, x[:40])  # ~2.5 rows per list
    D, I = ivf.search(x[:3], 20, nprobe=1)
    sizes = ivf.list_sizes()[np.argmax(x[:3] @ centroids.T, axis=1)]
    assert np.array_equal((I >= 0).sum(axis=1), sizes) and sizes.max() < 20
    assert np.all(np.isneginf(D[I == -1])) and np.all(np.isfinite(D[I >= 0]))


def test_nprobe_default_is_the_attribute_and_bad_values_are_refused(data):
    x, q, centroids = data
    ivf = ivf_index(centroids, x)
    ivf.nprobe = NLIST
    assert np.array_equal(ivf.search(q, 5)[1], ivf.search(q, 5, nprobe=NLIST)[1])
    assert np.array_equal(ivf.search(q, 5, nprobe=10 * NLIST)[1], ivf.search(q, 5, nprobe=NLIST)[1])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="nprobe must be a positive integer"):
            ivf.search(q, 5, nprobe=bad)


def test_filter_keeps_only_allowed_ids_and_matches_the_flat_index(data):
    x, q, centroids = data
    ivf = ivf_index(centroids, x, by_residual=False)
    flat = TurboQuantIndex(DIM, 4)
    flat.add(x)
    allowed = np.arange(0, len(x), 7)
    D, I = ivf.search(q, 10, nprobe=NLIST, filter=allowed)
    assert np.isin(I, allowed).all()
    assert np.array_equal(I, flat.search(q, 10, filter=allowed)[1])
    _, I = ivf.search(q, 10, nprobe=2, filter=[5])
    assert set(I.ravel().tolist()) <= {5, -1}


def test_removed_ids_are_never_returned_and_can_be_added_again(data):
    x, q, centroids = data
    ivf = ivf_index(centroids, x)
    _, before = ivf.search(q, 10, nprobe=NLIST)
    gone = np.unique(before[:, :3])
    assert ivf.remove_ids(gone) == len(gone)
    assert ivf.ntotal == len(x) - len(gone)
    _, after = ivf.search(q, 10, nprobe=NLIST)
    assert not np.isin(after, gone).any()
    assert ivf.list_sizes().sum() == ivf.ntotal
    with pytest.raises(KeyError, match="not in the index"):
        ivf.remove_ids(gone[:1])
    ivf.add_with_ids(x[gone], gone, progress=False)
    assert np.array_equal(ivf.search(q, 10, nprobe=NLIST)[1], before)


def test_add_with_ids_keeps_the_ids_and_refuses_taken_ones(data):
    x, q, centroids = data
    ivf = TurboQuantIVFIndex(DIM, NLIST, 4, centroids=centroids)
    ids = np.arange(len(x), dtype=np.int64) * 10 + 5
    ivf.add_with_ids(x, ids, progress=False)
    _, I = ivf.search(q, 10, nprobe=4)
    assert np.array_equal(I, ids[ivf_index(centroids, x).search(q, 10, nprobe=4)[1]])
    with pytest.raises(ValueError, match="already in the index"):
        ivf.add_with_ids(x[:2], ids[:2])
    assert np.array_equal(ivf.add(x[:2], progress=False), [ids.max() + 1, ids.max() + 2])


def test_reconstruct_adds_the_centroid_back(data):
    x, _, centroids = data
    for by_residual in (True, False):
        ivf = ivf_index(centroids, x, by_residual=by_residual)
        error = np.linalg.norm(ivf.reconstruct(np.arange(50)) - x[:50], axis=1) / np.linalg.norm(x[:50], axis=1)
        assert error.mean() < 0.15
        assert ivf.reconstruct(7).shape == (DIM,)


def test_cosine_metric_normalises_vectors_and_queries(data):
    pytest.importorskip("faiss")  # trains on the normalised vectors
    x, q, centroids = data
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cosine = TurboQuantIVFIndex(DIM, NLIST, 4, metric="cosine")
    cosine.train(x, progress=False)
    cosine.add(x, progress=False)
    ip = TurboQuantIVFIndex(DIM, NLIST, 4, centroids=cosine.centroids)
    ip.add(unit, progress=False)
    for a, b in zip(cosine.search(3 * q, 5, nprobe=4), ip.search(q / np.linalg.norm(q, axis=1, keepdims=True), 5, nprobe=4)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_torch_queries_give_torch_results(data):
    x, q, centroids = data
    ivf = ivf_index(centroids, x)
    D, I = ivf.search(torch.from_numpy(q), 3, nprobe=4)
    assert isinstance(D, torch.Tensor) and I.dtype == torch.int64
    assert np.array_equal(I.numpy(), ivf.search(q, 3, nprobe=4)[1])


def test_query_scale_changes_the_scores_not_the_ranking_and_overflow_is_refused(data):
    """As the flat index (tests/test_extreme_values.py): queries near the ends of the float32 range
    are rescaled by a power of two for the scan; scores that do not fit float32 are refused."""
    x, q, centroids = data
    ivf = ivf_index(centroids, x)
    D, I = ivf.search(q, 5, nprobe=4)
    for scale in (2.0**100, 2.0**-100):
        scaled = ivf.search(q * np.float32(scale), 5, nprobe=4)
        np.testing.assert_array_equal(scaled[1], I)
        np.testing.assert_allclose(scaled[0], D * np.float32(scale), rtol=1e-6)
    big = q.copy()
    big[2] *= np.float32(1e38) / np.abs(q[2]).max()  # fits float32; its inner products do not
    with pytest.raises(ValueError, match="queries row 2: its inner products overflow float32"):
        ivf.search(big, 5, nprobe=4)


def test_training_is_faiss_kmeans_run_one_iteration_at_a_time(data):
    faiss = pytest.importorskip("faiss")
    x = data[0]
    reference = faiss.Kmeans(DIM, NLIST, niter=10, seed=3, verbose=False)
    reference.train(x)
    assert np.array_equal(train_centroids(x, NLIST, niter=10, seed=3, progress=False), reference.centroids)
    index = TurboQuantIVFIndex(DIM, NLIST, 4, seed=3)
    with pytest.raises(ValueError, match="at least nlist=16 training vectors"):
        index.train(x[:10])
    index.train(x, progress=False)
    assert index.is_trained and np.array_equal(index.centroids, reference.centroids)
    with pytest.raises(ValueError, match="already trained"):
        index.train(x)


def test_an_untrained_index_refuses_use_and_bad_arguments_are_refused(data):
    x, q, centroids = data
    index = TurboQuantIVFIndex(DIM, NLIST, 4)
    assert not index.is_trained and index.ntotal == 0
    for use in (lambda: index.add(x), lambda: index.search(q, 1), lambda: index.remove_ids([0])):
        with pytest.raises(ValueError, match="not trained"):
            use()
    with pytest.raises(ValueError, match=r"centroids must have shape \(16, 32\)"):
        TurboQuantIVFIndex(DIM, NLIST, 4, centroids=centroids[:5])
    with pytest.raises(ValueError, match="nlist must be a positive integer"):
        TurboQuantIVFIndex(DIM, 0, 4)
    with pytest.raises(ValueError, match="metric must be one of"):
        TurboQuantIVFIndex(DIM, NLIST, 4, metric="l1")


def test_training_without_faiss_says_what_to_install(data, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match=r"tqindex\[ivf\]"):
        TurboQuantIVFIndex(DIM, NLIST, 4).train(data[0])


def test_chunks_smaller_than_a_list_give_the_same_results(data):
    x, q, centroids = data
    whole, chunked = ivf_index(centroids, x), ivf_index(centroids, x, chunk_rows=17)
    for a, b in zip(whole.search(q, 10, nprobe=5), chunked.search(q, 10, nprobe=5)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("by_residual", [True, False])
def test_list_major_and_query_major_scans_agree(data, by_residual):
    x, q, centroids = data
    ivf = ivf_index(centroids, x, by_residual=by_residual, chunk_rows=100)
    results = []
    for threshold in (0.0, float("inf")):  # every block list by list, then query by query
        ivf.list_major_queries = threshold
        results.append([ivf.search(q, 10, nprobe=4), ivf.search(q, 10, nprobe=4, filter=np.arange(0, len(x), 3))])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("by_residual", [True, False])
def test_every_cpu_backend_gives_the_same_results(data, by_residual):
    """The compiled fast-scan (the default where it is built), look-up tables and decode + GEMM,
    list by list and query by query, with removed rows and a filter."""
    x, q, centroids = data
    backends = ["torch", "lut", *(["fastscan"] if fastscan.available() else [])]
    results = {}
    for backend in backends:
        ivf = ivf_index(centroids, x, by_residual=by_residual, backend=backend, chunk_rows=150)
        ivf.remove_ids(np.arange(0, len(x), 5))
        for threshold in (0.0, float("inf")):
            ivf.list_major_queries = threshold
            for nprobe, allowed in ((3, None), (NLIST, None), (6, np.arange(0, len(x), 2))):
                results.setdefault((threshold, nprobe), []).append(ivf.search(q, 10, nprobe=nprobe, filter=allowed))
    for found in results.values():
        for D, I in found[1:]:
            np.testing.assert_array_equal(I, found[0][1])
            np.testing.assert_allclose(D, found[0][0], rtol=1e-5, atol=1e-5)


def test_no_queries_give_empty_results_and_a_filter_nobody_passes_gives_padding(data):
    x, q, centroids = data
    ivf = ivf_index(centroids, x)
    D, I = ivf.search(np.zeros((0, DIM), np.float32), 4, nprobe=2)
    assert D.shape == I.shape == (0, 4)
    D, I = ivf.search(q, 4, nprobe=2, filter=[len(x) + 10])
    assert np.all(I == -1) and np.all(np.isneginf(D))


def test_search_runs_ops_on_one_thread_and_restores_the_count(data, monkeypatch):
    x, q, centroids = data
    ivf = ivf_index(centroids, x)
    before = torch.get_num_threads()
    seen = []
    scan = ivf._search_block
    monkeypatch.setattr(ivf, "_search_block", lambda *a: seen.append((torch.get_num_threads(), a[-1])) or scan(*a))
    ivf.search(q, 3, nprobe=2)
    # torch's ops on one thread; the fast-scan over the lists gets the caller's count
    assert seen and set(seen) == {(1, before)} and torch.get_num_threads() == before

    def fail(*a):
        raise RuntimeError("scan failed")

    monkeypatch.setattr(ivf, "_search_block", fail)
    with pytest.raises(RuntimeError, match="scan failed"):
        ivf.search(q, 3, nprobe=2)
    assert torch.get_num_threads() == before


@pytest.mark.skipif(not fastscan.available(), reason="the compiled fast-scan is not built")
@pytest.mark.parametrize("by_residual", [True, False])
def test_fast_scan_over_lists_gives_the_same_results_in_one_pass_and_in_two(data, by_residual, monkeypatch):
    """Each query's nearest list in a pass of its own first (from `_TWO_PASSES_FROM` probes) or all
    probed lists at once: the same ids and scores, with removed rows and a filter."""
    import tqindex.ivf as ivf_module

    x, q, centroids = data
    ivf = ivf_index(centroids, x, by_residual=by_residual, backend="fastscan")
    ivf.remove_ids(np.arange(0, len(x), 7))
    found = {}
    for passes_from in (1, NLIST + 1):
        monkeypatch.setattr(ivf_module, "_TWO_PASSES_FROM", passes_from)
        cases = ((2, None), (5, np.arange(0, len(x), 2)), (NLIST, None))
        found[passes_from] = [ivf.search(q, 10, nprobe=nprobe, filter=allowed) for nprobe, allowed in cases]
    for (D, I), (D2, I2) in zip(found[1], found[NLIST + 1]):
        np.testing.assert_array_equal(I, I2)
        np.testing.assert_allclose(D, D2, rtol=1e-6, atol=1e-6)
