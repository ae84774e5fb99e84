"""`CompressedKV`: one layer's keys (or values) as the cache holds them, codes then a dense window.

The cache returns these from ``update`` in place of dense ``(batch, heads, seq, head_dim)``
tensors. The codes-domain attention (`tqindex.kv.attention`) reads the codes directly; any
other consumer (sdpa, eager, flex attention...) sees an ordinary tensor: the first torch op
on it decodes the codes once and runs on the dense result. So the cache works with every
attention implementation, and only the TurboQuant one avoids the dense copy.

Shapes: ``B`` batch, ``H`` KV heads, ``Tc`` encoded tokens, ``Tw`` window tokens, ``d`` head dim,
``C`` code bytes, ``F`` factors per vector.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_map

from tqindex.codec import Codes, TurboQuantCodec
from tqindex.kv.factors import LogByteFactors


class CompressedKV(torch.Tensor):
    """A ``(B, H, Tc + Tw, d)`` tensor stored as ``Tc`` tokens of codes followed by ``Tw`` dense ones.

    Attributes:
        codec: the codec of the codes.
        codes: ``Codes`` as stored: ``packed`` uint8 ``(B, H, Tc, C)`` and ``factors`` ``(B, H, Tc, F)``
            (floats, or uint8 log codes with ``log_factors``); any strides.
        window: the dense tokens, ``(B, H, Tw, d)``, in the model's dtype.
        backend: how attention over these codes runs: "auto", "torch" or "triton".
        offset: None, or ``(B, H, 1, d)`` added to every decoded token (the codes hold
            vectors minus it: the cache's key centring).
        log_factors: None (float factors), or the decoder of one-byte log factors.
    """

    codec: TurboQuantCodec
    codes: Codes
    window: torch.Tensor
    backend: str
    offset: torch.Tensor | None
    log_factors: LogByteFactors | None

    @staticmethod
    def __new__(
        cls,
        codec: TurboQuantCodec,
        codes: Codes,
        window: torch.Tensor,
        backend: str = "auto",
        offset: torch.Tensor | None = None,
        log_factors: LogByteFactors | None = None,
    ) -> "CompressedKV":
        batch, heads, window_len, dim = window.shape
        shape = (batch, heads, codes.packed.shape[2] + window_len, dim)
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=window.dtype, device=window.device)

    def __init__(
        self,
        codec: TurboQuantCodec,
        codes: Codes,
        window: torch.Tensor,
        backend: str = "auto",
        offset: torch.Tensor | None = None,
        log_factors: LogByteFactors | None = None,
    ):
        self.codec, self.codes, self.window, self.backend = codec, codes, window, backend
        self.offset, self.log_factors = offset, log_factors

    @property
    def encoded_len(self) -> int:
        """``Tc``: the number of tokens held as codes."""
        return int(self.codes.packed.shape[2])

    def float_codes(self) -> Codes:
        """The codes with float32 factors (log codes decoded): what the codec reads."""
        factors = self.codes.factors
        factors = factors.float() if self.log_factors is None else self.log_factors.decode(factors)
        return Codes(self.codes.packed, factors)

    def decoded(self) -> torch.Tensor:
        """The encoded tokens decoded, ``(B, H, Tc, d)`` in the window's dtype."""
        codes = self.float_codes()
        packed, factors = codes.packed, codes.factors
        batch, heads, tokens, code_bytes = packed.shape
        flat = Codes(packed.reshape(-1, code_bytes), factors.reshape(-1, factors.shape[-1]).float())
        decoded = self.codec.decode(flat).view(batch, heads, tokens, -1)
        return (decoded if self.offset is None else decoded + self.offset.float()).to(self.window.dtype)

    def dense(self) -> torch.Tensor:
        """The whole tensor as a plain dense ``(B, H, Tc + Tw, d)`` tensor."""
        return torch.cat([self.decoded(), self.window], dim=2)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        """Any torch op runs on the dense tensor."""
        return func(*tree_map(as_dense, args), **tree_map(as_dense, kwargs or {}))

    def __repr__(self) -> str:
        return (
            f"CompressedKV(shape={tuple(self.shape)}, dtype={self.dtype}, encoded={self.encoded_len}, "
            f"window={self.window.shape[2]}, codec={self.codec!r})"
        )


def map_codes(codes: Codes, fn: Callable[[torch.Tensor], torch.Tensor]) -> Codes:
    """``Codes`` with ``fn`` applied to both its arrays (slicing, gathering, moving...)."""
    return Codes(fn(codes.packed), fn(codes.factors))


def as_dense(x: Any) -> Any:
    """``x.dense()`` for a `CompressedKV`, ``x`` itself otherwise."""
    return x.dense() if isinstance(x, CompressedKV) else x
