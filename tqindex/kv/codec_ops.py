"""Batched codec operations that attention over codes needs, on top of `TurboQuantCodec`'s public API.

Shapes: ``N`` batch of (batch, head) pairs, ``M`` query rows, ``T`` stored tokens, ``D`` the
codec's rotated dim, ``C`` its code bytes, ``F`` its factors per vector (1 mse, 2 prod).

* `score`: the inner-product estimator of ``TurboQuantCodec.score`` with a leading batch dim.
* `accumulate`: the value side: ``sum_j w_j decode(code_j)`` computed in rotated space, as
  ``sum_j w_j [s_j c[idx_j], g_j sign_j]`` (``(N, M, D)`` for mse, ``(N, M, 2D)`` for prod),
  and `finish` rotates that accumulator back once: ``P^T (acc[:D] + acc[D:] S)``. So
  ``finish(accumulate(w, codes)) == w @ decode(codes)`` without decoding any token.

These belong in the codec (DESIGN.md section 2: one codec, features go into it); they are here,
built only on its public methods, until the codec grows batched ``score``/``accumulate``/``finish``.
"""

from __future__ import annotations

import torch

from tqindex.codec import TurboQuantCodec


def _flat(codec: TurboQuantCodec, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Packed ``(N, T, C)`` -> unscaled levels ``(N, T, D)`` and, for prod, signs +-1 ``(N, T, D)``."""
    n, t, c = packed.shape
    rows = packed.reshape(n * t, c)
    levels = codec.dequantize(rows).view(n, t, -1)
    signs = codec.signs(rows).view(n, t, -1) if codec.qjl is not None else None
    return levels, signs


def score(codec: TurboQuantCodec, queries: torch.Tensor, packed: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Estimated inner products: rotated queries ``(N, M, D or 2D)``, codes of ``(N, T)`` tokens -> ``(N, M, T)``."""
    dim = codec.rotated_dim
    levels, signs = _flat(codec, packed)
    factors = factors.float()
    scores = (queries[..., :dim] @ levels.transpose(1, 2)) * factors[:, None, :, 0]
    if signs is not None:
        scores += (queries[..., dim:] @ signs.transpose(1, 2)) * factors[:, None, :, 1]
    return scores


def accumulate(codec: TurboQuantCodec, weights: torch.Tensor, packed: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``sum_j weights[.., j] * code_j`` in rotated space: weights ``(N, M, T)`` -> ``(N, M, D)`` (prod: ``2D``)."""
    levels, signs = _flat(codec, packed)
    factors = factors.float()
    acc = weights @ (levels * factors[..., :1])
    if signs is None:
        return acc
    return torch.cat([acc, weights @ (signs * factors[..., 1:2])], dim=-1)


def finish(codec: TurboQuantCodec, acc: torch.Tensor) -> torch.Tensor:
    """Rotated accumulator ``(..., D)`` (prod: ``(..., 2D)``) -> vectors ``(..., d)`` in the input space."""
    dim = codec.rotated_dim
    rotated = acc[..., :dim]
    if codec.qjl is not None:
        rotated = rotated + acc[..., dim:] @ codec.qjl.to(acc.device)
    shape = rotated.shape
    return codec.rotation.inverse(rotated.reshape(-1, dim)).view(*shape[:-1], codec.dim)
