import math

import numpy as np
import pytest
import torch

from conftest import unit_rows
from tqindex import CodecConfig, Codes, TurboQuantCodec

PAPER_MSE = {1: 0.3634, 2: 0.1175, 3: 0.0345, 4: 0.0095}


def reconstruction_mse(codec: TurboQuantCodec, x: np.ndarray) -> float:
    return float(((codec.decode(codec.encode(x)) - x) ** 2).sum(axis=1).mean())


def paired_estimates(codec: TurboQuantCodec, q: np.ndarray, x: np.ndarray, block: int = 1000) -> np.ndarray:
    """Estimates of <q_i, x_i> for each pair i."""
    codes = codec.encode(x)
    return np.concatenate(
        [np.diag(codec.inner_products(q[i : i + block], codes[i : i + block])) for i in range(0, len(q), block)]
    )


@pytest.mark.parametrize("rotation", ["dense", "hadamard"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_unit_vector_reconstruction_mse_matches_paper(rotation, bits):
    codec = TurboQuantCodec(256, bits, rotation=rotation, scale="norm")
    mse = reconstruction_mse(codec, unit_rows(3000, 256, seed=bits))
    assert abs(mse - PAPER_MSE[bits]) / PAPER_MSE[bits] < 0.05


def test_fractional_bits_land_strictly_between_neighbours():
    x = unit_rows(2000, 256, seed=7)
    mse = {b: reconstruction_mse(TurboQuantCodec(256, b, scale="norm"), x) for b in (2, 2.5, 3)}
    assert mse[3] < mse[2.5] < mse[2]
    assert TurboQuantCodec(256, 2.5).code_bytes == 80  # 256 * 2.5 / 8


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_prod_estimator_is_unbiased_with_variance_within_the_paper_bound(bits):
    dim = 128
    codec = TurboQuantCodec(dim, bits, variant="prod")
    x, q = unit_rows(20000, dim, seed=10 + bits), unit_rows(20000, dim, seed=20 + bits)
    errors = paired_estimates(codec, q, x) - np.einsum("ij,ij->i", q, x)
    standard_error = errors.std() / math.sqrt(errors.size)
    assert abs(errors.mean()) < 3 * standard_error
    # TurboQuant paper, Theorem 2: D_prod <= sqrt(3) pi^2 ||q||^2 / d * 4^-b
    assert errors.var() <= math.sqrt(3) * math.pi**2 / dim / 4**bits


def test_unbiased_scale_has_unit_regression_slope_and_norm_scale_shrinks():
    dim = 128
    x, q = unit_rows(20000, dim, seed=1), unit_rows(20000, dim, seed=2)
    # correlated pairs, so the inner products span a real range
    q = q + 2 * x
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    true = np.einsum("ij,ij->i", q, x)
    slope = {s: np.polyfit(true, paired_estimates(TurboQuantCodec(dim, 2, scale=s), q, x), 1)[0] for s in ("unbiased", "norm")}
    assert abs(slope["unbiased"] - 1) < 0.02
    assert 0.85 < slope["norm"] < 0.92  # the paper's 2-bit shrinkage, about 0.88


def test_unbiased_scale_estimates_a_vector_against_itself_exactly():
    codec = TurboQuantCodec(64, 2)
    x = np.random.default_rng(3).standard_normal((50, 64)).astype(np.float32) * 3
    self_estimates = np.diag(codec.inner_products(x, codec.encode(x)))
    np.testing.assert_allclose(self_estimates, (x * x).sum(axis=1), rtol=1e-4)


def test_inner_products_equal_dot_products_with_decoded_vectors():
    for variant in ("mse", "prod"):
        codec = TurboQuantCodec(48, 3, variant=variant)
        x = np.random.default_rng(4).standard_normal((30, 48)).astype(np.float32)
        q = np.random.default_rng(5).standard_normal((7, 48)).astype(np.float32)
        codes = codec.encode(x)
        np.testing.assert_allclose(codec.inner_products(q, codes), q @ codec.decode(codes).T, rtol=1e-4, atol=1e-4)


def test_numpy_in_numpy_out_torch_in_torch_out():
    codec = TurboQuantCodec(32, 4)
    x = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    codes = codec.encode(x)
    assert isinstance(codes.packed, np.ndarray) and codes.packed.dtype == np.uint8
    assert codes.packed.shape == (5, codec.code_bytes) and codes.factors.shape == (5, 1)
    assert isinstance(codec.decode(codes), np.ndarray)
    tcodes = codec.encode(torch.from_numpy(x))
    assert isinstance(tcodes.packed, torch.Tensor) and tcodes.packed.dtype == torch.uint8
    assert np.array_equal(tcodes.packed.numpy(), codes.packed)
    scores = codec.inner_products(torch.from_numpy(x[:2]), tcodes)
    assert isinstance(scores, torch.Tensor) and scores.shape == (2, 5)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_float_dtypes_are_accepted(dtype):
    codec = TurboQuantCodec(32, 4)
    x = np.random.default_rng(0).standard_normal((5, 32))
    codes = codec.encode(x.astype(dtype))
    assert codes.packed.shape == (5, codec.code_bytes)
    assert codec.encode(torch.from_numpy(x).to(torch.bfloat16)).packed.shape == (5, codec.code_bytes)


def test_zero_vectors_encode_and_score_zero():
    codec = TurboQuantCodec(16, 3)
    x = np.zeros((2, 16), dtype=np.float32)
    codes = codec.encode(x)
    assert np.all(codes.factors == 0)
    assert np.all(codec.decode(codes) == 0)
    assert np.all(codec.inner_products(np.ones((3, 16), np.float32), codes) == 0)


@pytest.mark.parametrize("variant", ["mse", "prod"])
@pytest.mark.parametrize("rotation", ["dense", "hadamard"])
def test_state_restores_a_bit_identical_codec(variant, rotation):
    codec = TurboQuantCodec(40, 2.5, variant=variant, rotation=rotation, seed=9)
    restored = TurboQuantCodec.from_config(CodecConfig.from_dict(codec.config.to_dict()), codec.state())
    x = np.random.default_rng(1).standard_normal((20, 40)).astype(np.float32)
    a, b = codec.encode(x), restored.encode(x)
    assert a.packed.tobytes() == b.packed.tobytes() and a.factors.tobytes() == b.factors.tobytes()


def test_seed_changes_codes_and_same_seed_reproduces_them():
    x = np.random.default_rng(1).standard_normal((20, 64)).astype(np.float32)
    a, b, c = (TurboQuantCodec(64, 3, seed=s).encode(x) for s in (1, 1, 2))
    assert np.array_equal(a.packed, b.packed)
    assert not np.array_equal(a.packed, c.packed)


def test_sizes_count_factors():
    assert TurboQuantCodec(384, 4, rotation="dense").bytes_per_vector == 192 + 4
    assert TurboQuantCodec(384, 4, variant="prod", rotation="dense").bytes_per_vector == 192 + 8
    hadamard = TurboQuantCodec(384, 4, rotation="hadamard")
    assert hadamard.rotated_dim == 512 and hadamard.code_bytes == 256
    assert TurboQuantCodec(384, 4).config.rotation == "dense"  # auto: no padding overhead
    assert TurboQuantCodec(256, 4).config.rotation == "hadamard"


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(dim=0), ValueError, "dim"),
        (dict(dim=16, bits=0), ValueError, "bits"),
        (dict(dim=16, bits=9), ValueError, "bits"),
        (dict(dim=16, bits=2.3), ValueError, "bits"),
        (dict(dim=16, bits="4"), TypeError, "bits"),
        (dict(dim=16, variant="qjl"), ValueError, "variant"),
        (dict(dim=16, rotation="random"), ValueError, "rotation"),
        (dict(dim=16, scale="eden"), ValueError, "scale"),
        (dict(dim=16, variant="prod", scale="unbiased"), ValueError, "prod"),
        (dict(dim=16, seed=-1), ValueError, "seed"),
    ],
)
def test_bad_configuration_is_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        TurboQuantCodec(**kwargs)


@pytest.mark.parametrize(
    "x,error,match",
    [
        (np.zeros((3, 15), np.float32), ValueError, "shape"),
        (np.zeros((2, 3, 16), np.float32), ValueError, "shape"),
        (np.array([[np.nan] * 16], np.float32), ValueError, "NaN"),
        (np.array([[np.inf] * 16], np.float32), ValueError, "NaN"),
        (np.zeros((3, 16), np.int64), TypeError, "float"),
        (np.zeros((3, 16), np.complex64), TypeError, "float"),
        (torch.zeros((3, 16), dtype=torch.int32), TypeError, "float"),
        ([[0.0] * 16], TypeError, "numpy array or a torch tensor"),
    ],
)
def test_bad_vectors_are_refused(x, error, match):
    with pytest.raises(error, match=match):
        TurboQuantCodec(16, 2).encode(x)


def test_codes_of_another_codec_are_refused():
    codes = TurboQuantCodec(16, 2).encode(np.ones((2, 16), np.float32))
    with pytest.raises(ValueError, match="packed"):
        TurboQuantCodec(16, 4).decode(codes)
    with pytest.raises(ValueError, match="factors"):
        TurboQuantCodec(16, 2, variant="prod").inner_products(np.ones((1, 16), np.float32), Codes(
            np.zeros((2, TurboQuantCodec(16, 2, variant="prod").code_bytes), np.uint8), codes.factors))
    with pytest.raises(TypeError, match="Codes"):
        TurboQuantCodec(16, 2).decode(codes.packed)


def test_single_vector_and_empty_batch():
    codec = TurboQuantCodec(16, 2)
    assert len(codec.encode(np.ones(16, np.float32))) == 1
    empty = codec.encode(np.zeros((0, 16), np.float32))
    assert len(empty) == 0 and codec.inner_products(np.ones((2, 16), np.float32), empty).shape == (2, 0)


@pytest.mark.parametrize("variant", ["mse", "prod"])
def test_accumulate_then_finish_is_the_weighted_sum_of_decoded_vectors(variant):
    codec = TurboQuantCodec(40, 3, variant=variant)
    x = torch.randn(2, 30, 40, generator=torch.Generator().manual_seed(1))
    codes = codec.encode(x.reshape(-1, 40))
    packed, factors = codes.packed.view(2, 30, -1), codes.factors.view(2, 30, -1)
    weights = torch.rand(2, 5, 30, generator=torch.Generator().manual_seed(2))
    decoded = codec.decode(codes).view(2, 30, 40)
    torch.testing.assert_close(codec.finish(codec.accumulate(weights, packed, factors)), weights @ decoded, rtol=1e-4, atol=1e-4)


def test_batched_score_equals_per_batch_score():
    codec = TurboQuantCodec(40, 2.5, variant="prod")
    codes = codec.encode(torch.randn(3 * 20, 40, generator=torch.Generator().manual_seed(3)))
    packed, factors = codes.packed.view(3, 20, -1), codes.factors.view(3, 20, -1)
    queries = codec.rotate_queries(torch.randn(3 * 4, 40)).view(3, 4, -1)
    batched = codec.score(queries, packed, factors)
    assert batched.shape == (3, 4, 20)
    for b in range(3):
        torch.testing.assert_close(batched[b], codec.score(queries[b], packed[b], factors[b]))


@pytest.mark.parametrize("search", [False, True])
@pytest.mark.parametrize("bits,variant", [(2, "mse"), (2.5, "mse"), (4, "mse"), (3, "prod"), (1, "prod"), (3.5, "prod")])
def test_torch_quantizer_for_accelerators_equals_the_fused_cpu_kernel(bits, variant, search):
    codec = TurboQuantCodec(96, bits, variant=variant, search=search)
    rows = torch.randn(300, 96, generator=torch.Generator().manual_seed(5))
    rows[7] = 0  # a zero vector keeps its plain codes
    rotated, norms = codec.rotation.forward(rows), torch.linalg.vector_norm(rows, dim=1)
    fused = codec._quantize(rotated, norms, keep_residual=True)
    in_torch = codec._quantize_torch(rotated, 1 / norms.clamp_min(torch.finfo(torch.float32).tiny), keep_residual=True)
    assert torch.equal(fused[0], in_torch[0])
    torch.testing.assert_close(fused[1], in_torch[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[2], in_torch[2], rtol=1e-5, atol=1e-6)
    assert (fused[3] is None) == (in_torch[3] is None) == (not search)
    if search:
        torch.testing.assert_close(fused[3], in_torch[3], rtol=1e-5, atol=1e-5)


# ---- code search --------------------------------------------------------------------------
def rotated_cosines(codec: TurboQuantCodec, x: np.ndarray) -> np.ndarray:
    """Cosine between each rotated unit vector and the levels its codes select (float64)."""
    rotated = codec.rotation.forward(torch.from_numpy(x)).double()
    levels = codec.dequantize(torch.from_numpy(codec.encode(x).packed), torch.float64)
    return ((rotated * levels).sum(1) / (rotated.norm(dim=1) * levels.norm(dim=1))).numpy()


@pytest.mark.parametrize("variant", ["mse", "prod"])
@pytest.mark.parametrize(
    "dim,rotation,bits", [(64, "dense", 2), (64, "dense", 2.5), (128, "hadamard", 3), (96, "dense", 4), (32, "hadamard", 6)]
)
def test_code_search_never_lowers_any_vectors_cosine(dim, rotation, bits, variant):
    x = unit_rows(2000, dim, seed=31)
    codecs = [TurboQuantCodec(dim, bits, variant=variant, rotation=rotation, search=s) for s in (False, True)]
    plain, searched = (rotated_cosines(codec, x) for codec in codecs)
    assert np.all(searched >= plain - 1e-7)
    if bits - (variant == "prod") >= 2:  # (1-bit indices are signs: every scaling gives the same codes)
        assert np.mean(searched > plain + 1e-7) > 0.2  # and it improves many


# measured (docs/benchmarks.md, "Code search"): 1.0 / 5.9 / 15.3 % lower at 2 / 3 / 4 bits, d = 128;
# the thresholds leave about a third of the gain as slack for the sample
@pytest.mark.parametrize("bits,gain", [(2, 0.005), (2.5, 0.012), (3, 0.04), (3.5, 0.06), (4, 0.10)])
def test_code_search_lowers_the_unbiased_reconstruction_error(bits, gain):
    x = unit_rows(4000, 128, seed=32)
    plain, searched = (reconstruction_mse(TurboQuantCodec(128, bits, rotation="hadamard", search=s), x) for s in (False, True))
    assert searched < (1 - gain) * plain


def test_code_search_lowers_the_prod_estimators_variance_and_keeps_it_unbiased():
    dim, bits = 64, 4
    x, q = unit_rows(20000, dim, seed=33), unit_rows(20000, dim, seed=34)
    true = np.einsum("ij,ij->i", q, x)
    errors = {s: paired_estimates(TurboQuantCodec(dim, bits, variant="prod", search=s), q, x) - true for s in (False, True)}
    assert abs(errors[True].mean()) < 3 * errors[True].std() / math.sqrt(errors[True].size)
    assert errors[True].var() < 0.95 * errors[False].var()  # measured 12% lower


@pytest.mark.parametrize("variant", ["mse", "prod"])
def test_searched_codes_decode_and_score_consistently_with_their_factors(variant):
    codec = TurboQuantCodec(48, 3, variant=variant, search=True)
    x = np.random.default_rng(4).standard_normal((40, 48)).astype(np.float32) * 2
    q = np.random.default_rng(5).standard_normal((7, 48)).astype(np.float32)
    codes = codec.encode(x)
    np.testing.assert_allclose(codec.inner_products(q, codes), q @ codec.decode(codes).T, rtol=1e-4, atol=1e-4)
    if variant == "mse":  # the unbiased scale still estimates each vector against itself exactly
        np.testing.assert_allclose(np.diag(codec.inner_products(x, codes)), (x * x).sum(axis=1), rtol=1e-4)
    else:  # the first factor is the least-squares length of the levels: decode without QJL bits is the projection
        rotated = codec.rotation.forward(torch.from_numpy(x)).double()
        levels = codec.dequantize(torch.from_numpy(codes.packed), torch.float64)
        expected = (rotated * levels).sum(1) / (levels * levels).sum(1)
        np.testing.assert_allclose(codes.factors[:, 0], expected.numpy(), rtol=1e-4)


def test_code_search_config_round_trips_and_old_configs_load_without_it(tmp_path):
    codec = TurboQuantCodec(40, 2.5, search=True, seed=9)
    assert codec.config.search is True and codec.config.to_dict()["search"] is True
    restored = TurboQuantCodec.from_config(CodecConfig.from_dict(codec.config.to_dict()), codec.state())
    x = np.random.default_rng(1).standard_normal((50, 40)).astype(np.float32)
    a, b = codec.encode(x), restored.encode(x)
    assert a.packed.tobytes() == b.packed.tobytes() and a.factors.tobytes() == b.factors.tobytes()
    assert not np.array_equal(a.packed, TurboQuantCodec(40, 2.5, search=False, seed=9).encode(x).packed)
    old = {key: value for key, value in codec.config.to_dict().items() if key != "search"}
    assert CodecConfig.from_dict(old).search is False
    assert TurboQuantCodec(40, 2.5).config.search is False  # "auto": off (docs/benchmarks.md)
    assert TurboQuantCodec(40, 2.5, scale="norm").config.search is False

    from tqindex import TurboQuantIndex

    index = TurboQuantIndex(40, 2.5, search=True, seed=9, path=tmp_path / "index")
    index.add(x)
    index.close()
    reopened = TurboQuantIndex.open(tmp_path / "index")
    assert reopened.codec.config.search is True
    np.testing.assert_array_equal(reopened.search(x[:5], 1)[1][:, 0], np.arange(5))

    kv = pytest.importorskip("tqindex.kv")
    assert kv.TurboQuantCache(3, 3, search=True).codec("key", 64).config.search is True
    assert kv.TurboQuantCache(3, 3, search=False).codec("value", 64).config.search is False
    assert kv.TurboQuantCache(3, 3).codec("value", 64).config.search is True  # the cache's default, measured


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(search="yes"), TypeError, "search"),
        (dict(search=1), TypeError, "search"),
        (dict(search=True, scale="norm"), ValueError, "unbiased"),
    ],
)
def test_bad_search_option_is_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        TurboQuantCodec(16, 2, **kwargs)


@pytest.mark.parametrize("variant, rotation, dim", [("mse", "dense", 48), ("prod", "hadamard", 40), ("prod", "dense", 32)])
def test_finish_matrix_is_finish(variant, rotation, dim):
    """`finish_matrix`: ``finish(r) == r @ finish_matrix`` for rows of the rotated width (inverse
    rotation, and the QJL matrix times it for prod; Hadamard's padding dropped); not pickled."""
    import pickle

    codec = TurboQuantCodec(dim, 3, variant=variant, rotation=rotation, scale="norm" if variant == "prod" else "unbiased")
    width = codec.rotated_dim * codec.n_factors
    rows = torch.randn(7, width, generator=torch.Generator().manual_seed(dim))
    matrix = codec.finish_matrix("cpu")
    assert matrix.shape == (width, dim) and matrix.dtype == torch.float32
    torch.testing.assert_close(rows @ matrix, codec.finish(rows), rtol=1e-5, atol=1e-5)
    assert "_finish_cpu" not in pickle.loads(pickle.dumps(codec)).__dict__


def test_device_copies_are_cached_by_the_tensor_itself_not_a_reused_id():
    """`TurboQuantCodec._on` keys its cache by ``id``; an entry left by a freed tensor whose id a new
    tensor gets must not answer for it (the fused encoder once passed a temporary)."""
    codec = TurboQuantCodec(16, 2)
    meta = torch.device("meta")
    old, new = torch.zeros(3), torch.zeros(5)
    codec._on(old, meta)
    codec.__dict__["_device_cache"][(id(new), meta)] = codec.__dict__["_device_cache"][(id(old), meta)]  # as after id reuse
    assert codec._on(new, meta).shape == (5,)
    assert codec._on(old, meta) is codec._on(old, meta)  # and a live tensor's copy is made once
