"""ShardedIndex on a local Ray cluster against one index holding every row, on the same machine.

Builds one flat `TurboQuantIndex` in this process and a `ShardedIndex` of ``--shards`` flat shards
(each a Ray actor on a local cluster of ``--ray-cpus`` CPUs), adds the same vectors to both, checks
that their results are identical, then times batched searches (all queries in one call) of the
two in turn, ``--rounds`` times (median reported), and a single-query loop: the overhead of
fan-out and merge. Writes DIR/results.json and DIR/results.md.

Usage: python benchmarks/bench_shards.py --dataset PATH_OR_NAME --bits 4 --shards 4 --out DIR
       [--k 10] [--rounds 5] [--single 100] [--threads 2] [--ray-cpus 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from _common import describe_machine_md, machine_description, markdown_table, set_threads, write_results
from bench_search import dataset_info, fmt, fmt_qps, method_metric
from tqindex import TurboQuantIndex
from tqindex.datasets import load_dataset, recall_at


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--bits", type=float, default=4)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--single", type=int, default=100, help="queries of the single-query loop (0: skip)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the single index")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray cluster (shared by the shards)")
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)


def _time(search: Any, queries: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    _, ids = search(queries, k)
    return time.perf_counter() - start, np.asarray(ids)


def _single(search: Any, queries: np.ndarray, k: int) -> float:
    start = time.perf_counter()
    for row in queries:
        search(row[None, :], k)
    return len(queries) / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import ray

    from tqindex.shards import ShardedIndex

    set_threads(args.threads)
    dataset = load_dataset(args.dataset, progress=False)
    metric = method_metric(dataset)
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            single = TurboQuantIndex(dataset.dim, args.bits, metric=metric)
            single.add(dataset.train, progress=False)
            start = time.perf_counter()
            sharded = ShardedIndex(Path(tmp) / "sharded", args.shards, dataset.dim, args.bits, metric=metric, num_cpus=args.ray_cpus / args.shards)
            sharded.add(dataset.train)
            build_s = time.perf_counter() - start
            with sharded:
                queries, k = dataset.test, args.k
                sharded.search(queries[:8], k), single.search(queries[:8], k)  # warm-up
                times: dict[str, list[float]] = {"single index": [], f"{args.shards} shards": []}
                found = {}
                for _ in range(args.rounds):
                    for name, index in zip(times, (single, sharded)):
                        seconds, found[name] = _time(index.search, queries, k)
                        times[name].append(seconds)
                identical = bool(np.array_equal(found["single index"], found[f"{args.shards} shards"]))
                singles = {}
                if args.single:
                    for name, index in zip(times, (single, sharded)):
                        singles[name] = _single(index.search, queries[: args.single], k)
                workers = sharded.workers()
    finally:
        ray.shutdown()
    rows = []
    for name, seconds in times.items():
        rows.append(
            {
                "index": name,
                "recall_at_k": recall_at(dataset.neighbors, found[name], k),
                "batched_qps": len(queries) / float(np.median(seconds)),
                "times_s": seconds,
                "single_qps": singles.get(name),
            }
        )
    machine = machine_description(args.threads)
    output = {
        "benchmark": "bench_shards",
        "dataset": dataset_info(dataset),
        "config": vars(args),
        "machine": machine,
        "identical_results": identical,
        "sharded_build_s": build_s,
        "workers": [{key: w[key] for key in ("shard", "name", "pid", "node", "ntotal")} for w in workers],
        "results": rows,
    }
    info = dataset_info(dataset)
    table = markdown_table(
        ["index", f"{k}-recall@{k}", "batched QPS", "single QPS"],
        [[r["index"], fmt(r["recall_at_k"]), fmt_qps(r["batched_qps"]), fmt_qps(r["single_qps"])] for r in rows],
    )
    markdown = (
        f"# ShardedIndex vs one index: {info['name']} (n={info['n']:,}, d={info['dim']}), {args.bits:g} bits, {info['queries']:,} queries\n\n"
        f"{describe_machine_md(machine)}; single index: {args.threads} torch threads; shards: a local Ray cluster of "
        f"{args.ray_cpus} CPUs, {args.shards} actors of {args.ray_cpus / args.shards:g} CPU. Batched: all queries in one call, "
        f"median of {args.rounds} rounds, the two in turn. Identical results: {identical}.\n\n" + table
    )
    print(markdown)
    write_results(args.out, output, markdown)
    return output


if __name__ == "__main__":
    main()
