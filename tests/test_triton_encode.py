"""The fused GPU encoder (``kernels.triton_encode``) against ``codec.encode``: the same packed bytes.

Interpreter on CPU tensors (``TRITON_INTERPRET=1``), or a GPU with ``TRITON_INTERPRET=0``. Tiny shapes.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from triton_device import DEVICE
from tqindex.codec import TurboQuantCodec
from tqindex.kernels import triton_encode

pytestmark = pytest.mark.triton

# every field width, fractional layouts (two codebooks), prod (residual, signs), code search; dims not multiples of the block
CASES = [
    (1, "mse", 48, False),
    (2, "mse", 100, False),
    (2.5, "mse", 64, False),
    (3, "mse", 70, False),
    (4, "mse", 64, False),
    (6, "mse", 48, False),
    (8, "mse", 100, False),
    (1, "prod", 64, False),
    (3.5, "prod", 100, False),
    (3, "mse", 48, True),
    (2.5, "prod", 64, True),
]


@pytest.mark.parametrize("bits, variant, dim, search", CASES)
def test_fused_encode_equals_codec_encode(bits, variant, dim, search):
    codec = TurboQuantCodec(dim, bits, variant=variant, search=search, seed=dim)
    x = torch.from_numpy(np.random.default_rng(int(bits * 8)).standard_normal((21, dim)).astype(np.float32)) * 3
    x[4] = 0  # a zero vector: norm 0, scale 0
    want = codec.encode(x)
    got = triton_encode.encode(codec, x.to(DEVICE))
    assert got.packed.device.type == DEVICE.type
    assert torch.equal(got.packed.cpu(), want.packed)  # bit for bit
    torch.testing.assert_close(got.factors.cpu(), want.factors, rtol=2e-6, atol=1e-7)  # sums in another order


def test_quantize_gives_the_pieces():
    """The lower-level API: alignment <u, c> and the residual u - c, as codec._quantize gives them."""
    codec = TurboQuantCodec(64, 3, variant="prod")
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((9, 64)).astype(np.float32))
    norms = torch.linalg.vector_norm(x, dim=1)
    rotated = codec.rotation.forward(x)
    indices, alignment, residual, energy = codec._quantize(rotated, norms, keep_residual=True)
    parts = triton_encode.quantize(codec, rotated.to(DEVICE), norms.to(DEVICE), keep_residual=True)
    assert parts.energy is None and energy is None
    torch.testing.assert_close(parts.alignment.cpu(), alignment, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(parts.residual.cpu(), residual)
    assert torch.equal(parts.packed.cpu()[:, : codec.layout.sign_field.offset], codec.layout.pack(indices, residual > 0)[:, : codec.layout.sign_field.offset])


def test_bad_input_is_refused():
    codec = TurboQuantCodec(16, 2)
    with pytest.raises(ValueError, match="NaN"):
        triton_encode.encode(codec, torch.full((2, 16), float("nan"), device=DEVICE))
    with pytest.raises(ValueError, match="overflows float32"):
        triton_encode.encode(codec, torch.full((1, 16), 3e38, device=DEVICE))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="kernels.encode takes the fused path on CUDA tensors only")
def test_kernels_encode_takes_the_fused_path_on_cuda(monkeypatch):
    from tqindex import kernels

    codec = TurboQuantCodec(96, 4)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((300, 96)).astype(np.float32))
    calls = []
    monkeypatch.setattr(triton_encode, "quantize", lambda *a, **kw: calls.append(1) or _quantize(*a, **kw))
    got = kernels.encode(codec, x.to(DEVICE))
    assert calls and torch.equal(got.packed.cpu(), codec.encode(x).packed)


_quantize = triton_encode.quantize


@pytest.mark.parametrize("bits, dim", [(2, 64), (4, 128), (8, 32)])
def test_code_search_sweep_equals_codec_encode_across_launches(bits, dim, monkeypatch):
    """Code search by crossings (`_add_crossings`, `_best_scaling`) against the numba sweep: Gaussian
    rows, tiny rows, rows whose rotated form has one coordinate of 0.6-0.95 (its level moves across
    many boundaries, several in one grid step at 8 bits) and a zero row; several launches of few
    rows share one scratch (zeroed between them). No row has two scalings whose codes tie exactly
    (proportional codes, as a Hadamard-rotated one-hot vector gives): those may go either way."""
    monkeypatch.setitem(triton_encode.TILES, True, (16, 16))
    monkeypatch.setattr(triton_encode, "_SEARCH_ROWS", 48)  # two launches
    codec = TurboQuantCodec(dim, bits, search=True, seed=3)
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((90, dim)).astype(np.float32)
    x[10:20] *= 1e-3
    x[40] = 0
    spike = 0.05 * rng.standard_normal((20, dim)).astype(np.float32)
    spike[np.arange(20), rng.integers(0, dim, 20)] = np.linspace(0.6, 0.95, 20, dtype=np.float32)
    x[20:40] = codec.rotation.inverse(torch.from_numpy(spike)).numpy()
    x = torch.from_numpy(x)
    want = codec.encode(x)
    got = triton_encode.encode(codec, x.to(DEVICE))
    assert torch.equal(got.packed.cpu(), want.packed)
    torch.testing.assert_close(got.factors.cpu(), want.factors, rtol=2e-6, atol=1e-7)


def test_fixed_point_units_bound_the_crossing_sums():
    """The sums of `_add_crossings` stay below 2^62 units for the worst row (all of |u| on one
    coordinate moving across every level), at any width and dim."""
    for dim, bits in ((2, 1), (64, 4), (1536, 8), (96, 2.5)):
        codec = TurboQuantCodec(dim, bits, search=True)
        dot_scale, energy_scale = triton_encode._fixed_point_scales(codec)
        top = float(codec.levels.abs().max())
        assert 2 * top * np.sqrt(dim) * 1.01 * dot_scale < 2**62  # sum |u_j| <= sqrt(D) |u|
        assert 2 * top * top * dim * energy_scale < 2**62
        assert 2 * top * dot_scale >= 2**52  # and keep float64's precision: one unit is below 2^-52 of a level step


@triton.jit
def _crossings_of(bounds_ptr, units_ptr, grid_ptr, out_ptr, grid0, inv_step, LAST: tl.constexpr, N: tl.constexpr):
    at = tl.arange(0, N)
    unit = tl.load(units_ptr + at)
    tl.store(out_ptr + at, triton_encode._crossing(tl.load(bounds_ptr + at), unit, unit != 0, grid_ptr, grid0, inv_step, LAST))


def test_crossing_points_equal_the_numba_sweeps():
    """`_crossing` on coordinates ``bound / t`` for grid points ``t`` and their float32 neighbours, where
    the division's estimate is off by one either way (about 7% of them) and the exact float32
    comparisons settle it: the grid index equals ``quantize._crossing``'s, rising and falling."""
    from tqindex.quantize import _crossing

    codec = TurboQuantCodec(64, 4, search=True)
    rng = np.random.default_rng(0)
    bounds, grid = codec._bounds_lo.numpy(), codec._search_grid
    n = 1024
    bound = bounds[rng.integers(0, bounds.shape[0], n)]
    unit = (bound / grid[rng.integers(1, grid.shape[0], n)]).astype(np.float32)
    toward = np.where(rng.random(n) < 0.6, rng.choice([-np.inf, np.inf], n), unit).astype(np.float32)  # a neighbour, or itself
    unit = np.nextafter(unit, toward)
    inv_step = (grid.shape[0] - 1) / float(grid[-1] - grid[0])
    moves = (grid[0] * unit > bound) != (grid[-1] * unit > bound)  # the predicate changes inside the grid
    want = [_crossing(b, u, grid, inv_step, u > 0) if m else 1 for b, u, m in zip(bound, unit, moves)]
    out = torch.zeros(n, dtype=torch.int32, device=DEVICE)
    units = torch.from_numpy(np.where(moves, unit, 0).astype(np.float32)).to(DEVICE)
    _crossings_of[(1,)](torch.from_numpy(bound).to(DEVICE), units, codec._search_grid_t.to(DEVICE), out, float(grid[0]), inv_step, grid.shape[0] - 1, n)
    assert moves.sum() > n // 2
    np.testing.assert_array_equal(out.cpu().numpy(), want)


def test_the_sass_tool_finds_the_code_search_loops(tmp_path):
    """benchmarks/encode_kernel_sass.py compiles the encoder for sm_90 (no GPU needed) and finds the
    loops its count rests on: coordinate blocks holding crossing rounds holding the settling loop,
    then the per-row sweeps (the best key; the choice) and the last pass."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path), "PYTHONPATH": f"{root}{os.pathsep}{root / 'benchmarks'}"}
    case = "d = 128, 2 bits, code search"
    script = [sys.executable, str(root / "benchmarks" / "encode_kernel_sass.py"), "--scratch", str(tmp_path), "--rows", "256", "--cases", case]
    done = subprocess.run(script, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    cells = next(line for line in done.stdout.splitlines() if line.startswith(f"| {case}")).split(" | ")
    assert len(cells[3].split(" / ")) == 6, cells  # crossings, rounds, settling, two sweeps, last pass
    assert float(cells[5]) > 0, cells


@pytest.mark.parametrize("dim, bits", [(2, 2), (3, 4), (4, 2)])
def test_code_search_ties_resolve_as_on_the_cpu(dim, bits):
    """At d <= 4 the codes at two scalings are often proportional (every coordinate one cell out):
    equal cosines that only float64 rounding orders, and each encoder rounds differently (the
    kernel sums fixed-point changes and compares cross products). Keys within
    ``quantize.SEARCH_TIE`` count as tied in every encoder, so the GPU picks the CPU's codes on
    every row (without it, 0.5-5% of these rows differed)."""
    codec = TurboQuantCodec(dim, bits, search=True, seed=1)
    x = torch.randn(2000, dim, generator=torch.Generator().manual_seed(dim))
    assert torch.equal(triton_encode.encode(codec, x.to(DEVICE)).packed.cpu(), codec.encode(x).packed)


@pytest.mark.parametrize("search", [False, True])
def test_vectors_near_the_ends_of_float32_encode_as_on_the_cpu(search):
    """Rows scaled by a power of two first, as `codec.encode` does: tiny rows (whose norm would
    underflow) and huge ones (whose squares would overflow) get the CPU's codes and factors."""
    codec = TurboQuantCodec(64, 3, search=search)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    x[0] *= 1e-30
    x[1] *= 1e19
    x[2] = 1e-40  # subnormal
    want = codec.encode(x)
    got = triton_encode.encode(codec, x.to(DEVICE))
    assert torch.equal(got.packed.cpu(), want.packed)
    torch.testing.assert_close(got.factors.cpu(), want.factors, rtol=2e-6, atol=0)
    assert (got.factors[:3] > 0).all()


def test_unchecked_encode_marks_bad_rows_instead_of_reading_the_device():
    """``check=False`` (the KV cache's flush): the same codes, no read back to the host (which on a GPU
    waits for it), and NaN factors for the rows a check would refuse, so that the caller's own check of
    the factors finds them: a NaN row would otherwise get factor 0, a zero vector."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.reads = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("_local_scalar_dense", "nonzero", "is_nonzero", "masked_select"):
                self.reads.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    codec = TurboQuantCodec(64, 3, search=True)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(4))
    x[1] *= 1e19  # scaled by a power of two, as when checked
    x[2] = 1e-40
    checked = triton_encode.encode(codec, x.to(DEVICE))
    x[4, 5], x[5, 0], x[6] = float("nan"), float("inf"), 3e38  # NaN, inf, a norm that overflows float32
    log = Reads()
    with log:
        unchecked = triton_encode.encode(codec, x.to(DEVICE), check=False)
    assert log.reads == []
    assert torch.equal(unchecked.packed[:4].cpu(), checked.packed[:4].cpu())
    assert torch.equal(unchecked.factors[:4].cpu(), checked.factors[:4].cpu())
    assert not torch.isfinite(unchecked.factors[4:]).any()
