import numpy as np
import pytest

from tqindex.codebook import expected_distortion, lloyd_max_codebook


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_codebook_is_sorted_antisymmetric_and_inside_support(bits):
    levels = lloyd_max_codebook(128, bits)
    assert levels.shape == (2**bits,)
    assert np.all(np.diff(levels) > 0)
    np.testing.assert_allclose(levels, -levels[::-1], atol=1e-15)
    assert np.all(np.abs(levels) < 1)


def test_one_bit_codebook_matches_closed_form():
    # for 1 bit the optimal levels are +-E|t|, and E|t| under f_d is known in closed form
    from math import gamma, pi, sqrt

    dim = 64
    mean_abs = gamma(dim / 2) / (sqrt(pi) * gamma((dim + 1) / 2))
    np.testing.assert_allclose(lloyd_max_codebook(dim, 1), [-mean_abs, mean_abs], rtol=1e-6)


def test_uniform_law_at_dim_three_gives_uniform_quantizer():
    # f_3 is uniform on [-1, 1]: Lloyd-Max is the uniform quantizer, distortion 4^-b / 3
    for bits in (1, 2, 3):
        levels = lloyd_max_codebook(3, bits)
        step = 2 / 2**bits
        np.testing.assert_allclose(levels, -1 + step * (np.arange(2**bits) + 0.5), atol=1e-6)
        np.testing.assert_allclose(expected_distortion(3, bits), step**2 / 12, rtol=1e-4)


@pytest.mark.parametrize("bits,paper", [(1, 0.36), (2, 0.117), (3, 0.03), (4, 0.009)])
def test_unit_vector_distortion_near_paper_values(bits, paper):
    assert abs(256 * expected_distortion(256, bits) - paper) / paper < 0.16


def test_codebook_is_cached_and_deterministic():
    a, b = lloyd_max_codebook(384, 3), lloyd_max_codebook(384, 3)
    assert a.tobytes() == b.tobytes()
    a[0] = 123.0  # callers get a copy: the cache cannot be corrupted
    assert lloyd_max_codebook(384, 3)[0] != 123.0


@pytest.mark.parametrize("dim,bits", [(1, 2), (128, 9), (128, -1), (128, 2.5)])
def test_codebook_refuses_bad_arguments(dim, bits):
    with pytest.raises(ValueError):
        lloyd_max_codebook(dim, bits)
