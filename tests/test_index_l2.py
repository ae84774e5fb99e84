"""metric="l2": squared Euclidean distances in FAISS's METRIC_L2 convention, against brute force."""

import numpy as np
import pytest
import torch

from tqindex import TurboQuantCodec, TurboQuantIndex
from tqindex.datasets import make_synthetic, recall_at
from tqindex.errors import CorruptIndexError
from tqindex.kernels import fastscan
from tqindex.kernels.gemm import GemmScanner
from tqindex.kernels.lut import LutScanner, supports


def offset_rows(n: int, dim: int, seed: int) -> np.ndarray:
    """Un-normalised rows far from the origin, with norms that differ: the case where L2 and IP rank apart."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, dim)) * rng.uniform(0.5, 3, (n, 1)) + 2).astype(np.float32)


def brute_force_l2(index: TurboQuantIndex, x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The codec's own L2 estimate ||q||^2 + ||x||^2 - 2 <q, x_hat>, smallest first."""
    ip = index.codec.inner_products(q, index.codec.encode(x)).astype(np.float64)
    d = (q.astype(np.float64) ** 2).sum(1)[:, None] + (x.astype(np.float64) ** 2).sum(1)[None, :] - 2 * ip
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), order


def assert_same_ranking(D, I, D_ref, I_ref):
    """D equals the reference clamped at 0 (estimates can overshoot); ids follow the unclamped order."""
    np.testing.assert_allclose(D, np.maximum(D_ref, 0), rtol=1e-4, atol=1e-3)
    scale = np.abs(D_ref).max()
    gaps = np.abs(np.diff(D_ref, axis=1)) > 1e-5 * scale  # ids must agree where no neighbour ties
    untied = np.ones_like(I, dtype=bool)
    untied[:, :-1] &= gaps
    untied[:, 1:] &= gaps
    assert np.array_equal(I[untied], I_ref[untied])


WIDTHS = [(bits, variant) for variant in ("mse", "prod") for bits in (1, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8)]
# every width through the GEMM scan and the compiled fast-scan (where built), and each one the
# look-up-table scan covers through it too
SCANS = (
    [(b, v, "torch") for b, v in WIDTHS]
    + [(b, v, "lut") for b, v in WIDTHS if supports(TurboQuantCodec(40, b, variant=v).layout)]
    + [(b, v, "fastscan") for b, v in WIDTHS if fastscan.available()]
)


@pytest.mark.parametrize("bits,variant,backend", SCANS)
def test_search_equals_brute_force_l2_ranking_of_the_codec(bits, variant, backend):
    x, q = offset_rows(600, 40, seed=int(bits * 10)), offset_rows(6, 40, seed=99)
    index = TurboQuantIndex(40, bits, metric="l2", variant=variant, backend=backend, chunk_rows=128)
    index.add(x)
    D, I = index.search(q, 10)
    assert D.dtype == np.float32 and I.dtype == np.int64
    assert_same_ranking(D, I, *brute_force_l2(index, x, q, 10))


def test_faiss_result_convention_squared_distances_ascending():
    faiss = pytest.importorskip("faiss")
    x, q = offset_rows(3000, 64, seed=1), offset_rows(20, 64, seed=2)
    index = TurboQuantIndex(64, 8, metric="l2")
    index.add(x)
    D, I = index.search(q, 10)
    flat = faiss.IndexFlatL2(64)
    flat.add(x)
    D_true, I_true = flat.search(q, 10)
    assert np.all(np.diff(D, axis=1) >= 0)  # smallest first
    exact = ((q[:, None, :] - x[I]) ** 2).sum(axis=2)  # squared distances of the ids returned
    np.testing.assert_allclose(D, exact, rtol=0.02)
    np.testing.assert_allclose(D[:, 0], D_true[:, 0], rtol=0.02)
    assert recall_at(I_true, I, 10) >= 0.9


def test_l2_ranks_differently_from_inner_product():
    x, q = offset_rows(2000, 32, seed=3), offset_rows(10, 32, seed=4)
    truth = np.argsort(((q[:, None, :] - x[None]) ** 2).sum(axis=2), axis=1)[:, :10]
    recall = {}
    for metric in ("l2", "ip"):
        index = TurboQuantIndex(32, 4, metric=metric)
        index.add(x)
        recall[metric] = recall_at(truth, index.search(q, 10)[1], 10)
    assert recall["l2"] >= 0.7 > recall["ip"] + 0.3


@pytest.mark.parametrize("bits,threshold", [(2, 0.45), (4, 0.8)])
def test_recall_against_exact_l2_on_raw_anisotropic_data(bits, threshold):
    data = make_synthetic("anisotropic", 5000, 50, 64, metric="euclidean", normalize=False, k=10, seed=5, progress=False)
    index = TurboQuantIndex(64, bits, metric="l2")
    index.add(data.train)
    assert recall_at(data.neighbors, index.search(data.test, 10)[1], 10) >= threshold


def test_filter_deletions_and_padding_with_plus_inf():
    x, q = offset_rows(500, 16, seed=6), offset_rows(3, 16, seed=7)
    index = TurboQuantIndex(16, 4, metric="l2", chunk_rows=64)
    index.add(x)
    index.remove_ids([10, 11])
    D, I = index.search(q, 5, filter=[10, 11, 12, 13])  # two allowed ids were removed
    assert np.array_equal(I[:, 2:], np.full((3, 3), -1)) and np.all(np.isinf(D[:, 2:]) & (D[:, 2:] > 0))
    assert set(I[:, :2].ravel()) == {12, 13} and np.all(np.isfinite(D[:, :2]))
    full_D, full_I = index.search(q, 20)
    for row in range(3):  # the filtered distances are the unfiltered ones
        for col in range(2):
            hit = full_I[row] == I[row, col]
            if hit.any():
                np.testing.assert_allclose(full_D[row][hit][0], D[row, col], rtol=1e-6)


def test_persistence_resident_codes_and_reopen(tmp_path):
    x, q = offset_rows(900, 24, seed=8), offset_rows(4, 24, seed=9)
    in_ram = TurboQuantIndex(24, 3, metric="l2")
    in_ram.add(x[:700])
    expected = in_ram.search(q, 7)
    in_ram.save(tmp_path / "saved")
    with TurboQuantIndex.open(tmp_path / "saved", mode="a") as reopened:
        assert reopened.metric == "l2" and reopened.bytes_per_vector == in_ram.codec.bytes_per_vector + 4
        for got, want in zip(reopened.search(q, 7), expected):
            np.testing.assert_array_equal(got, want)
        reopened.add(x[700:])
    in_ram.add(x[700:])
    reader = TurboQuantIndex.open(tmp_path / "saved").to("cpu")  # norms resident with the codes
    for got, want in zip(reader.search(q, 7), in_ram.search(q, 7)):
        np.testing.assert_array_equal(got, want)
    assert reader.verify()["rows"] == 900


def test_open_refuses_an_l2_index_without_its_norms(tmp_path):
    import json

    with TurboQuantIndex(8, 4, metric="l2", path=tmp_path / "idx") as index:
        index.add(offset_rows(10, 8, seed=10))
    manifest_path = tmp_path / "idx" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["meta"]["metric"] = "ip"  # an "ip" index has no norms column: the columns no longer fit
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptIndexError):
        TurboQuantIndex.open(tmp_path / "idx")


def test_vectors_whose_squared_norm_overflows_are_refused():
    index = TurboQuantIndex(4, 4, metric="l2")
    good = np.ones((2, 4), dtype=np.float32)
    huge = np.full((1, 4), 3e19, dtype=np.float32)
    with pytest.raises(ValueError, match="x row 1: squared norm .* float32 range"):
        index.add(np.concatenate([good[:1], huge]))
    assert index.ntotal == 0
    index.add(good)
    with pytest.raises(ValueError, match="queries row 0: squared norm"):
        index.search(huge, 1)


def test_scanners_add_the_bias_before_selecting():
    """The kernels' bias: a large negative bias on the best rows drops them from the chunk's top-k."""
    index = TurboQuantIndex(32, 4)
    codes = index.codec.encode(torch.randn(200, 32, generator=torch.Generator().manual_seed(0)))
    rotated = index.codec.rotate_queries(torch.randn(2, 32, generator=torch.Generator().manual_seed(1)))
    plain = index.codec.score(rotated, codes.packed, codes.factors)
    bias = torch.linspace(-3, 3, 200)
    for scanner in (GemmScanner(index.codec, torch.float32), LutScanner(index.codec)):
        scores, rows = scanner.chunk_topk(scanner.prepare(rotated), codes.packed, codes.factors, None, 15, bias=bias)
        expected, expected_rows = (plain + bias).topk(15, dim=1)
        torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(rows, expected_rows)
