"""The fused Triton scan against the codec's estimator and the CPU scan.

Runs in the Triton interpreter on CPU tensors (``TRITON_INTERPRET=1``, conftest), or on a GPU
when the environment sets ``TRITON_INTERPRET=0`` and CUDA is present (``triton_device``).
Select alone with ``pytest -m triton``. Sizes are tiny: the interpreter is slow.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from triton_device import DEVICE
from tqindex.codec import TurboQuantCodec
from tqindex.kernels import Chunk, get_scanner, scan_topk
from tqindex.kernels.gemm import GemmScanner
from tqindex.kernels.scan import search_resident
from tqindex.kernels.triton_scan import FMA, MMA, ScanConfig, TritonScanner, exact_topk
from tqindex.kernels.triton_unpack import register_width

pytestmark = pytest.mark.triton

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
# small tiles, so that tests have several tiles and programs
SMALL_MMA = ScanConfig(mma=True, max_block_m=16, block_n=16, block_d=32, num_warps=4)
SMALL_FMA = ScanConfig(mma=False, max_block_m=4, block_n=32, block_d=32, num_warps=4)


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
    """Every valid row's fp32 kernel score equals ``codec.score``; masked rows never come back.

    Two tiles per program and two slots per bucket: every row is kept, so all come back."""
    n = 100  # 4 tiles of 32 rows (FMA, 1 query... 3 queries: 4 per program, 8-row... see block_rows)
    codec, packed, factors, queries = encoded(bits, variant, dim, n, m=3, seed=int(bits * 10) + dim)
    valid = torch.from_numpy(np.random.default_rng(dim).random(n) > 0.3).to(DEVICE)
    expected = codec.score(queries, packed, factors).masked_fill(~valid, float("-inf"))
    config = SMALL_MMA if dim != 48 else SMALL_FMA  # both forms over the layouts
    scanner = TritonScanner(codec, config, torch.float32, tiles_per_program=2)
    scores, rows, overflow = scanner.candidates(scanner.prepare(queries), packed, factors, valid, n)
    assert not overflow.any()
    assert scores.shape == rows.shape == (3, n) and rows.dtype == torch.int64
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    torch.testing.assert_close(dense_scores(scores, rows, n), expected, rtol=1e-5, atol=1e-5)


def test_buckets_that_overflow_are_rescanned_exactly():
    """The four best rows share one bucket (lane 0 of four tiles in one program): two are dropped,
    the query is flagged, and chunk_topk still returns the exact top-k."""
    codec, packed, factors, queries = encoded(4, "mse", 64, n=64, m=1, seed=3)
    exact = codec.score(queries, packed, factors)[0]
    order = torch.argsort(exact.cpu(), descending=True).to(DEVICE)
    perm = torch.empty(64, dtype=torch.int64, device=DEVICE)
    perm[torch.tensor([0, 16, 32, 48, 1, 2, 3, 4], device=DEVICE)] = order[:8]
    rest = torch.ones(64, dtype=torch.bool, device=DEVICE)
    rest[torch.tensor([0, 16, 32, 48, 1, 2, 3, 4], device=DEVICE)] = False
    perm[rest] = order[8:]
    packed, factors = packed[perm].contiguous(), factors[perm].contiguous()
    config = ScanConfig(mma=False, max_block_m=1, block_n=16, block_d=32, num_warps=4)
    scanner = TritonScanner(codec, config, torch.float32, tiles_per_program=4)
    prepared = scanner.prepare(queries)
    _, _, overflow = scanner.candidates(prepared, packed, factors, None, 6)
    assert overflow.tolist() == [True]
    scores, rows = scanner.chunk_topk(prepared, packed, factors, None, 6)
    assert rows[0].tolist() == [0, 16, 32, 48, 1, 2]
    torch.testing.assert_close(scores[0], exact[order[:6]], rtol=1e-5, atol=1e-5)


def test_candidate_buffers_stay_within_their_budget_for_large_k(monkeypatch):
    """64 C^1.5 buckets for C candidates outgrow the rows scanned as k grows (k = 1000: 5.8M a
    query): the slots of one scan are capped (`_MAX_CANDIDATE_SLOTS`, here shrunk to fit the
    interpreter), the buckets that overflow are flagged, and the search still returns the CPU scan's top-k."""
    from tqindex.kernels import triton_scan

    n, m, k = 400, 3, 40
    codec, packed, factors, queries = encoded(4, "mse", 64, n, m=m, seed=21)
    budget = 2 * m * 2 * SMALL_FMA.block_n  # two groups a query
    monkeypatch.setattr(triton_scan, "_MAX_CANDIDATE_SLOTS", budget)
    grids = []
    kernel = triton_scan._scan_kernel

    class Recorded:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(triton_scan, "_scan_kernel", Recorded())
    scanner = TritonScanner(codec, SMALL_FMA)
    prepared = scanner.prepare(queries)
    _, _, overflow = scanner.candidates(prepared, packed, factors, None, 2 * k + 16)
    block_m = SMALL_FMA.block_m(m)
    assert all(m * groups * 2 * SMALL_FMA.block_rows(block_m) <= budget for _, groups in grids)
    assert overflow.any(), "too few buckets for 96 candidates: some must overflow"
    cpu = GemmScanner(codec, dtype=torch.float32)
    want_scores, want_rows = scan_topk(codec, cpu, queries.cpu(), [Chunk(0, packed.cpu(), factors.cpu())], k, fetch_on_cpu(packed, factors))
    scores, rows = search_resident(codec, scanner, queries, packed, factors, None, k)
    torch.testing.assert_close(scores.cpu(), want_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(rows.cpu(), want_rows)


def chunks_on_cpu(chunks):
    for c in chunks:
        yield Chunk(c.start, c.packed.cpu(), c.factors.cpu(), None if c.valid is None else c.valid.cpu())


def fetch_on_cpu(packed: torch.Tensor, factors: torch.Tensor):
    packed, factors = packed.cpu(), factors.cpu()
    return lambda at: (packed[at], factors[at])


# k=5 keeps 26 candidates per query; k=60 keeps 136, more than either chunk has
@pytest.mark.parametrize("k", [5, 60])
@pytest.mark.parametrize("bits, variant, dim, config", [(2, "mse", 100, SMALL_MMA), (3.5, "mse", 64, SMALL_FMA), (4, "prod", 48, SMALL_MMA), (1, "prod", 64, SMALL_FMA)])
def test_scan_topk_equals_the_cpu_scan(bits, variant, dim, config, k):
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
    scores, rows = scan_topk(codec, TritonScanner(codec, config, tiles_per_program=2), queries, chunks(), k, fetch)
    torch.testing.assert_close(scores.cpu(), cpu_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(rows.cpu(), cpu_rows)


@pytest.mark.parametrize("config", [SMALL_FMA, SMALL_MMA])
def test_search_resident_equals_the_cpu_scan(config):
    """The lean one-kernel search (device rescoring, no per-chunk loop) gives the CPU scan's results."""
    n, k = 300, 7
    codec, packed, factors, queries = encoded(3, "mse", 64, n, m=3, seed=11)
    valid = torch.from_numpy(np.random.default_rng(2).random(n) > 0.2).to(DEVICE)
    cpu = GemmScanner(codec, dtype=torch.float32)
    chunk = [Chunk(0, packed.cpu(), factors.cpu(), valid.cpu())]
    want_scores, want_rows = scan_topk(codec, cpu, queries.cpu(), chunk, k, fetch_on_cpu(packed, factors))
    scores, rows = search_resident(codec, TritonScanner(codec, config, tiles_per_program=3), queries, packed, factors, valid, k)
    torch.testing.assert_close(scores.cpu(), want_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(rows.cpu(), want_rows)


def test_equal_scores_fill_distinct_rows():
    """All rows identical: every score ties, buckets overflow, and the exact rescan still returns k distinct rows."""
    codec, packed, factors, queries = encoded(4, "mse", 48, n=1, m=2)
    packed, factors = packed.expand(90, -1).contiguous(), factors.expand(90, -1).contiguous()
    scanner = TritonScanner(codec, SMALL_MMA, tiles_per_program=3)
    scores, rows = scanner.chunk_topk(scanner.prepare(queries), packed, factors, None, 20)
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores, scores[:, :1].expand(-1, 20))  # ties (a GEMM may round columns apart)
    assert all(r.unique().numel() == 20 for r in rows)


def test_fully_masked_chunk_returns_nothing():
    codec, packed, factors, queries = encoded(2, "prod", 48, n=40, m=2)
    scanner = TritonScanner(codec, SMALL_MMA)
    valid = torch.zeros(40, dtype=torch.bool, device=DEVICE)
    scores, rows = scanner.chunk_topk(scanner.prepare(queries), packed, factors, valid, 8)
    assert scores.shape == (2, 8) and torch.isinf(scores).all() and (rows == -1).all()


def test_exact_topk_matches_full_scores():
    codec, packed, factors, queries = encoded(2, "mse", 48, n=50, m=2)
    valid = torch.arange(50, device=DEVICE) % 3 != 0
    scores, rows = exact_topk(codec, queries, packed, factors, valid, 60)  # more than the valid rows
    full = codec.score(queries, packed, factors).masked_fill(~valid, float("-inf"))
    assert scores.shape == rows.shape == (2, 60)
    torch.testing.assert_close(scores[:, :33], full.topk(33, dim=1).values)
    assert torch.isinf(scores[:, 33:]).all() and (rows[:, 33:] == -1).all() and (rows[:, :33] % 3 != 0).all()


def test_arguments_are_checked():
    codec, packed, factors, queries = encoded(2, "mse", 48, n=10, m=1)
    with pytest.raises(ValueError, match="power of two"):
        ScanConfig(mma=True, max_block_m=16, block_n=48, block_d=32, num_warps=4)
    with pytest.raises(ValueError, match="max_block_m >= 16"):
        ScanConfig(mma=True, max_block_m=8, block_n=16, block_d=32, num_warps=4)
    with pytest.raises(ValueError, match="dtype"):
        TritonScanner(codec, MMA, torch.float64)
    scanner = TritonScanner(codec)
    with pytest.raises(ValueError, match="from prepare"):
        scanner.chunk_topk(queries, packed, factors, None, 3)  # float32, not the scanner's float16
    with pytest.raises(ValueError, match="overflow"):
        scanner.prepare(queries * 1e6)


def test_dispatch_picks_the_kernel_form_by_batch_size():
    codec = TurboQuantCodec(48, 2)
    assert get_scanner(codec, "triton", queries=1).config == FMA
    assert get_scanner(codec, "triton", queries=2).config == get_scanner(codec, "triton", queries=64).config == MMA
    assert get_scanner(codec, "auto", "cuda", queries=1000).config == MMA


_COMPILE = """
import re, sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tqindex.codec import TurboQuantCodec
from tqindex.kernels.triton_int8 import lookup_asm, table_constants
from tqindex.kernels.triton_scan import FMA, INT8_MMA, MMA, _scan_kernel
from tqindex.kernels.triton_unpack import half_asm, half_tables, unpack_constants

# several index fields and signs; the FMA form; the int8 form at 4 and 2 bits, on CUDA and tensor cores;
# float16 register look-ups on tensor cores
cases = [(3.5, "prod", MMA, 0, False), (2, "mse", FMA, 0, False), (4, "mse", FMA, 4, False), (2, "mse", FMA, 2, False),
         (2, "mse", INT8_MMA, 2, False), (4, "mse", MMA, 0, True)]
for bits, variant, config, int8, half in cases:
    codec = TurboQuantCodec(768, bits, variant=variant)
    constants = unpack_constants(codec)
    signature = {
        "queries_ptr": ("*i8" if config.mma else "*i32") if int8 else "*fp16", "packed_ptr": "*i32" if int8 else "*u8", "factors_ptr": "*fp32",
        "valid_ptr": "*u8", "bias_ptr": "*fp32", "levels_ptr": "*fp32", "terms_ptr": "*fp32",
        "out_scores_ptr": "*fp32", "out_rows_ptr": "*i32", "out_dropped_ptr": "*fp32",
        **{name: "i32" for name in ("n_rows", "n_queries", "tiles_per_program", "stride_q", "stride_p", "stride_f")},
    }
    block_m = 64 if config.mma else 1
    constants.update(HAS_VALID=True, HAS_BIAS=True, MMA=config.mma, BLOCK_M=block_m, BLOCK_N=config.block_rows(block_m), BLOCK_D=config.block_d, PRECISION="tf32")
    constants["GATHER_ASM"] = constants.pop("GATHER_ASM")
    constants.update(INT8_WIDTH=int8, INT8_ASM=lookup_asm(codec) if int8 else "", INT8_TABLES=table_constants(codec) if int8 else ())
    tables = half_tables(codec, torch.float16) if half else ()
    constants.update(HALF=tables, HALF_ASM=half_asm(tables, bits) if half else "", HALF_WIDTH=bits if half else 0)
    assert constants["GATHER_ASM"], "compiled kernels gather by inline PTX"
    signature.update({name: "constexpr" for name in constants})
    names = list(signature)
    aligned = {(names.index(name),): [["tt.divisibility", 16]] for name in ("queries_ptr", "packed_ptr", "stride_q", "stride_p")}
    source = ASTSource(_scan_kernel, signature, constexprs={(names.index(k),): v for k, v in constants.items()}, attrs=aligned)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": config.num_warps})
    ptx = kernel.asm["ptx"]
    assert kernel.asm["cubin"], "no cubin"
    assert ("mma" in ptx) == config.mma, "tensor-core instructions where none were asked for, or none where they were"
    assert re.search(r"ld\\.global(\\.[a-z]+)*\\.v[24]\\.b32|ld\\.global(\\.[a-z]+)*\\.b32", ptx), "no wide loads of code bytes"
    if int8 or half:
        assert "prmt.b32" in ptx and "ld.global.nc.f32" not in ptx, "the int8 form and the register tables look levels up in registers"
    if int8:
        assert ("dp4a.s32.s32" in ptx) != config.mma, "DP4A on CUDA cores, int8 MMA on tensor cores"
    elif not half:
        assert "ld.global.nc.f32" in ptx, "codebooks of 4+ levels gather by inline PTX loads"

from tqindex.kernels.triton_scan import _rescore_kernel
for bits, variant in [(2.5, "prod"), (4, "mse")]:  # the rescoring kernel: two codebooks and signs; one field
    constants = unpack_constants(TurboQuantCodec(768, bits, variant=variant))
    constants.update(HAS_BIAS=True, BLOCK_C=64, BLOCK_D=64)  # in the kernel's order: unpack_constants' ends with GATHER_ASM
    signature = {name: "*fp32" for name in ("queries_ptr", "rows_ptr", "packed_ptr", "factors_ptr", "bias_ptr", "levels_ptr", "out_scores_ptr", "out_rows_ptr")}
    signature.update(rows_ptr="*i64", packed_ptr="*u8", out_rows_ptr="*i64")
    signature.update({name: "i32" for name in ("n_candidates", "k", "stride_q", "stride_r", "stride_p", "stride_f", "stride_o")})
    signature.update({name: "constexpr" for name in constants})
    names = list(signature)
    source = ASTSource(_rescore_kernel, signature, constexprs={(names.index(k),): v for k, v in constants.items()})
    assert triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["cubin"]

from tqindex.kernels.triton_encode import TILES, _quantize_kernel
for bits, variant, search in [(2.5, "prod", True)]:  # two codebooks, residual, code search
    layout = TurboQuantCodec(768, bits, variant=variant).layout
    signature = {name: "*fp32" for name in ("rotated_ptr", "inverse_ptr", "bounds_ptr", "levels_ptr", "grid_ptr")}
    signature.update(packed_ptr="*u8", alignment_ptr="*fp32", energy_ptr="*fp32", residual_ptr="*fp32", dot_steps_ptr="*i64", energy_steps_ptr="*i64")
    signature.update(row_start="i32", n_rows="i32", grid0="fp32", grid_last="fp32", inv_step="fp32")
    constants = dict(
        D=layout.dim, CODE_BYTES=layout.code_bytes, FIELDS=tuple((f.stop, f.width, f.shift, f.offset) for f in layout.index_fields),
        BASE_BITS=layout.base_bits, EXTRA=layout.extra_coords, SEARCH=search, RESIDUAL=variant == "prod", GRID=91, START=40,
        DOT_SCALE=2.0**56, ENERGY_SCALE=2.0**56, TIE=1e-12, BLOCK_R=TILES[search][0], BLOCK_D=TILES[search][1],
    )
    signature.update({name: "constexpr" for name in constants})
    names = list(signature)
    source = ASTSource(_quantize_kernel, signature, constexprs={(names.index(k),): v for k, v in constants.items()})
    assert triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["cubin"]
print("compiled")
"""


def test_kernels_compile_for_a_real_gpu(tmp_path):
    """The interpreter accepts code the compiler rejects: compile both scan forms, the rescoring
    kernel and the fused encoder for sm_90 (no GPU needed)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "TRITON_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


def test_index_search_through_the_triton_backend_equals_the_torch_backend():
    """A resident index on DEVICE (CPU under the interpreter, the GPU otherwise) against the CPU torch backend."""
    from tqindex import TurboQuantIndex

    rng = np.random.default_rng(5)
    x, q = rng.standard_normal((400, 48)).astype(np.float32), rng.standard_normal((3, 48)).astype(np.float32)
    indexes = {
        "triton": TurboQuantIndex(48, 3, backend="triton", chunk_rows=150).to(DEVICE),  # resident: the lean search
        "torch": TurboQuantIndex(48, 3, backend="torch", chunk_rows=150),
    }
    for index in indexes.values():
        index.add(x)
        index.remove_ids(np.arange(0, 400, 5))
    for kwargs in ({}, {"filter": np.arange(100, 300)}):
        for got, want in zip(indexes["triton"].search(q, 12, **kwargs), indexes["torch"].search(q, 12, **kwargs)):
            np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("config", [SMALL_FMA, SMALL_MMA], ids=["fma", "mma"])
def test_kernel_adds_the_row_bias_before_selecting(config):
    """The L2 index's per-row bias: scores are ``codec.score + bias``, and the top-k is taken on them."""
    n = 70
    codec, packed, factors, queries = encoded(3, "mse", 48, n, m=2, seed=7)
    bias = torch.linspace(-2, 2, n).to(DEVICE)
    scanner = TritonScanner(codec, config, torch.float32, tiles_per_program=2)
    scores, rows = scanner.chunk_topk(scanner.prepare(queries), packed, factors, None, 9, bias=bias)
    expected, expected_rows = (codec.score(queries, packed, factors) + bias).topk(9, dim=1)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(rows, expected_rows)


@pytest.mark.parametrize("scale", [1.0, 3e4])
def test_l2_index_search_through_the_triton_backend_equals_the_torch_backend(scale):
    """As above with the L2 bias, the Triton index on DEVICE (a CPU index with backend="triton"
    runs only under the interpreter); l2 queries are not rescaled, so norms past float16's range
    (``scale`` 3e4: ~2e5) take the scan's float32 form instead of overflowing its float16 one."""
    from tqindex import TurboQuantIndex

    rng = np.random.default_rng(6)
    x = ((rng.standard_normal((300, 48)) + 2) * scale).astype(np.float32)
    q = ((rng.standard_normal((3, 48)) + 2) * scale).astype(np.float32)
    indexes = {
        "triton": TurboQuantIndex(48, 4, metric="l2", backend="triton", chunk_rows=120).to(DEVICE),
        "torch": TurboQuantIndex(48, 4, metric="l2", backend="torch", chunk_rows=120),
    }
    for index in indexes.values():
        index.add(x)
    for got, want in zip(indexes["triton"].search(q, 8), indexes["torch"].search(q, 8)):
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_search_graphs_return_what_the_eager_resident_search_returns():
    """`SearchGraphs` (CUDA graphs on a GPU; on CPU tensors the eager path) against `search_resident`,
    as rows are added and removed (the graphs read the columns by address, so they are dropped);
    copies and pickles start empty."""
    import copy
    import pickle

    from tqindex import TurboQuantIndex
    from tqindex.kernels.graphs import SearchGraphs

    rng = np.random.default_rng(9)
    index = TurboQuantIndex(48, 4, metric="l2", backend="triton", chunk_rows=150).to(DEVICE)
    index.add(rng.standard_normal((300, 48)).astype(np.float32))
    index._graphs = SearchGraphs(max_queries=32)  # off by default until measured on a GPU
    q = rng.standard_normal((3, 48)).astype(np.float32)
    for step in range(3):
        scanner = get_scanner(index.codec, "triton", DEVICE, 3)
        rotated = index.codec.rotate_queries(torch.from_numpy(q)).to(DEVICE)
        packed, factors, norms = index._resident
        args = (index.codec, scanner, rotated, packed, factors, index._valid_rows(None), 7, index._resident_bias())
        for got, want in zip(index._graphs.search(*args), search_resident(*args)):
            torch.testing.assert_close(got, want)
        if DEVICE.type == "cuda":
            assert any(g is not None for g in index._graphs._graphs.values()), "nothing was captured"
        if step == 0:
            index.add(rng.standard_normal((40, 48)).astype(np.float32))
        else:
            index.remove_ids(np.arange(step, 300, 7))
    assert not copy.deepcopy(index._graphs)._graphs and not pickle.loads(pickle.dumps(index._graphs))._graphs
    assert isinstance(copy.deepcopy(index)._graphs, SearchGraphs)


_BF16_ON_GPU = pytest.mark.skipif(DEVICE.type != "cuda", reason="the interpreter rounds float32 to bfloat16 toward zero; GPUs and torch to nearest")


@pytest.mark.parametrize("bits, variant, dim, dtype", [
    (4, "mse", 96, torch.float16), (2, "mse", 80, torch.float16), (3, "prod", 64, torch.float16),
    pytest.param(2, "mse", 80, torch.bfloat16, marks=_BF16_ON_GPU),
])  # fmt: skip
def test_register_tables_give_the_tensor_cores_the_same_operands(bits, variant, dim, dtype):
    """`TritonScanner(..., register_tables=True)`: 4- and 2-bit levels (2-bit prod indices beside their
    signs) looked up by byte permutes are the gathered levels rounded to the queries' type, so the
    candidates are the same, scores bit for bit; dims past the last 64-coordinate step included."""
    codec, packed, factors, queries = encoded(bits, variant, dim, 150, m=5, seed=4)
    config = ScanConfig(mma=True, max_block_m=16, block_n=16, block_d=64, num_warps=4)
    gathers = TritonScanner(codec, config, dtype)
    tables = TritonScanner(codec, config, dtype, register_tables=True)
    assert tables._half["HALF_WIDTH"] == register_width(codec) > 0 and packed.data_ptr() % 4 == 0  # the look-ups run
    prepared = gathers.prepare(queries)
    want = gathers.candidates(prepared, packed, factors, None, 12)
    got = tables.candidates(prepared, packed, factors, None, 12)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert TritonScanner(codec, SMALL_FMA, dtype, register_tables=True)._half["HALF_WIDTH"] == 0  # CUDA cores: float32 levels, gathered


@pytest.mark.parametrize("bits, variant", [(4, "mse"), (2.5, "prod")])
def test_rescore_kernel_equals_the_torch_rescoring(bits, variant):
    """`TritonScanner.rescore` (one launch) against `scan.rescore_resident`: the same rows in the same
    order (equal scores, from duplicated codes, by lower row first), scores to float32 rounding, with
    a bias, padding candidates (-1), and more result slots than candidates ((-inf, -1) there)."""
    from tqindex.kernels.scan import rescore_resident

    codec, packed, factors, queries = encoded(bits, variant, 48, 120, m=6, seed=9)
    packed[10:20], factors[10:20] = packed[3], factors[3]  # rows 3 and 10-19 tie for every query
    bias = torch.linspace(-0.1, 0.1, 120, device=DEVICE)
    bias[10:20] = bias[3]
    rng = np.random.default_rng(2)
    tied = [3, 15, 10, 19, 11, 12, 13, 14, 16, 17, 18, 20]
    others = np.setdiff1d(np.arange(120), tied)
    rows = torch.from_numpy(np.stack([np.concatenate([tied, rng.permutation(others)[:18]]) for _ in range(6)])).to(DEVICE)  # distinct, as candidates are
    rows[2, 20:] = -1
    rows[4] = -1
    scanner = TritonScanner(codec, SMALL_MMA)
    for bias_ in (None, bias):
        for k in (5, 40):
            want = rescore_resident(codec, queries, rows, packed, factors, bias_, k)
            got = scanner.rescore(queries, rows, packed, factors, bias_, k)
            assert torch.equal(got[1], want[1])
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert (got[1][4] == -1).all() and torch.isinf(got[0][4]).all()


def test_search_launches_counts_a_resident_search(tmp_path):
    """benchmarks/search_launches.py runs a resident search in the interpreter and counts its device
    work: the scan and the rescoring kernel, and no torch rescoring (no bmm or gather of codes)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_CACHE_DIR": str(tmp_path), "PYTHONPATH": f"{root}{os.pathsep}{root / 'benchmarks'}"}
    script = [sys.executable, str(root / "benchmarks" / "search_launches.py"), "--rows", "300", "--dim", "32"]
    done = subprocess.run(script, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Triton launches: 2 (_scan_kernel 1, _rescore_kernel 1)" in done.stdout, done.stdout
    assert "bmm" not in done.stdout and "embedding" not in done.stdout, done.stdout


def test_results_reach_the_host_in_one_buffer():
    """`scan.to_host` copies a search's scores, rows and flags as one buffer; its views give each back."""
    from tqindex.kernels.scan import _one_buffer, to_host

    scores = torch.randn(5, 7)[:, ::2]  # not contiguous
    rows, flags = torch.arange(-3, 12).reshape(3, 5), torch.tensor([True, False, True])
    half = torch.randn(3).half()
    got = _one_buffer((flags, scores, half, rows))  # any order of item sizes
    for g, want in zip(got, (flags, scores, half, rows)):
        assert g.dtype == want.dtype and torch.equal(g, want)
    assert to_host(scores, rows)[0] is scores  # CPU tensors stay as they are
