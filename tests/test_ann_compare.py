"""benchmarks/ann_compare.py end to end on a tiny dataset, its recall measures, and bench_search's CLI."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")
pytest.importorskip("matplotlib")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import ann_compare  # noqa: E402
import bench_search  # noqa: E402
from competitors import METHODS  # noqa: E402

from tqindex.datasets import Dataset, make_synthetic, write_hdf5  # noqa: E402

BITS = (2, 4)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def restore_threads(monkeypatch):
    """The benchmarks set thread counts process-wide: put them back afterwards."""
    import faiss

    monkeypatch.setenv("RAYON_NUM_THREADS", os.environ.get("RAYON_NUM_THREADS", "1"))
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


@pytest.fixture(scope="module")
def tiny_hdf5(tmp_path_factory) -> Path:
    data = make_synthetic("anisotropic", 300, 20, 32, metric="ip", progress=False)
    path = tmp_path_factory.mktemp("data") / "tiny-dot.hdf5"
    return write_hdf5(path, data.train, data.test, distance="dot", neighbors=data.neighbors, distances=data.distances, progress=False)


def test_ann_compare_end_to_end(tiny_hdf5, tmp_path, restore_threads):
    out = tmp_path / "out"
    argv = ["--dataset", str(tiny_hdf5), "--bits", *map(str, BITS), "--out", str(out), "--seeds", "0", "1"]
    ann_compare.main(argv + ["--k-curve", "50", "--threads", "1", "--repeats", "1", "--no-single", "--no-progress"])

    for name in ("results.json", "results.md", "recall_vs_bytes.png", "recall_vs_qps.png", "recall1_at_k.png"):
        assert (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC

    output = json.loads((out / "results.json").read_text())
    assert output["dataset"]["n"] == 300 and output["config"]["k_curve"] == 50
    ran = {(r["method"], r["bits"]) for r in output["results"]}
    skipped = {(s["method"], s["bits"]) for s in output["skipped"]}
    assert ran | skipped == {(m, float(b)) for m in METHODS for b in BITS}
    assert {m for m, _ in ran} >= {"tqindex", "tqindex-norm", "tqindex-prod", "faiss-tqmse", "faiss-rabitq", "faiss-pq-fs"}

    markdown = (out / "results.md").read_text()
    for r in output["results"]:
        assert f"| {r['method']} | {r['bits']:g} |" in markdown
        assert r["bytes_per_vector"] > 0 and r["params"]
        assert len(r["runs"]) == (2 if r["seeded"] else 1)
        summary = r["summary"]
        for key in ("recall_at_k", "recall_1_at_k", "annb_knn_recall"):
            stats = summary[key]
            assert 0 <= stats["min"] <= stats["mean"] <= stats["max"] <= 1 and stats["std"] >= 0
        curve = np.array(summary["recall_1_curve"])
        assert len(curve) == 50 and np.all(np.diff(curve) >= 0) and curve[-1] <= 1
        assert summary["batched_qps"] > 0 and summary["build_s"] >= 0 and summary["single_qps"] is None
    default = {r["bits"]: r for r in output["results"] if r["method"] == "tqindex"}
    assert default[4]["summary"]["recall_at_k"]["mean"] > default[2]["summary"]["recall_at_k"]["mean"] > 0.4
    assert default[4]["bytes_per_vector"] == 32 * 4 / 8 + 4


def test_ann_compare_ivf_sweep(tiny_hdf5, tmp_path, restore_threads):
    out = tmp_path / "ivf"
    methods = ["tqindex-ivf", "tqindex-ivf-vec", "faiss-ivf-rabitq"]  # FAISS's PQ trains slowly: left to the benchmark
    argv = ["--dataset", str(tiny_hdf5), "--bits", "4", "--out", str(out), "--nlist", "4", "--nprobe", "1", "4", "--ivf-methods", *methods]
    output = ann_compare.main(argv + ["--rounds", "2", "--ivf-single", "3", "--flat-reference", "--threads", "1", "--no-progress"])
    for name in ("ivf_results.json", "ivf_results.md", "ivf_recall_vs_qps.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "ivf_recall_vs_qps.png").read_bytes()[:8] == PNG_MAGIC
    records = {(r["method"], r["nprobe"]): r for r in output["results"]}
    assert set(records) == {(m, p) for m in methods for p in (1, 4)} | {("tqindex-flat", None)}
    for r in output["results"]:
        assert len(r["batched"]["times_s"]) == (1 if r["method"] == "tqindex-flat" else 2) and r["batched"]["qps"] > 0
        assert (r["single_qps"] is None) == (r["method"] == "tqindex-flat")
    flat = [r for r in output["results"] if r["method"] == "tqindex-flat"]
    assert len(flat) == 2 and flat[0]["recall_at_k"] == flat[1]["recall_at_k"]
    # every list probed: vector codes give the flat index's results, residual codes at least as good here
    assert records[("tqindex-ivf-vec", 4)]["recall_at_k"] == flat[0]["recall_at_k"]
    assert records[("tqindex-ivf", 1)]["recall_at_k"] < records[("tqindex-ivf", 4)]["recall_at_k"]
    speedups = {s["method"]: s for s in output["speedups"]}
    assert set(speedups) == set(methods) and speedups["tqindex-ivf"]["flat_qps"] > 0
    assert "| tqindex-ivf | 4 | 20.0 | 4 |" in (out / "ivf_results.md").read_text()


def test_bench_search_cli(tiny_hdf5, tmp_path, restore_threads):
    argv = ["--dataset", str(tiny_hdf5), "--bits", "3", "--methods", "tqindex", "faiss-rabitq", "faiss-tqmse"]
    argv += ["--out", str(tmp_path), "--threads", "1", "--repeats", "1", "--single-max-queries", "5", "--no-progress"]
    output = bench_search.main(argv)
    assert [r["method"] for r in output["results"]] == ["tqindex", "faiss-rabitq", "faiss-tqmse"]
    for r in output["results"]:
        assert 0 < r["recall_at_k"] <= 1 and r["single"]["queries"] == 5 and r["batched"]["qps"] > 0
    assert "| faiss-rabitq | 3 |" in (tmp_path / "results.md").read_text()


def test_raw_norm_data_skips_faiss_tqmse(tmp_path, restore_threads):
    data = make_synthetic("gaussian", 200, 10, 16, metric="ip", normalize=False, progress=False)
    path = write_hdf5(
        tmp_path / "raw.hdf5", data.train, data.test, distance="dot", neighbors=data.neighbors, distances=data.distances, progress=False
    )
    argv = ["--dataset", str(path), "--bits", "2", "--methods", "faiss-tqmse", "tqindex", "--out", str(tmp_path / "o")]
    output = bench_search.main(argv + ["--threads", "1", "--repeats", "1", "--no-single", "--no-progress"])
    assert [s["method"] for s in output["skipped"]] == ["faiss-tqmse"]
    assert "unit vectors" in output["skipped"][0]["skipped"]
    assert [r["method"] for r in output["results"]] == ["tqindex"]


def _dataset(train: np.ndarray, test: np.ndarray, neighbors: np.ndarray, distances: np.ndarray, distance: str) -> Dataset:
    return Dataset("hand", train.astype(np.float32), test.astype(np.float32), neighbors, distances.astype(np.float32), distance)


def test_annb_knn_recall_counts_ties_by_distance():
    # Two train rows equally close to the query: either one is a correct nearest neighbour.
    train = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    test = np.array([[2.0, 0.0]])
    data = _dataset(train, test, np.array([[0, 1, 2, 3]]), np.array([[0.0, 0.0, 1.0, 2.0]]), "angular")
    assert ann_compare.annb_knn_recall(data, np.array([[1, 0]]), 2) == 1.0
    assert ann_compare.annb_knn_recall(data, np.array([[1]]), 1) == 1.0  # id 0 is "true" but 1 ties
    assert ann_compare.annb_knn_recall(data, np.array([[0, 2]]), 2) == 0.5
    dot = _dataset(train, test, np.array([[0, 1, 2, 3]]), np.array([[2.0, 2.0, 0.0, -2.0]]), "dot")
    assert ann_compare.annb_knn_recall(dot, np.array([[3, 1]]), 2) == 0.5
    # euclidean: L2 distances (not squared) from the raw vectors: rows 0 and 1 are at 1, row 2 at sqrt(5)
    euclidean = _dataset(train, test, np.array([[0, 1, 2, 3]]), np.array([[1.0, 1.0, 5**0.5, 3.0]]), "euclidean")
    assert ann_compare.annb_knn_recall(euclidean, np.array([[1, 0]]), 2) == 1.0
    assert ann_compare.annb_knn_recall(euclidean, np.array([[2, 3]]), 2) == 0.0
    assert ann_compare.annb_knn_recall(euclidean, np.array([[1, 2]]), 2) == 0.5


def test_recall_1_curve_and_pareto_frontier():
    neighbors = np.array([[5, 0], [7, 0], [9, 0]])
    found = np.array([[5, 1, 2], [1, 7, 2], [1, 2, 3]])
    np.testing.assert_allclose(ann_compare.recall_1_curve(neighbors, found), [1 / 3, 2 / 3, 2 / 3])
    points = [(0.9, 100.0), (0.8, 50.0), (0.7, 300.0), (0.95, 10.0)]
    assert ann_compare.pareto_frontier(points) == [(0.7, 300.0), (0.9, 100.0), (0.95, 10.0)]
