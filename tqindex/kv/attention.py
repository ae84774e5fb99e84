"""Attention over TurboQuant codes, registered with transformers' attention interface as "turboquant".

For one (batch, KV head) pair, query rows ``q_m`` (the query heads of its GQA group times the
query positions) and stored tokens ``j``: ``logit_mj = scaling * <q_m, k_j> + bias_mj``, with
``<q_m, k_j>`` the codec's estimator on the key codes (queries rotated once), and the output
``sum_j softmax_j * v_j``, whose code part is accumulated in rotated space and rotated back once
(`TurboQuantCodec.accumulate` / `finish`). No token is decoded to a dense vector. The dense window is attended exactly and
merged with the code part by the usual max/sum-of-exponentials rescaling.

Two backends compute the same function: torch (here: queries in blocks of positions, an online
softmax over blocks of tokens, so memory is linear in both) and the Triton kernels of
`tqindex.kv.triton_attention` (split-K decode over the codes, then a merge with the window).
Anything this path does not support (dropout, softcapping, sinks, attention weights, masks per
head, dense inputs) goes to transformers' sdpa on dense tensors.

Shapes: ``B`` batch, ``Hq`` query heads, ``H`` KV heads, ``g = Hq / H``, ``L`` query length,
``T = Tc + Tw`` keys (codes, then window), ``d`` head dim, ``N = B * H``, ``M = g * L``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tqindex.codec import Codes, TurboQuantCodec
from tqindex.kv.compressed import CompressedKV, as_dense, map_codes

ATTENTION_NAME = "turboquant"
_TOKEN_BLOCK = 1024  # tokens scored per step by the torch backend: bounds its transient buffers
_QUERY_BLOCK = 256  # query positions per step of the torch backend: memory linear in the query length
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "position_bias")


@torch.compiler.disable  # under torch.compile: one opaque call between compiled regions (see docs/kv-cache.md)
def turboquant_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention contract: query ``(B, Hq, L, d)``, key/value ``(B, H, T, d)`` -> ``((B, L, Hq, d), None)``."""
    if _codes_path_applies(query, key, value, attention_mask, dropout, kwargs):
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = codes_attention(query, key, value, attention_mask, scaling=scale, causal=causal)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(
        module, query, as_dense(key), as_dense(value), attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def _codes_path_applies(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, dropout: float, kwargs: dict
) -> bool:
    if not (isinstance(key, CompressedKV) and isinstance(value, CompressedKV)):
        return False
    if key.encoded_len == 0 or key.encoded_len != value.encoded_len:
        return False
    if dropout > 0 or kwargs.get("output_attentions") or any(kwargs.get(name) is not None for name in _UNSUPPORTED_KWARGS):
        return False
    if query.shape[1] % key.shape[1] or query.shape[-1] != key.shape[-1]:
        return False
    expected = (query.shape[2], key.shape[2])
    return mask is None or (isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[1] == 1 and tuple(mask.shape[2:]) == expected)


def codes_attention(
    query: torch.Tensor,
    key: CompressedKV,
    value: CompressedKV,
    mask: torch.Tensor | None = None,
    *,
    scaling: float,
    causal: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax attention over compressed keys and values: query ``(B, Hq, L, d)`` -> ``(B, Hq, L, dv)``.

    mask: ``(B or 1, 1, L, T)``, bool (True attends) or additive float; when None and ``causal``,
    query ``i`` sees keys ``<= T - L + i``. backend: "auto", "torch" or "triton" (default: the key's).
    Memory is linear in ``L`` and ``T``: queries in blocks of positions, keys in blocks of tokens.
    """
    q_heads, heads = query.shape[1], key.shape[1]
    if q_heads % heads:
        raise ValueError(f"{q_heads} query heads do not split into groups over {heads} KV heads")
    if _backend(backend or key.backend, query.device, key.codec, value.codec) == "triton":
        from tqindex.kv.triton_attention import triton_codes_attention

        return triton_codes_attention(query, key, value, mask, scaling=scaling, causal=causal)
    key_codes, value_codes = (map_codes(kv.float_codes(), lambda a: a.flatten(0, 1)) for kv in (key, value))  # (N, Tc, .)
    q_len = query.shape[2]
    blocks = [
        _torch_attention(query[:, :, s : s + _QUERY_BLOCK], key, value, key_codes, value_codes, mask, scaling, causal, s, q_len)
        for s in range(0, q_len, _QUERY_BLOCK)
    ]
    return torch.cat(blocks, dim=2) if len(blocks) > 1 else blocks[0]


def _torch_attention(
    query: torch.Tensor,
    key: CompressedKV,
    value: CompressedKV,
    key_codes: Codes,
    value_codes: Codes,
    mask: torch.Tensor | None,
    scaling: float,
    causal: bool,
    first: int,
    q_len: int,
) -> torch.Tensor:
    """`codes_attention` in torch for the query positions ``first .. first + query.shape[2]`` of ``q_len``."""
    batch, q_heads, length, dim = query.shape
    heads, tokens, encoded = key.shape[1], key.shape[2], key.encoded_len
    group = q_heads // heads
    bias = _bias(mask, causal, first, length, q_len, tokens, query.device).expand(batch, length, tokens)  # (B, l, T)
    # (B, Hq, l, d) -> (N, M, d): the query heads of a KV head's group, then positions
    q = query.float().reshape(batch * heads, group * length, dim)

    rotated = key.codec.rotate_rows(q.reshape(-1, dim)).view(batch * heads, group * length, -1)  # unchecked, as in the Triton path
    acc, top, total = _partial_torch(rotated, key_codes, value_codes, bias[..., :encoded], heads, scaling, key.codec, value.codec)
    if key.offset is not None:  # the codes hold keys minus the offset: add q . offset to their logits
        offset_logits = q.view(batch, heads, group * length, dim) @ key.offset.float().view(batch, heads, dim, 1)
        top = top + scaling * offset_logits.view_as(top)

    # the dense window, exactly, merged with the code part
    window_logits = (q.view(batch, heads, group * length, dim) @ key.window.float().transpose(-1, -2)) * scaling
    window_logits = window_logits.view(batch, heads, group, length, -1) + bias[:, None, None, :, encoded:]
    window_logits = window_logits.view(batch, heads, group * length, -1)
    top = top.view(batch, heads, group * length)
    shift = torch.cat([top[..., None], window_logits], dim=-1).amax(dim=-1)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    code_weight = torch.exp(top - shift)
    window_weights = torch.exp(window_logits - shift[..., None])
    code_part = value.codec.finish(acc.view(batch, heads, group * length, -1) * code_weight[..., None])
    numerator = code_part + window_weights @ value.window.float()
    denominator = code_weight * total.view_as(code_weight) + window_weights.sum(dim=-1)
    out = numerator / denominator.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    return out.view(batch, q_heads, length, -1).to(query.dtype)


def _bias(
    mask: torch.Tensor | None, causal: bool, first: int, length: int, q_len: int, tokens: int, device: torch.device
) -> torch.Tensor:
    """Additive float32 bias ``(B or 1, length, T)`` of query positions ``first ..`` (of ``q_len``) from a
    4-D mask, or the causal pattern, or zeros."""
    if mask is not None:
        mask = mask[:, 0, first : first + length]
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, device=device).masked_fill_(~mask, float("-inf"))
        return mask.float()
    bias = torch.zeros((1, length, tokens), device=device)
    if causal and q_len > 1:
        positions = torch.arange(first, first + length, device=device)[:, None] + (tokens - q_len)
        bias[0].masked_fill_(torch.arange(tokens, device=device)[None, :] > positions, float("-inf"))
    return bias


def _partial_torch(
    queries: torch.Tensor,
    key_codes: Codes,
    value_codes: Codes,
    bias: torch.Tensor,
    heads: int,
    scaling: float,
    key_codec: TurboQuantCodec,
    value_codec: TurboQuantCodec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The code part of attention: rotated queries ``(N, M, Dq)``, codes ``(N, Tc, .)``, bias ``(B, l, Tc)``.

    An online softmax over blocks of `_TOKEN_BLOCK` tokens. Returns the unnormalised rotated value
    accumulator ``(N, M, Dacc)`` and, per row, the max logit ``(N, M)`` and the sum of
    ``exp(logit - max)`` ``(N, M)``.
    """
    n, rows, _ = queries.shape
    batch, length, encoded = bias.shape
    top = queries.new_full((n, rows), float("-inf"))
    total = queries.new_zeros((n, rows))
    acc = queries.new_zeros((n, rows, value_codec.rotated_dim * value_codec.n_factors))
    for start in range(0, encoded, _TOKEN_BLOCK):
        block = slice(start, start + _TOKEN_BLOCK)
        logits = key_codec.score(queries, key_codes.packed[:, block], key_codes.factors[:, block]) * scaling
        width = logits.shape[-1]
        logits = (logits.view(batch, heads, rows // length, length, width) + bias[:, None, None, :, block]).view(n, rows, width)
        new_top = torch.maximum(top, logits.amax(dim=-1))
        shift = torch.where(torch.isfinite(new_top), new_top, torch.zeros_like(new_top))
        alpha = torch.exp(top - shift)
        weights = torch.exp(logits - shift[..., None])
        total = total * alpha + weights.sum(dim=-1)
        acc = acc * alpha[..., None] + value_codec.accumulate(weights, value_codes.packed[:, block], value_codes.factors[:, block])
        top = new_top
    return acc, top, total


def _backend(backend: str, device: torch.device, key_codec: TurboQuantCodec, value_codec: TurboQuantCodec) -> str:
    """"torch" or "triton" for ``backend``.

    "auto" is Triton on CUDA when triton is installed, keys and values share a rotated dim and
    both are scalar codes (what the kernels support), torch otherwise.
    """
    scalar = key_codec.trellis is None and value_codec.trellis is None
    if backend == "auto":
        kernel_fits = key_codec.rotated_dim == value_codec.rotated_dim and scalar
        return "triton" if device.type == "cuda" and kernel_fits and _triton_installed() else "torch"
    if backend == "torch":
        return backend
    if backend != "triton":
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if not scalar:
        raise ValueError("the Triton backend reads scalar codes only: use backend='torch' (or 'auto') with quantizer='trellis'")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton backend needs a CUDA device, or TRITON_INTERPRET=1 set before triton is imported")
    return backend


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def register() -> None:
    """Register "turboquant" with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, turboquant_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
