"""The fused GPU encoder (``kernels.triton_encode``) against ``codec.encode``: the same packed bytes.

Interpreter on CPU tensors (``TRITON_INTERPRET=1``), or a GPU with ``TRITON_INTERPRET=0``. Tiny shapes.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

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
