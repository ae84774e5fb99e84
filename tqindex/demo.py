"""The main job, end to end: build an index on generated data, search it, compare.

``python -m tqindex.demo`` makes a normalised anisotropic Gaussian dataset (embedding-like:
a few directions dominate), computes exact top-10 neighbours, builds a TurboQuantIndex at each
bit width, and prints 10-recall@10, bytes per vector and batched QPS next to FAISS's TurboQuant
scalar quantizer and RaBitQ at the same bits (when faiss-cpu is installed).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np
import torch

from tqindex import TurboQuantIndex
from tqindex.datasets import Dataset, make_synthetic, recall_at


def _measure(build: Callable[[], Callable[[np.ndarray, int], np.ndarray]], data: Dataset, k: int) -> tuple[float, float, float]:
    """Build time (s), recall@k and batched queries per second of one method."""
    start = time.perf_counter()
    search = build()
    built = time.perf_counter() - start
    start = time.perf_counter()
    found = search(data.test, k)
    qps = len(data.test) / (time.perf_counter() - start)
    return built, recall_at(data.neighbors, found, k), qps


def _tqindex(data: Dataset, bits: float, progress: bool) -> tuple[int, Callable]:
    index = TurboQuantIndex(data.dim, bits)

    def build() -> Callable:
        index.add(data.train, progress=progress)
        return lambda q, k: index.search(q, k)[1]

    return index.bytes_per_vector, build


def _faiss(data: Dataset, factory: str) -> tuple[int, Callable]:
    import faiss

    index = faiss.index_factory(data.dim, factory, faiss.METRIC_INNER_PRODUCT)

    def build() -> Callable:
        index.train(data.train)
        index.add(data.train)
        return lambda q, k: index.search(q, k)[1]

    return index.sa_code_size(), build


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000, help="vectors in the index")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--bits", type=float, nargs="+", default=[2, 3, 4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true", help="turn progress bars off")
    args = parser.parse_args(argv)
    progress, k = not args.no_progress, 10
    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        faiss = None
        print("faiss-cpu is not installed (pip install 'tqindex[bench]'): comparing with exact search only")

    print(f"dataset: {args.n:,} normalised anisotropic Gaussian vectors, d={args.dim}, {args.queries} queries, k={k}")
    data = make_synthetic("anisotropic", args.n, args.queries, args.dim, metric="ip", k=k, seed=0, progress=progress)
    rows = [("exact float32 (brute force)", 4 * args.dim, 0.0, 1.0, float("nan"))]
    for bits in args.bits:
        methods = [(f"tqindex {bits:g}-bit", _tqindex(data, bits, progress))]
        if faiss is not None and float(bits).is_integer():
            b = int(bits)
            methods += [(f"faiss RR,SQtqmse{b}", _faiss(data, f"RR,SQtqmse{b}")), (f"faiss RaBitQ{b}", _faiss(data, f"RaBitQ{b}"))]
        for name, (nbytes, build) in methods:
            rows.append((name, nbytes, *_measure(build, data, k)))

    print(f"\n| method | bytes/vector | build s | 10-recall@10 | batched QPS ({args.threads} threads) |")
    print("|---|---:|---:|---:|---:|")
    for name, nbytes, built, recall, qps in rows:
        print(f"| {name} | {nbytes} | {built:.2f} | {recall:.3f} | {qps:,.0f} |")
    print("\nbytes/vector counts codes and per-vector factors (norm/scale); ids are not counted for any method.")


if __name__ == "__main__":
    main()
