"""``python -m tqindex.datasets OUT.hdf5``: embed a seeded random sample of WordNet passages
(see `tqindex.datasets.passages`) into an ann-benchmarks file with exact ground truth."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .corpus import build_corpus_dataset
from .passages import iter_passages


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, sample passages, build and describe the dataset."""
    parser = argparse.ArgumentParser(prog="python -m tqindex.datasets", description=__doc__)
    parser.add_argument("out", type=Path, help="the .hdf5 file to write")
    parser.add_argument("--source", default="wordnet", help="'wordnet' or a folder of WordNet data.* files")
    parser.add_argument("--limit", type=int, default=50_000, help="passages to sample, queries included")
    parser.add_argument("--n-queries", type=int, default=1_000, help="passages held out as queries")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    passages = list(iter_passages(args.source))
    rows = np.sort(np.random.default_rng(args.seed).permutation(len(passages))[: args.limit])
    dataset = build_corpus_dataset([passages[i] for i in rows], args.out, n_queries=args.n_queries, seed=args.seed)
    print(dataset)


if __name__ == "__main__":
    main()
