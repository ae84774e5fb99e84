"""``tqindex bench``: in-memory indexes on an ann-benchmarks dataset, a table of recall and QPS.

Reuses the measuring code of `tqindex.demo` (build time, k-recall@k, batched QPS).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bench(dataset: str, bits_list: Sequence[float], k: int, *, faiss: bool, progress: bool) -> None:
    """Print a markdown table: method, bits, bytes/vector, build s, k-recall@k, batched QPS.

    ``dataset``: an .hdf5 path or a name `tqindex.datasets.load_dataset` knows. "angular" data
    is normalised once up front (cosine = inner product of unit vectors, for every method);
    "dot" data is used as is; "euclidean" data runs with L2 (``metric="l2"``, FAISS ``METRIC_L2``).
    ``faiss`` adds FAISS's TurboQuant ``RR,SQtqmse{b}`` where faiss is installed, it offers those
    bits, and the vectors are unit length (it stores no norm); otherwise a note says why the row is missing.
    """
    from tqindex.datasets import load_dataset
    from tqindex.demo import FAISS_TQMSE_BITS, _faiss, _measure, _tqindex, for_search

    data, metric = for_search(load_dataset(dataset, progress=progress))
    if k > data.neighbors.shape[1]:
        raise ValueError(f"{data.name}: its ground truth holds {data.neighbors.shape[1]} neighbours per query, fewer than k={k}")
    has_faiss, notes = False, []
    if faiss:
        try:
            import faiss as _  # noqa: F401

            has_faiss = True
        except ImportError:
            notes.append("faiss is not installed (pip install 'tqindex[bench]'): no FAISS rows")
    unit_norm = bool(np.allclose(np.linalg.norm(data.train, axis=1), 1.0, atol=1e-3))
    print(f"{data.name}: {len(data.train):,} vectors, d={data.dim}, {len(data.test):,} queries, distance {data.distance}")
    print(f"| method | bits | bytes/vector | build s | {k}-recall@{k} | QPS |\n|---|---:|---:|---:|---:|---:|")
    for bits in bits_list:
        methods = [("tqindex", _tqindex(data, bits, progress, metric))]
        if has_faiss:
            factory = f"RR,SQtqmse{bits:g}"
            if bits not in FAISS_TQMSE_BITS:
                notes.append(f"faiss {factory}: FAISS offers SQtqmse at {FAISS_TQMSE_BITS} bits only")
            elif not unit_norm:
                notes.append(f"faiss {factory}: skipped, it stores no norm and these vectors are not unit length")
            else:
                methods.append((f"faiss {factory}", _faiss(data, factory, metric)))
        for name, (nbytes, build) in methods:
            built, recall, qps = _measure(build, data, k)
            print(f"| {name} | {bits:g} | {nbytes} | {built:.2f} | {recall:.4f} | {qps:,.0f} |", flush=True)
    for note in notes:
        print(f"note: {note}")
