"""Vectors and queries near the ends of the float32 range, under "cosine" and "ip".

Norms are taken after an exact power-of-two rescale, so a vector whose squared elements over- or
underflow float32 is encoded as exactly as one of ordinary size: scaling the input by 2^e scales
the stored norm (ip) by 2^e and leaves the codes, and under cosine everything, unchanged. Scores
that do not fit float32 are refused naming the query row (`test_bad_inputs.py` holds the refusals).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import unit_rows
from tqindex import TurboQuantCodec, TurboQuantIndex
from tqindex.datasets import exact_knn

D = 16
X = unit_rows(60, D, seed=21) * np.float32(3.0)
Q = unit_rows(5, D, seed=22)
SCALES = {"2^100": 2.0**100, "2^-100": 2.0**-100, "1e38": 1e38 / 3, "1e-37": 1e-37}


def exactly(x: np.ndarray, scale: float) -> np.ndarray:
    return (x.astype(np.float64) * scale).astype(np.float32)


@pytest.mark.parametrize("scale", list(SCALES.values()), ids=list(SCALES))
def test_codes_of_scaled_vectors_are_the_codes_of_the_vectors(scale):
    codec = TurboQuantCodec(D, 3)
    plain, scaled = codec.encode(X), codec.encode(exactly(X, scale))
    np.testing.assert_array_equal(scaled.packed, plain.packed)
    np.testing.assert_allclose(scaled.factors, plain.factors * scale, rtol=2e-6)  # exact for powers of two
    if scale in (2.0**100, 2.0**-100):
        np.testing.assert_array_equal(scaled.factors, (plain.factors * np.float64(scale)).astype(np.float32))


@pytest.mark.parametrize("scale", list(SCALES.values()), ids=list(SCALES))
def test_cosine_index_ignores_the_magnitude_of_vectors_and_queries(scale):
    plain, scaled = TurboQuantIndex(D, 3, metric="cosine"), TurboQuantIndex(D, 3, metric="cosine")
    plain.add(X)
    scaled.add(exactly(X, scale))
    for queries in (Q, exactly(Q, scale), exactly(Q, 1 / scale)):
        want, got = plain.search(Q, 5), scaled.search(queries, 5)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)


@pytest.mark.parametrize("scale", [2.0**100, 2.0**-100, 2.0**-140], ids=["2^100", "2^-100", "2^-140"])
def test_ip_scores_scale_with_vectors_and_queries_exactly(scale):
    index = TurboQuantIndex(D, 3)
    index.add(X)
    queries = exactly(Q, scale)  # 2^-140: subnormal elements, fewer bits than Q: compare with them scaled back
    want_scores, want_ids = index.search(exactly(queries, 1 / scale), 5)
    scores, ids = index.search(queries, 5)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores * scale, rtol=1e-5, atol=0)
    if scale >= 2.0**-100:
        big = TurboQuantIndex(D, 3)
        big.add(exactly(X, scale))
        want_scores, want_ids = index.search(Q, 5)
        scores, ids = big.search(Q, 5)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(scores, (want_scores * np.float64(scale)).astype(np.float32))


def test_ip_scores_near_the_top_of_float32_are_found():
    """Queries of norm ~1e38 against unit vectors: scores ~1e38, no overflow on the way."""
    index = TurboQuantIndex(D, 4)
    index.add(X / 3)
    want_scores, want_ids = index.search(Q, 5)
    scores, ids = index.search(Q * np.float32(1e38), 5)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores.astype(np.float64) * 1e38, rtol=1e-5)


def test_exact_knn_angular_ignores_the_magnitude():
    plain = exact_knn(X, Q, 5, "angular", progress=False)
    for x_scale, q_scale in ((1e38 / 3, 1e-30), (1e-30, 1e38 / 3)):  # squares over- and underflow float32
        scaled = exact_knn(exactly(X, x_scale), exactly(Q, q_scale), 5, "angular", progress=False)
        np.testing.assert_array_equal(scaled[1], plain[1])
        np.testing.assert_allclose(scaled[0], plain[0], atol=1e-5)


def test_the_device_rescale_equals_the_host_one_and_can_skip_its_read_back():
    """`power_of_two_scaled`'s torch branch (rows on a GPU; called here on CPU tensors): the numpy
    branch's exponents, and with ``synchronize=False`` no read back to the host, every row scaled
    (by 2^0 where ordinary), the same values."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from tqindex._arrays import _device_exponents, _host_exponents, times_power_of_two

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.reads = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("_local_scalar_dense", "is_nonzero", "nonzero"):
                self.reads.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    ordinary = torch.from_numpy(X[:4].copy())
    extreme = ordinary.clone()
    extreme[1] *= 2.0**100
    extreme[2] = 1e-40
    extreme[3] = 0.0
    assert _device_exponents(ordinary, synchronize=True) is None and _host_exponents(ordinary) is None
    assert torch.equal(_device_exponents(extreme, synchronize=True), _host_exponents(extreme))
    log = Reads()
    with log:
        lazy = [_device_exponents(rows, synchronize=False) for rows in (ordinary, extreme)]
    assert log.reads == []
    assert not lazy[0].any() and torch.equal(times_power_of_two(ordinary, -lazy[0]), ordinary)
    assert torch.equal(lazy[1], _host_exponents(extreme))
