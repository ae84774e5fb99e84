"""Single-query QPS of the look-up-table scan's two multi-field kernels, A/B in one process.

Layouts of two index fields (2.5, 3, 4.5, 5, 6 bits) run ``_scan_byte_and_bits`` (straight-line
key extraction); the generic ``_scan_groups`` loops over the fields. This switches the scanner
between them on the same index and queries, alternating, so load drift hits both alike.

    python benchmarks/bench_lut_kernels.py --dataset results/data/wordnet-minilm-384-ip.hdf5 --bits 2.5 3 5 6
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tqindex import TurboQuantIndex
from tqindex.datasets import read_hdf5
from tqindex.kernels import get_scanner


def single_query_qps(index: TurboQuantIndex, queries, k: int) -> float:
    index.search(queries[:3], k)  # compile, warm the caches
    start = time.perf_counter()
    for i in range(len(queries)):
        index.search(queries[i : i + 1], k)
    return len(queries) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="ann-benchmarks .hdf5 file")
    parser.add_argument("--bits", type=float, nargs="+", default=[2.5, 3, 5, 6])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-k", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = read_hdf5(args.dataset, progress=False)
    queries = data.test[: args.queries]
    results = []
    for bits in args.bits:
        index = TurboQuantIndex(data.train.shape[1], bits, backend="lut")
        index.add(data.train, progress=False)
        scanner = get_scanner(index.codec, "lut", index.device, queries=1)
        straight = scanner._byte_and_bits
        if straight is None:
            raise SystemExit(f"{bits} bits is not a two-field layout")
        qps: dict[str, list[float]] = {"generic": [], "straight-line": []}
        for _ in range(args.rounds):
            for name, setting in (("generic", None), ("straight-line", straight)):
                scanner._byte_and_bits = setting
                qps[name].append(round(single_query_qps(index, queries, args.k), 1))
        results.append({"bits": bits, **qps})
        print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
