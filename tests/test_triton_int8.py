"""The int8 form of the Triton scan (``triton_int8``: byte-permute look-ups and DP4A) against the
codec's estimator and the CPU scan.

In the interpreter (CI) ``prmt`` and ``dp4a`` are emulated; on a GPU (``TRITON_INTERPRET=0``)
the same tests run the PTX instructions, and the first test checks them against the PTX ISA's
definitions, written out here in numpy.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import triton
import triton.language as tl

from triton_device import DEVICE
from tqindex.codec import TurboQuantCodec
from tqindex.kernels import Chunk, QueryChunk, scan_groups_topk, scan_topk
from tqindex.kernels.gemm import GemmScanner
from tqindex.kernels.scan import search_resident
from tqindex.kernels.triton_int8 import dp4a, level_scale, query_order
from tqindex.kernels.triton_unpack import prmt
from tqindex.kernels.triton_scan import MMA, ScanConfig, TritonScanner

pytestmark = pytest.mark.triton

SMALL_FMA = ScanConfig(mma=False, max_block_m=4, block_n=32, block_d=32, num_warps=4)
SMALL_MMA = ScanConfig(mma=True, max_block_m=16, block_n=16, block_d=128, num_warps=4)  # 32 or 64 code bytes a step
# (bits, dim): 4 bits over whole steps, over a last step of 1 of 4 words (dim 40), 2 bits over
# 2-word steps and a Hadamard rotation (dim 64)
LAYOUTS = [(4, 64), (4, 40), (2, 96), (2, 64)]


@triton.jit
def _primitives_kernel(a_ptr, b_ptr, c_ptr, prmt_ptr, dp4a_ptr, N: tl.constexpr):
    at = tl.arange(0, N)
    a, b, c = tl.load(a_ptr + at), tl.load(b_ptr + at), tl.load(c_ptr + at)
    tl.store(prmt_ptr + at, prmt(a, b, c & 0x77777777))
    tl.store(dp4a_ptr + at, dp4a(a, b, c))


def _ptx_prmt(a: np.ndarray, b: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """PTX ISA, prmt.b32 default mode: bytes {b, a} numbered 0-7 (a: 0-3); result byte n is the byte
    that bits 4n..4n+2 of the selector name (bit 4n+3 clear: no sign replication)."""
    source = np.stack([a.view(np.uint8).reshape(-1, 4), b.view(np.uint8).reshape(-1, 4)], axis=1).reshape(-1, 8)
    picks = (sel[:, None].astype(np.int64) >> (4 * np.arange(4))) & 7
    return np.ascontiguousarray(np.take_along_axis(source, picks, axis=1)).view(np.int32)[:, 0]


def _ptx_dp4a(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """PTX ISA, dp4a.s32.s32: c + the sum of the products of the four signed bytes of a and of b (mod 2^32)."""
    products = a.view(np.int8).reshape(-1, 4).astype(np.int64) * b.view(np.int8).reshape(-1, 4)
    return (c.astype(np.int64) + products.sum(axis=1)).astype(np.int32)


def test_prmt_and_dp4a_follow_the_ptx_definitions():
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(-(2**31), 2**31, 256, dtype=np.int64).astype(np.int32) for _ in range(3))
    out_prmt, out_dp4a = (torch.empty(256, dtype=torch.int32, device=DEVICE) for _ in range(2))
    _primitives_kernel[(1,)](*(torch.from_numpy(v).to(DEVICE) for v in (a, b, c)), out_prmt, out_dp4a, N=256)
    np.testing.assert_array_equal(out_prmt.cpu().numpy(), _ptx_prmt(a, b, c & 0x77777777))
    np.testing.assert_array_equal(out_dp4a.cpu().numpy(), _ptx_dp4a(a, b, c))


def encoded(bits: int, dim: int, n: int, m: int, seed: int = 0):
    codec = TurboQuantCodec(dim, bits, seed=seed)
    rng = np.random.default_rng(seed)
    codes = codec.encode(torch.from_numpy(rng.standard_normal((n, dim)).astype(np.float32)))
    queries = codec.rotate_queries(torch.from_numpy(rng.standard_normal((m, dim)).astype(np.float32)))
    return codec, codes.packed.to(DEVICE), codes.factors.to(DEVICE), queries.to(DEVICE)


@pytest.mark.parametrize("config", [SMALL_FMA, SMALL_MMA], ids=["dp4a", "tensor-cores"])
@pytest.mark.parametrize("bits, dim", LAYOUTS)
def test_bounds_are_the_int8_scores_plus_the_margin_and_bound_the_estimator(bits, dim, config):
    """Every valid row's kernel score is ``f s_q s_c sum L Q + |f| margin + bias`` (computed here in
    float64 from the int8 values), and with the worst-case margin (z = 0) it is at least the codec's estimate."""
    n = 100
    codec, packed, factors, queries = encoded(bits, dim, n, m=3, seed=bits * 100 + dim)
    valid = torch.from_numpy(np.random.default_rng(dim).random(n) > 0.3).to(DEVICE)
    bias = torch.linspace(-1, 1, n, device=DEVICE)
    scanner = TritonScanner(codec, config, torch.int8, tiles_per_program=2, z=0)
    prepared = scanner.prepare(queries)
    bounds, rows, overflow = scanner.candidates(prepared, packed, factors, valid, n, bias)
    assert not overflow.any() and rows.dtype == torch.int64 and (bounds[:, :-1] >= bounds[:, 1:]).all()

    c_scale, _ = level_scale(codec)
    levels = torch.round(codec.dequantize(packed.cpu()).double() / c_scale)  # L of every coordinate
    q = torch.round(queries.cpu() / (queries.cpu().abs().amax(dim=1, keepdim=True) / 127)).double()
    terms, f = prepared.terms.cpu().double(), factors.cpu()[:, 0].double()
    want = (q @ levels.T) * terms[:, :1] * f + f.abs() * terms[:, 1:] + bias.cpu().double()
    want = want.masked_fill(~valid.cpu(), float("-inf"))
    got = torch.full((3, n), float("-inf"), dtype=torch.float64)
    kept = torch.isfinite(bounds.cpu())
    for i in range(3):
        got[i, rows.cpu()[i, kept[i]]] = bounds.cpu()[i, kept[i]].double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    estimate = (codec.score(queries, packed, factors) + bias).cpu().double().masked_fill(~valid.cpu(), float("-inf"))
    assert (got[valid.cpu().expand(3, -1)] >= estimate[valid.cpu().expand(3, -1)]).all()


@pytest.mark.parametrize("config", [SMALL_FMA, SMALL_MMA], ids=["dp4a", "tensor-cores"])
def test_worst_case_rows_stay_under_their_bound_after_float32_rescoring(config):
    """z = 0 with each coordinate at the level whose int8 rounding errs most: the kernel's bound
    covers the float32 rescoring's own rounding too (it fell an ulp short at D = 256 before)."""
    from tqindex.kernels.scan import rescore_resident

    dim = 256
    codec = TurboQuantCodec(dim, 4, seed=1)
    queries = torch.full((1, dim), 2.6255345865908475)
    c_scale, levels = level_scale(codec)
    q_scale = queries.abs().amax() / 127
    err = queries.double()[0, :, None] * codec.levels.double() - (torch.round(queries / q_scale).double()[0] * q_scale.double())[:, None] * (levels.double() * c_scale)
    packed = codec.layout.pack(err.argmax(dim=1).to(torch.uint8)[None]).expand(18, -1).contiguous().to(DEVICE)
    factors = torch.full((18, 1), 1.4878308773040771, device=DEVICE)
    queries = queries.to(DEVICE)
    scanner = TritonScanner(codec, config, torch.int8, z=0)
    bounds, rows, _ = scanner.candidates(scanner.prepare(queries), packed, factors, None, 18)
    rescored, _ = rescore_resident(codec, queries, rows, packed, factors, None, 18)
    assert (bounds >= rescored).all(), (bounds.max().item(), rescored.max().item())


def test_query_bytes_follow_the_look_up_order():
    """4 bits: coordinates in order; 2 bits: each word's even coordinates, then its odd ones."""
    assert torch.equal(query_order(16, 4), torch.arange(16))
    assert query_order(32, 2)[:16].tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15]
    assert query_order(32, 2)[16:].tolist() == [16 + i for i in query_order(16, 2).tolist()]


def fetch_from(packed: torch.Tensor, factors: torch.Tensor):
    packed, factors = packed.cpu(), factors.cpu()
    return lambda at: (packed[at], factors[at])


# k = 40 keeps 96 candidates, more than either chunk holds
@pytest.mark.parametrize("k", [5, 40])
@pytest.mark.parametrize("bits, dim, config", [(4, 40, SMALL_FMA), (2, 96, SMALL_FMA), (4, 64, SMALL_MMA)], ids=["4-dp4a", "2-dp4a", "4-tensor-cores"])
def test_searches_equal_the_cpu_scan(bits, dim, config, k):
    """search_resident, scan_topk over chunks and (at k = 5) scan_groups_topk through the int8 form give the CPU scan's top-k."""
    n = 130
    codec, packed, factors, queries = encoded(bits, dim, n, m=4, seed=dim + k)
    valid = torch.from_numpy(np.random.default_rng(k).random(n) > 0.25).to(DEVICE)
    bias = torch.from_numpy(np.random.default_rng(1).standard_normal(n).astype(np.float32)).to(DEVICE)
    cpu = GemmScanner(codec, dtype=torch.float32)
    whole = [Chunk(0, packed.cpu(), factors.cpu(), valid.cpu(), bias.cpu())]
    fetch = fetch_from(packed, factors)
    want_scores, want_rows = scan_topk(codec, cpu, queries.cpu(), whole, k, fetch, lambda at: bias.cpu()[at])
    scanner = TritonScanner(codec, config, torch.int8, tiles_per_program=2)
    results = [search_resident(codec, scanner, queries, packed, factors, valid, k, bias)]
    chunks = [Chunk(0, packed[:80], factors[:80], valid[:80], bias[:80]), Chunk(80, packed[80:], factors[80:], valid[80:], bias[80:])]
    results.append(scan_topk(codec, scanner, queries, chunks, k, fetch, lambda at: bias.cpu()[at.cpu()].to(DEVICE)))
    if k == 5:
        groups = [QueryChunk(torch.tensor([0, 2, 3]), chunks[0]), QueryChunk(torch.tensor([1, 3, 0, 2]), chunks[1]), QueryChunk(torch.tensor([1]), chunks[0])]
        results.append(scan_groups_topk(codec, scanner, queries, groups, k, fetch, lambda rows: bias[rows.clamp_min(0).to(DEVICE)]))
    for scores, rows in results:
        torch.testing.assert_close(scores.cpu(), want_scores, rtol=1e-5, atol=1e-5)
        assert torch.equal(rows.cpu(), want_rows)


def test_candidates_whose_bounds_reach_past_the_k_th_best_are_rescanned():
    """Thirty copies of the best row, more than the candidates: all candidates are copies with one
    bound, above their exact score, so the k-th best rescored one is below the last candidate's
    bound; the query is flagged and rescanned, and the results are k distinct copies (or the row itself)."""
    n, k = 90, 4
    codec, packed, factors, queries = encoded(4, 64, n, m=1, seed=5)
    best = int(codec.score(queries, packed, factors)[0].argmax())
    packed[::3], factors[::3] = packed[best], factors[best]  # rows 0, 3, ..., 87
    scanner = TritonScanner(codec, SMALL_FMA, torch.int8, tiles_per_program=1)
    count = 2 * k + 16
    bounds, rows, overflow = scanner.candidates(scanner.prepare(queries), packed, factors, None, count)
    exact = codec.score(queries, packed, factors)[0]
    assert not overflow.any() and bounds.shape == (1, count) and bool(exact[rows[0, k - 1]] < bounds[0, -1])  # below_bounds
    scores, rows = search_resident(codec, scanner, queries, packed, factors, None, k)
    torch.testing.assert_close(scores[0], exact.max().expand(k))
    assert rows[0].unique().numel() == k and all(int(r) % 3 == 0 or int(r) == best for r in rows[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_an_empty_batch_gives_empty_results(dtype):
    codec, packed, factors, queries = encoded(4, 64, n=30, m=1)
    scores, rows = search_resident(codec, TritonScanner(codec, SMALL_FMA, dtype), queries[:0], packed, factors, None, 5)
    assert scores.shape == rows.shape == (0, 5) and rows.dtype == torch.int64


def test_int8_arguments_are_checked():
    codec, packed, factors, queries = encoded(4, 64, n=10, m=1)
    with pytest.raises(ValueError, match="block_d >= 128 at 2 bits"):
        TritonScanner(TurboQuantCodec(64, 2), MMA, torch.int8)  # 16 code bytes a step
    for bits, variant, dim, message in [(3, "mse", 64, "2 or 4 bits"), (2, "prod", 64, "2 or 4 bits"), (2.5, "mse", 64, "2 or 4 bits"), (4, "mse", 44, "multiple of 8")]:
        with pytest.raises(ValueError, match=message):
            TritonScanner(TurboQuantCodec(dim, bits, variant=variant), SMALL_FMA, torch.int8)
    scanner = TritonScanner(codec, SMALL_FMA, torch.int8)
    with pytest.raises(ValueError, match="from prepare"):
        scanner.chunk_topk(queries.half(), packed, factors, None, 3)
    with pytest.raises(ValueError, match="finite"):
        scanner.prepare(queries * float("inf"))
    for width in (56, 72):
        with pytest.raises(ValueError, match=r"must be \(m, 64\)"):
            scanner.prepare(torch.zeros(1, width, device=DEVICE))
    for dtype in (torch.int8, torch.float16):
        with pytest.raises(ValueError, match="trellis"):
            TritonScanner(TurboQuantCodec(64, 2, quantizer="trellis", scale="unbiased"), SMALL_FMA, dtype)
    empty = torch.zeros((0, packed.shape[1]), dtype=torch.uint8, device=DEVICE)
    for form in (scanner, TritonScanner(codec, SMALL_FMA)):  # no rows: nothing found, in every form
        scores, rows = search_resident(codec, form, queries, empty, factors[:0], None, 3)
        assert rows.tolist() == [[-1, -1, -1]] and torch.isinf(scores).all()
    assert TritonScanner(codec, SMALL_FMA, torch.int8).bounds and not TritonScanner(codec, SMALL_FMA).bounds


def test_the_sass_tool_compiles_the_int8_form_and_finds_its_inner_loop(tmp_path):
    """benchmarks/scan_kernel_sass.py compiles the int8 form for sm_90 (no GPU needed) and finds its
    inner loop: DP4A (IDP) and byte permutes, no float multiply-add."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path), "PYTHONPATH": f"{root}{os.pathsep}{root / 'benchmarks'}"}
    script = [sys.executable, str(root / "benchmarks" / "scan_kernel_sass.py"), "--scratch", str(tmp_path), "--cases", "2-bit, int8 dp4a"]
    done = subprocess.run(script, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("| 2-bit, int8 dp4a"))
    assert "IDP" in row and "PRMT" in row and "FFMA" not in row, row
