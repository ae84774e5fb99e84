"""The fused Triton scan against the codec's estimator and the CPU scan.

Runs in the Triton interpreter on CPU tensors (``TRITON_INTERPRET=1``, set here before triton is
imported), or on a GPU when the environment sets ``TRITON_INTERPRET=0`` and CUDA is present.
Select alone with ``pytest -m triton``. Sizes are tiny: the interpreter is slow.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from tqindex.codec import TurboQuantCodec
from tqindex.kernels import Chunk, get_scanner, scan_topk, triton_scan
from tqindex.kernels.gemm import GemmScanner
from tqindex.kernels.triton_scan import TritonScanner

pytestmark = pytest.mark.triton

if triton_scan._INTERPRETED:
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set, and there is no GPU", allow_module_level=True)

# (bits, variant, dim): every field width, fractional layouts, prod's 0-bit indices; dims 48 and
# 100 (dense rotation, not powers of two) and 64 (Hadamard)
CONFIGS = [
    (1, "mse", 48),
    (2, "mse", 100),
    (2.5, "mse", 64),
    (3, "mse", 48),
    (3.5, "mse", 100),
    (4, "mse", 64),
    (5, "mse", 48),
    (6, "mse", 100),
    (7, "mse", 64),
    (8, "mse", 48),
    (1, "prod", 64),
    (1.5, "prod", 48),
    (2, "prod", 100),
    (3.5, "prod", 64),
    (5, "prod", 48),
    (8, "prod", 100),
]


def encoded(bits: float, variant: str, dim: int, n: int, m: int, seed: int = 0):
    """A codec, its codes of ``n`` Gaussian rows and ``m`` rotated queries, on DEVICE."""
    codec = TurboQuantCodec(dim, bits, variant=variant, seed=seed)
    rng = np.random.default_rng(seed)
    codes = codec.encode(torch.from_numpy(rng.standard_normal((n, dim)).astype(np.float32)))
    queries = codec.rotate_queries(torch.from_numpy(rng.standard_normal((m, dim)).astype(np.float32)))
    return codec, codes.packed.to(DEVICE), codes.factors.to(DEVICE), queries.to(DEVICE)


def dense_scores(scores: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """Chunk top-k output -> ``(m, n)`` with -inf for rows not returned; each row returned at most once."""
    finite = torch.isfinite(scores)
    assert (rows[~finite] == -1).all()
    dense = torch.full((scores.shape[0], n), float("-inf"), device=scores.device)
    for q in range(scores.shape[0]):
        picked = rows[q, finite[q]]
        assert picked.unique().numel() == picked.numel()
        dense[q, picked] = scores[q, finite[q]]
    return dense


@pytest.mark.parametrize("bits, variant, dim", CONFIGS)
def test_kernel_scores_equal_the_codec_estimator(bits, variant, dim):
    """Every valid row's fp32 kernel score equals ``codec.score``; masked rows never come back."""
    n = 100  # 4 tiles of 32 rows, the last one partial; 2 tiles per program
    codec, packed, factors, queries = encoded(bits, variant, dim, n, m=3, seed=int(bits * 10) + dim)
    valid = torch.from_numpy(np.random.default_rng(dim).random(n) > 0.3).to(DEVICE)
    scanner = TritonScanner(codec, torch.float32, block_n=32, block_d=32, tiles_per_program=2)
    scores, rows = scanner.chunk_topk(scanner.prepare(queries), packed, factors, valid, n)
    assert scores.shape == rows.shape == (3, n) and rows.dtype == torch.int64
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    expected = codec.score(queries, packed, factors).masked_fill(~valid, float("-inf"))
    torch.testing.assert_close(dense_scores(scores, rows, n), expected, rtol=1e-5, atol=1e-5)


def chunks_on_cpu(chunks):
    for c in chunks:
        yield Chunk(c.start, c.packed.cpu(), c.factors.cpu(), None if c.valid is None else c.valid.cpu())


def fetch_on_cpu(packed: torch.Tensor, factors: torch.Tensor):
    packed, factors = packed.cpu(), factors.cpu()
    return lambda at: (packed[at], factors[at])


# k=5 keeps 26 candidates (32 slots) per 16-row tile; k=60 keeps 136, more than either chunk has
@pytest.mark.parametrize("k", [5, 60])
@pytest.mark.parametrize("bits, variant, dim", [(2, "mse", 100), (3.5, "mse", 64), (4, "prod", 48), (1, "prod", 64)])
def test_scan_topk_equals_the_cpu_scan(bits, variant, dim, k):
    """fp16 Triton candidates, rescored exactly, give the CPU scan's top-k over chunks with deletions and a filter."""
    n = 210
    codec, packed, factors, queries = encoded(bits, variant, dim, n, m=4, seed=dim + k)
    valid = torch.from_numpy(np.random.default_rng(k).random(n) > 0.25).to(DEVICE)
    valid[130:140] = False  # a deleted run crossing tile boundaries

    def chunks():
        yield Chunk(0, packed[:130], factors[:130], valid[:130])
        yield Chunk(130, packed[130:], factors[130:], None)  # a chunk with nothing masked

    def fetch(at: torch.Tensor):
        return packed[at], factors[at]

    cpu = GemmScanner(codec, dtype=torch.float32)
    cpu_scores, cpu_rows = scan_topk(codec, cpu, queries.cpu(), chunks_on_cpu(chunks()), k, fetch_on_cpu(packed, factors))
    scores, rows = scan_topk(codec, TritonScanner(codec, block_n=16), queries, chunks(), k, fetch)
    torch.testing.assert_close(scores.cpu(), cpu_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(rows.cpu(), cpu_rows)


def test_equal_scores_fill_distinct_rows():
    """All rows identical: every score ties, and the kernel still returns k distinct rows."""
    codec, packed, factors, queries = encoded(4, "mse", 48, n=1, m=2)
    packed, factors = packed.expand(90, -1).contiguous(), factors.expand(90, -1).contiguous()
    scanner = TritonScanner(codec, block_n=16, tiles_per_program=3)
    scores, rows = scanner.chunk_topk(scanner.prepare(queries), packed, factors, None, 20)
    assert torch.isfinite(scores).all() and (scores == scores[:, :1]).all()
    assert all(r.unique().numel() == 20 for r in rows)


def test_fully_masked_chunk_returns_nothing():
    codec, packed, factors, queries = encoded(2, "prod", 48, n=40, m=2)
    scanner = TritonScanner(codec, block_n=16)
    valid = torch.zeros(40, dtype=torch.bool, device=DEVICE)
    scores, rows = scanner.chunk_topk(scanner.prepare(queries), packed, factors, valid, 8)
    assert scores.shape == (2, 8) and torch.isinf(scores).all() and (rows == -1).all()


def test_arguments_are_checked():
    codec, packed, factors, queries = encoded(2, "mse", 48, n=10, m=1)
    with pytest.raises(ValueError, match="power of two"):
        TritonScanner(codec, block_n=48)
    with pytest.raises(ValueError, match="dtype"):
        TritonScanner(codec, torch.float64)
    scanner = TritonScanner(codec)
    with pytest.raises(ValueError, match="from prepare"):
        scanner.chunk_topk(queries, packed, factors, None, 3)  # float32, not the scanner's float16
    with pytest.raises(ValueError, match="overflow"):
        scanner.prepare(queries * 1e6)


def test_dispatch():
    codec = TurboQuantCodec(48, 2)
    assert isinstance(get_scanner(codec, "triton"), TritonScanner)
    assert isinstance(get_scanner(codec, "auto", "cpu", queries=100), GemmScanner)
    assert isinstance(get_scanner(codec, "auto", "cuda"), TritonScanner)


_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tqindex.codec import TurboQuantCodec
from tqindex.kernels.triton_scan import _scan_kernel

layout = TurboQuantCodec(100, 3.5, variant="prod").layout  # several index fields, signs
signature = {
    "queries_ptr": "*fp16", "packed_ptr": "*u8", "factors_ptr": "*fp32", "valid_ptr": "*i1", "bias_ptr": "*fp32",
    "levels_ptr": "*fp32", "level_offsets_ptr": "*i32", "out_scores_ptr": "*fp32", "out_rows_ptr": "*i32",
    **{name: "i32" for name in ("n_rows", "n_queries", "tiles_per_program", "stride_q", "stride_p", "stride_f")},
}
constants = dict(
    DIM=layout.dim, FIELDS=tuple((f.stop, f.width, f.shift, f.offset) for f in layout.index_fields),
    SIGN_OFFSET=layout.sign_field.offset, HAS_VALID=True, HAS_BIAS=True, KP=64, BLOCK_M=64, BLOCK_N=128, BLOCK_D=32, PRECISION="tf32",
)
signature.update({name: "constexpr" for name in constants})
names = list(signature)
source = ASTSource(_scan_kernel, signature, constexprs={(names.index(k),): v for k, v in constants.items()})
kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
assert "wgmma" in kernel.asm["ptx"] and kernel.asm["cubin"], "no tensor-core code or no cubin"
print("compiled")
"""


def test_kernel_compiles_for_a_real_gpu(tmp_path):
    """The interpreter accepts code the compiler rejects: compile for sm_90 (no GPU needed) and look for wgmma."""
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "TRITON_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


def test_index_search_through_the_triton_backend_equals_the_torch_backend():
    from tqindex import TurboQuantIndex

    rng = np.random.default_rng(5)
    x, q = rng.standard_normal((400, 48)).astype(np.float32), rng.standard_normal((3, 48)).astype(np.float32)
    indexes = {b: TurboQuantIndex(48, 3, backend=b, chunk_rows=150) for b in ("triton", "torch")}
    for index in indexes.values():
        index.add(x)
        index.remove_ids(np.arange(0, 400, 5))
    for kwargs in ({}, {"filter": np.arange(100, 300)}):
        for got, want in zip(indexes["triton"].search(q, 12, **kwargs), indexes["torch"].search(q, 12, **kwargs)):
            np.testing.assert_allclose(got, want, rtol=1e-5)


def test_kernel_adds_the_row_bias_before_selecting():
    """The L2 index's per-row bias: scores are ``codec.score + bias``, and the top-k is taken on them."""
    n = 70
    codec, packed, factors, queries = encoded(3, "mse", 48, n, m=2, seed=7)
    bias = torch.linspace(-2, 2, n).to(DEVICE)
    scanner = TritonScanner(codec, torch.float32, block_n=32, block_d=32, tiles_per_program=2)
    scores, rows = scanner.chunk_topk(scanner.prepare(queries), packed, factors, None, 9, bias=bias)
    expected, expected_rows = (codec.score(queries, packed, factors) + bias).topk(9, dim=1)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(rows, expected_rows)


def test_l2_index_search_through_the_triton_backend_equals_the_torch_backend():
    from tqindex import TurboQuantIndex

    rng = np.random.default_rng(6)
    x = (rng.standard_normal((300, 48)) + 2).astype(np.float32)
    q = (rng.standard_normal((3, 48)) + 2).astype(np.float32)
    indexes = {b: TurboQuantIndex(48, 4, metric="l2", backend=b, chunk_rows=120) for b in ("triton", "torch")}
    for index in indexes.values():
        index.add(x)
    for got, want in zip(indexes["triton"].search(q, 8), indexes["torch"].search(q, 8)):
        np.testing.assert_allclose(got, want, rtol=1e-5)
