"""`TurboQuantCache`: a Hugging Face transformers cache holding old keys and values as TurboQuant codes.

Per layer and KV head, keys and values are vectors of ``head_dim``. The newest tokens stay in
full precision (the window); once the dense tokens reach ``window + chunk``, the oldest whole
chunks are encoded with `TurboQuantCodec`, once, and never touched again (crop and beam
reordering slice or gather codes, they do not re-encode). ``update`` returns `CompressedKV`
tensors (codes, then dense tokens) that any attention implementation can consume; the
"turboquant" attention (`tqindex.kv.attention`) computes on the codes directly.

What a forward attends (``dense_prefill``): by default the codes of the tokens encoded before
it, and every token it holds in full precision (the window and the new tokens), even those it
encodes: a prefill runs as with an uncompressed cache (sdpa or flash attention on the states at
hand) and writes the codes once. With ``dense_prefill=False`` attention sees exactly what the
cache stores after the update: tokens that leave the window during a forward are attended
through their codes in that same forward (what `benchmarks/kv_fidelity.py` measures).

Shapes: ``B`` batch, ``H`` KV heads, ``Tc`` encoded tokens, ``Tw`` window tokens, ``d`` head dim.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, DynamicLayer, get_layer_types_and_kwargs
from transformers.configuration_utils import PreTrainedConfig

from tqindex.codec import CodecConfig, Codes, TurboQuantCodec
from tqindex.kernels import encode
from tqindex.kv.compressed import CompressedKV, map_codes
from tqindex.kv.factors import LogByteFactors, log_range

BACKENDS = ("auto", "torch", "triton")
LOG8 = "log8"  # factor_dtype for one-byte logarithmic factors (tqindex.kv.factors)
LOG8_BELOW_BITS = 6  # factor_dtype="auto": log8 below this many code bits (its ±2.2% then costs less than the bits it frees)
_REFERENCE_BYTES = 2  # a bf16/fp16 cache stores 2 bytes per element

CodecFactory = Callable[[str, int], TurboQuantCodec]


def _concat(codes: Codes, new: Codes) -> Codes:
    """``new`` tokens appended after ``codes`` (dim 2)."""
    return Codes(torch.cat([codes.packed, new.packed], dim=2), torch.cat([codes.factors, new.factors], dim=2))


class TurboQuantLayer(DynamicLayer):
    """One layer's cache: codes ``(B, H, Tc, ...)`` for old tokens, a dense window ``(B, H, Tw, d)`` after them.

    ``self.keys`` / ``self.values`` hold the window, ``self.key_codes`` / ``self.value_codes`` the
    codes (``Codes`` with packed ``(B, H, Tc, C)`` uint8 and factors ``(B, H, Tc, F)`` in
    ``factor_dtypes[role]``, or uint8 log codes for "log8"; float32 once a role's log codes would
    saturate, see `_float_factors`). With ``center_keys`` the codes hold keys
    minus ``self.key_offset`` ``(B, H, 1, d)`` bfloat16: the mean of the keys present at the first
    flush (any offset is exact, so its rounding costs nothing).
    """

    def __init__(
        self,
        codecs: CodecFactory,
        *,
        window: int,
        chunk: int,
        factor_dtypes: dict[str, torch.dtype | str],
        center_keys: bool,
        backend: str,
        dense_prefill: bool,
    ):
        super().__init__()
        self._codecs, self.window, self.chunk = codecs, window, chunk
        self.factor_dtypes, self.center_keys, self.backend, self.dense_prefill = factor_dtypes, center_keys, backend, dense_prefill
        self.key_codes: Codes | None = None
        self.value_codes: Codes | None = None
        self.key_offset: torch.Tensor | None = None
        self._log_factors: dict[str, LogByteFactors] = {}  # per role, fitted at the first flush
        self._float_factors: set[str] = set()  # log8 roles whose factors left the fitted range: float32 since

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_codec = self._codecs("key", key_states.shape[-1])
        self.value_codec = self._codecs("value", value_states.shape[-1])
        self.keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]))
        self.values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.key_codes = self._empty_codes(self.key_codec, key_states, "key")
        self.value_codes = self._empty_codes(self.value_codec, value_states, "value")
        self.is_initialized = True

    def _empty_codes(self, codec: TurboQuantCodec, states: torch.Tensor, role: str) -> Codes:
        batch, heads = states.shape[:2]
        packed = torch.empty((batch, heads, 0, codec.code_bytes), dtype=torch.uint8, device=states.device)
        dtype = torch.uint8 if self._factor_dtype(role) == LOG8 else self._factor_dtype(role)
        factors = torch.empty((batch, heads, 0, codec.n_factors), dtype=dtype, device=states.device)
        return Codes(packed, factors)

    @torch.compiler.disable  # Python control flow, host syncs at a flush, a tensor subclass: runs eagerly under torch.compile
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``(B, H, t, d)`` keys and values; return all of them (`CompressedKV` once any are encoded).

        With ``dense_prefill``: the codes as they were before this call, then every dense token
        (window and new); otherwise what the cache holds after it (`states`).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        attended = self._view(keys, values) if self.dense_prefill else None  # the codes written before this call
        flush = self._flush_len(keys.shape[-2])
        if flush:
            offset = self.key_offset
            if self.center_keys and offset is None:  # exact: softmax ignores q . offset
                offset = keys.float().mean(dim=-2, keepdim=True).to(torch.bfloat16)
            old_keys = keys[..., :flush, :]
            if offset is not None:
                old_keys = old_keys.float() - offset.float()
            new_keys, new_values = self._encode(old_keys, values[..., :flush, :])
            self.key_offset = offset
            self.key_codes, self.value_codes = _concat(self.key_codes, new_keys), _concat(self.value_codes, new_values)
            keys, values = keys[..., flush:, :].clone(), values[..., flush:, :].clone()
        self.keys, self.values = keys, values
        return attended if attended is not None else self.states()

    def states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache holds: `CompressedKV` ``(B, H, Tc + Tw, d)``, or the window while ``Tc == 0``."""
        return self._view(self.keys, self.values)

    def _view(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes held now, then dense ``keys`` / ``values`` ``(B, H, t, d)``: `CompressedKV`, or the dense tensors while ``Tc == 0``."""
        if self.encoded_len == 0:
            return keys, values
        return (
            CompressedKV(self.key_codec, self.key_codes, keys, self.backend, self.key_offset, self._log_codes("key")),
            CompressedKV(self.value_codec, self.value_codes, values, self.backend, None, self._log_codes("value")),
        )

    def _log_codes(self, role: str) -> LogByteFactors | None:
        """How ``role``'s stored factors decode: its one-byte log code, or None where they are floats."""
        return self._log_factors[role] if self._factor_dtype(role) == LOG8 else None

    def _readable(self, codes: Codes, role: str) -> Codes:
        """``codes`` with float factors (log codes decoded)."""
        if self._factor_dtype(role) != LOG8:
            return codes
        return Codes(codes.packed, self._log_factors[role].decode(codes.factors))

    def _flush_len(self, dense_len: int) -> int:
        """How many of the oldest dense tokens to encode now: whole chunks, leaving at least ``window``."""
        if dense_len < self.window + self.chunk:
            return 0
        return (dense_len - self.window) // self.chunk * self.chunk

    def _encode(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[Codes, Codes]:
        """Encode ``(B, H, t, d)`` keys and values -> ``Codes`` ``(B, H, t, C)`` and ``(B, H, t, F)`` as stored.

        On a GPU the encoder's checks are left to this one read back from the device, for both
        roles (`_factor_checks`): a flush waits for the GPU once, not at every check (trellis codes
        are encoded by ``codec.encode``, with its own checks).
        Raises ValueError for non-finite states, OverflowError for scales beyond a float16 factor
        dtype, before anything is stored; warns and keeps float32 factors where log8 would clamp.
        """
        states = {"key": keys, "value": values}
        raw = {role: self._encode_role(role, x) for role, x in states.items()}
        checks = torch.stack([self._factor_checks(role, codes.factors) for role, codes in raw.items()]).tolist()
        for role, (finite, *_) in zip(states, checks):
            if not finite:
                raise ValueError(f"{role} states hold a non-finite value, or a vector whose norm overflows float32")
        for role, (_, cast_finite, *_) in zip(states, checks):
            if not cast_finite:
                raise OverflowError(
                    f"a per-vector scale does not fit {self._factor_dtype(role)}: pass factor_dtype=torch.float32 or 'log8' to TurboQuantCache"
                )
        stored = []
        for (role, x), (_, _, smallest, largest, median) in zip(states.items(), checks):
            factors = raw[role].factors
            if self._factor_dtype(role) == LOG8:
                log_factors = self._log_factors.setdefault(role, LogByteFactors.fitted(smallest, largest, median))
                if log_factors.holds(smallest, largest):
                    factors = log_factors.encode(factors)
                else:
                    self._keep_float_factors(role)
            factors = factors.to(torch.uint8 if self._factor_dtype(role) == LOG8 else self._factor_dtype(role))
            stored.append(Codes(raw[role].packed.view(*x.shape[:3], -1), factors.view(*x.shape[:3], -1)))
        return stored[0], stored[1]

    def _encode_role(self, role: str, states: torch.Tensor) -> Codes:
        """``(B, H, t, d)`` states -> flat ``Codes``, float32 factors: on a GPU without the encoder's host
        checks; elsewhere ``codec.encode`` checks (its error then names the role)."""
        try:
            return encode(self._codec(role), states.reshape(-1, states.shape[-1]), check=False)
        except ValueError as error:
            raise ValueError(f"{role} states: {error}") from error

    def _factor_checks(self, role: str, factors: torch.Tensor) -> torch.Tensor:
        """float64 ``(5,)`` on the device: float32 ``factors`` all finite; all finite in a float
        storage dtype (1 for log8); for log8, `factors.log_range` (the median only until fitted)."""
        dtype = self._factor_dtype(role)
        finite = torch.isfinite(factors).all()
        if dtype == LOG8:
            return torch.cat([torch.stack([finite, finite]).double(), log_range(factors, median=role not in self._log_factors)])
        cast = torch.isfinite(factors.to(dtype)).all()
        unused = torch.full((3,), math.nan, dtype=torch.float64, device=factors.device)  # made there: no copy from the host
        return torch.cat([torch.stack([finite, cast]).double(), unused])

    def _codec(self, role: str) -> TurboQuantCodec:
        """The codec of ``role`` ("key" or "value")."""
        return self.key_codec if role == "key" else self.value_codec

    def _factor_dtype(self, role: str) -> torch.dtype | str:
        """How ``role``'s factors are stored now: as configured, or float32 after `_keep_float_factors`."""
        return torch.float32 if role in self._float_factors else self.factor_dtypes[role]

    def _keep_float_factors(self, role: str) -> None:
        """Store ``role``'s factors in float32 from now on, those stored so far decoded from their log bytes.

        Called when new factors fall outside the one-byte range fitted at the first flush (more
        than ~8 octaves from its median): clamped, they would decode with errors up to 100%.
        The stored tokens keep their values exactly; the new ones get the float32 path's error.
        """
        readable = self._readable(self.key_codes if role == "key" else self.value_codes, role)
        self._float_factors.add(role)
        if role == "key":
            self.key_codes = readable
        else:
            self.value_codes = readable
        low = self._log_factors[role].low
        warnings.warn(
            f"{role} scales outside the one-byte range fitted at this layer's first flush (2^{low:.1f}..2^{low + 254 / 16:.1f}): "
            "this layer keeps them in float32 from now on (4 bytes each)",
            RuntimeWarning,
            stacklevel=2,
        )

    @property
    def encoded_len(self) -> int:
        """``Tc``: tokens held as codes."""
        return 0 if self.key_codes is None else int(self.key_codes.packed.shape[2])

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.encoded_len + self.keys.shape[-2]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to every stored tensor (window and codes)."""
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.key_codes, self.value_codes = map_codes(self.key_codes, fn), map_codes(self.value_codes, fn)
        if self.key_offset is not None:
            self.key_offset = fn(self.key_offset)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a negative count, as `DynamicLayer.crop`)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        keep = max(self.get_seq_length() + tokens_to_remove, 0)
        encoded = self.encoded_len
        self.keys, self.values = self.keys[..., : max(keep - encoded, 0), :], self.values[..., : max(keep - encoded, 0), :]
        if keep < encoded:
            self.key_codes = map_codes(self.key_codes, lambda a: a[:, :, :keep])
            self.value_codes = map_codes(self.value_codes, lambda a: a[:, :, :keep])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda a: a.index_select(0, beam_idx.to(a.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda a: a.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda a: a[indices, ...])

    def offload(self) -> None:
        self._apply(lambda a: a.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized and self.keys.device != self.device:
            self._apply(lambda a: a.to(self.device, non_blocking=True))

    def reset(self) -> None:
        super().reset()
        # empty, as before the first update (transformers 5.14 zeroes the window in place and
        # keeps the layer initialized): the next update initializes it afresh
        self.is_initialized = False
        self.key_codes = self.value_codes = self.key_offset = None
        self._log_factors = {}
        self._float_factors = set()

    def memory(self) -> tuple[int, int, int]:
        """Stored bytes: ``(codes, factors and key offsets, window)``."""
        if not self.is_initialized:
            return 0, 0, 0
        codes = (self.key_codes, self.value_codes)
        offset = 0 if self.key_offset is None else self.key_offset.nbytes
        return (
            sum(c.packed.nbytes for c in codes),
            sum(c.factors.nbytes for c in codes) + offset,
            self.keys.nbytes + self.values.nbytes,
        )

    def nbytes(self) -> int:
        return sum(self.memory())

    def reference_bytes(self) -> int:
        """Bytes a bf16/fp16 dense cache would take for the same tokens."""
        if not self.is_initialized:
            return 0
        batch, heads = self.keys.shape[:2]
        return _REFERENCE_BYTES * batch * heads * self.get_seq_length() * (self.keys.shape[-1] + self.values.shape[-1])


def _dense_bytes(layer: object) -> int:
    """Bytes held by a layer that keeps dense ``keys`` / ``values`` (or none)."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    return sum(t.nbytes for t in (keys, values) if isinstance(t, torch.Tensor))


@dataclass(frozen=True)
class MemoryReport:
    """What the cache stores, in bytes, against a bf16/fp16 dense cache of the same tokens."""

    tokens: int
    code_bytes: int
    factor_bytes: int
    window_bytes: int
    uncompressed_bytes: int
    reference_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.code_bytes + self.factor_bytes + self.window_bytes + self.uncompressed_bytes

    @property
    def ratio(self) -> float:
        """How many times smaller than the 16-bit cache (every stored byte counted)."""
        return self.reference_bytes / self.total_bytes if self.total_bytes else float("nan")

    def __str__(self) -> str:
        mib = 1 / (1 << 20)
        return (
            f"{self.tokens} tokens: {self.total_bytes * mib:.3f} MiB stored "
            f"(codes {self.code_bytes * mib:.3f}, scales {self.factor_bytes * mib:.3f}, "
            f"window {self.window_bytes * mib:.3f}, uncompressed layers {self.uncompressed_bytes * mib:.3f}) "
            f"vs {self.reference_bytes * mib:.3f} MiB at 16 bits: {self._comparison()}"
        )

    def _comparison(self) -> str:
        """"4.00x smaller", or, where the full-precision window outweighs the codes (a short
        context, a float32 model), "1.50x larger"."""
        if self.total_bytes <= self.reference_bytes:
            return f"{self.ratio:.2f}x smaller"
        return f"{1 / self.ratio:.2f}x larger"


def cache_keyword(model: Any) -> str:
    """The keyword ``model.generate`` and ``model(...)`` take a cache by in the installed transformers:
    "cache" where the model's ``forward`` has it (current releases; ``past_key_values=`` still
    works there but prints a FutureWarning), else "past_key_values". Use it as
    ``model.generate(..., **{cache_keyword(model): TurboQuantCache(4, 4)})`` in code that runs on both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class TurboQuantCache(Cache):
    """A transformers cache that stores keys and values as TurboQuant codes beyond a full-precision window.

    Use it as ``model.generate(..., cache=TurboQuantCache(key_bits=4, value_bits=4))`` (transformers
    releases whose models take ``past_key_values=`` instead: that keyword; `cache_keyword` tells which) or
    in a plain forward loop. Layers initialise lazily from the first tensors they see, like
    ``DynamicCache()``. With ``model.set_attn_implementation("turboquant")`` attention runs on
    the codes; with any other implementation the codes are decoded for it.

    Args:
        key_bits, value_bits: codec bits per coordinate, 1..8 in steps of 1/8 (see `TurboQuantCodec`;
            each stored vector also keeps ``F`` per-vector factors in ``factor_dtype``).
        key_variant, value_variant: "mse" or "prod" (QJL residual bit).
        window: the most recent tokens kept in full precision.
        chunk: tokens are encoded in whole chunks of this many as they leave the window.
        skip_layers: layer indices kept uncompressed (negative indices need ``config``).
        config: a model config: builds every layer upfront; layers that are not full attention
            (sliding, linear...) get transformers' own dynamic layer for their type.
        seed: seeds the codecs' rotation and QJL matrix.
        factor_dtype: how the per-vector factors are stored: a float dtype (float16: 2 bytes each),
            "log8" (one byte each, logarithmic, within ±2.2%: `tqindex.kv.factors`), or "auto":
            log8 for keys or values of fewer than 6 code bits, float16 otherwise.
        center_keys: encode keys minus their mean over the tokens present at a layer's first
            flush (per batch row and head, stored in bfloat16): exact for softmax attention, since
            ``q . mean`` is the same for every token, and it leaves less for the codes to carry.
            Costs ``2 * head_dim`` bytes per batch row, head and layer.
        backend: attention over codes: "auto" (Triton on CUDA, else torch), "torch" or "triton".
        dense_prefill: True: a forward attends the tokens it holds in full precision (window and new
            tokens) as they are, and codes only for tokens encoded before it, so a prefill costs
            what it costs without the cache plus one encode. False: attention sees exactly what
            the cache stores after the update, new tokens that leave the window included.
        search: the codecs' code search (see `TurboQuantCodec`): True, False or "auto"; scalar codes only.
        quantizer: the codecs' quantizer (see `TurboQuantCodec`): "scalar" or "trellis" (lower error at
            the same bits, ~1000x the encode work, encoded on the CPU; mse only; attention over
            trellis codes runs on the torch backend).
    """

    def __init__(
        self,
        key_bits: float = 4,
        value_bits: float = 4,
        *,
        key_variant: str = "mse",
        value_variant: str = "mse",
        window: int = 128,
        chunk: int = 32,
        skip_layers: Iterable[int] = (),
        config: PreTrainedConfig | None = None,
        seed: int = 0,
        factor_dtype: torch.dtype | str = "auto",
        center_keys: bool = True,
        backend: str = "auto",
        search: bool | str = True,
        quantizer: str = "scalar",
        dense_prefill: bool = True,
    ):
        if not isinstance(search, bool) and search != "auto":
            raise ValueError(f"search must be True, False or 'auto', got {search!r}")
        for bits, variant in ((key_bits, key_variant), (value_bits, value_variant)):
            scale = "norm" if variant == "prod" else "unbiased"
            CodecConfig(dim=2, bits=bits, variant=variant, rotation="dense", scale=scale, seed=seed, quantizer=quantizer)  # validates
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ValueError(f"window must be an integer >= 0, got {window!r}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if factor_dtype not in (LOG8, "auto") and (not isinstance(factor_dtype, torch.dtype) or not factor_dtype.is_floating_point):
            raise TypeError(f"factor_dtype must be a floating torch dtype, {LOG8!r} or 'auto', got {factor_dtype!r}")
        if not isinstance(center_keys, bool):
            raise TypeError(f"center_keys must be True or False, got {center_keys!r}")
        if not isinstance(dense_prefill, bool):
            raise TypeError(f"dense_prefill must be True or False, got {dense_prefill!r}")
        self._specs = {"key": (key_bits, key_variant), "value": (value_bits, value_variant)}
        factor_dtypes = {
            role: (LOG8 if bits < LOG8_BELOW_BITS else torch.float16) if factor_dtype == "auto" else factor_dtype
            for role, (bits, _) in self._specs.items()
        }
        self._codec_cache: dict[tuple[str, int], TurboQuantCodec] = {}
        self._codec_args = dict(seed=seed, quantizer=quantizer, search=search if quantizer == "scalar" else False)
        self._layer_args = dict(
            window=window, chunk=chunk, factor_dtypes=factor_dtypes, center_keys=center_keys, backend=backend,
            dense_prefill=dense_prefill,
        )  # fmt: skip

        skip = list(skip_layers)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in skip):
            raise TypeError(f"skip_layers must be layer indices (ints), got {skip}")
        if config is None:
            if any(i < 0 for i in skip):
                raise ValueError(f"negative skip_layers {skip} need config= to know the number of layers")
            self._skip = set(skip)
            super().__init__(layers=[])
            return
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        if isinstance(layer_kwargs, dict):  # 5.14-5.18 at least: one kwargs dict for every layer; later, one per layer
            layer_kwargs = [layer_kwargs] * len(layer_types)
        n_layers = len(layer_types)
        if any(not -n_layers <= i < n_layers for i in skip):
            raise ValueError(f"skip_layers {skip} out of range for {n_layers} layers")
        self._skip = {i % n_layers for i in skip}
        layers = [
            self._new_layer(i) if kind == "full_attention" else DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs)
            for i, (kind, kwargs) in enumerate(zip(layer_types, layer_kwargs))
        ]
        super().__init__(layers=layers)

    def codec(self, role: str, dim: int) -> TurboQuantCodec:
        """The codec for ``role`` ("key" or "value") vectors of ``dim``, made once and shared by all layers."""
        if (role, dim) not in self._codec_cache:
            bits, variant = self._specs[role]
            self._codec_cache[role, dim] = TurboQuantCodec(dim, bits, variant=variant, **self._codec_args)
        return self._codec_cache[role, dim]

    def _new_layer(self, layer_idx: int) -> DynamicLayer:
        if layer_idx in self._skip:
            return DynamicLayer()
        return TurboQuantLayer(self.codec, **self._layer_args)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``(B, H, t, d)`` keys and values for ``layer_idx``; return the layer's keys and values."""
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer(len(self.layers)))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def nbytes(self) -> int:
        """Every byte the cache stores: codes, factors, windows and uncompressed layers."""
        return self.memory_report().total_bytes

    def memory_report(self) -> MemoryReport:
        """Stored bytes by kind, against what a bf16/fp16 ``DynamicCache`` would take."""
        codes = factors = window = dense = reference = 0
        for layer in self.layers:
            if isinstance(layer, TurboQuantLayer):
                c, f, w = layer.memory()
                codes, factors, window, reference = codes + c, factors + f, window + w, reference + layer.reference_bytes()
            else:
                held = _dense_bytes(layer)
                itemsize = layer.keys.element_size() if held else 1
                dense, reference = dense + held, reference + held * _REFERENCE_BYTES // itemsize
        return MemoryReport(self.get_seq_length(), codes, factors, window, dense, reference)
