"""Search benchmark (issue 3): every method of ``competitors.py`` at 2, 3 and 4 bits per dimension.

Per method and bit width: bytes per vector (codes + per-vector factors), build time (train +
add), k-recall@k and recall@1@k against the dataset's exact neighbours, batched QPS (all
queries in one ``search`` call: median of ``--repeats`` timed runs after one warm-up) and
single-query QPS (one query per call, at most ``--single-max-queries`` queries or
``--single-max-seconds`` seconds, after one warm-up query).

Data: ``--dataset`` (an ann-benchmarks .hdf5 file, a registered name or a synthetic name; see
``tqindex.datasets.load_dataset``), default a synthetic anisotropic d=384 set. "angular" data
runs every method in cosine mode, "dot" data in inner-product mode, "euclidean" data with L2.

The measurement functions here are shared with ``ann_compare.py``.

Usage: python benchmarks/bench_search.py [--dataset PATH.hdf5] [--bits 2 3 4] [--k 10]
       [--threads 2] [--methods ...] [--out DIR] [--quick] [--no-single] [--no-progress]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from _common import describe_machine_md, machine_description, markdown_table, summarize, time_runs, write_results
from competitors import METHODS, Method, Unsupported, configure_threads, describe_threads, make_method
from tqindex.datasets import Dataset, load_dataset, recall_1_at, recall_at

DEFAULT_DATASET = "synthetic-anisotropic-384-ip-n100000-q1000"
QUICK_DATASET = "synthetic-anisotropic-64-ip-n2000-q50"
DATASET_METRICS = {"ip": "ip", "angular": "cosine", "euclidean": "l2"}  # Dataset.metric -> method metric


@dataclass(frozen=True)
class Timing:
    """How to time searches: batched repeats, and the single-query loop's limits (None: skip it)."""

    repeats: int = 3
    single_max_queries: int | None = 200
    single_max_seconds: float = 20.0


def method_metric(dataset: Dataset) -> str:
    """The metric the methods run with for ``dataset``: "ip", "cosine" or "l2"."""
    if dataset.metric not in DATASET_METRICS:
        raise ValueError(f"{dataset.name}: distance {dataset.distance!r} is not supported (only 'dot', 'angular' and 'euclidean')")
    return DATASET_METRICS[dataset.metric]


def batched_search(method: Method, queries: np.ndarray, k: int, repeats: int) -> tuple[dict[str, Any], np.ndarray]:
    """Time ``search(queries, k)`` as one call; returns (timing with "qps", found ids (m, k))."""
    out: list[tuple[np.ndarray, np.ndarray]] = []
    times = time_runs(lambda: out.append(method.search(queries, k)), repeats)
    stats = summarize(times)
    return stats | {"qps": len(queries) / stats["median_s"]}, np.asarray(out[-1][1])


def single_query_qps(method: Method, queries: np.ndarray, k: int, max_queries: int, max_seconds: float) -> dict[str, Any]:
    """Queries per second searching one query per call, over at most ``max_queries`` / ``max_seconds``."""
    method.search(queries[:1], k)  # warm-up
    done, start = 0, time.perf_counter()
    for row in queries[:max_queries]:
        method.search(row[None, :], k)
        done += 1
        if time.perf_counter() - start >= max_seconds:
            break
    elapsed = time.perf_counter() - start
    return {"qps": done / elapsed, "queries": done, "seconds": elapsed}


def measure(method: Method, dataset: Dataset, k: int, timing: Timing) -> tuple[dict[str, Any], np.ndarray]:
    """Build ``method`` on the dataset, then time and score its top-``k`` search.

    Returns (record, found ids (m, k)); the record holds ``method.describe()``, "build_s",
    "recall_at_k", "recall_1_at_k", "batched" and "single" (None when skipped).
    """
    build_s = method.build(dataset.train)
    batched, found = batched_search(method, dataset.test, k, timing.repeats)
    single = None
    if timing.single_max_queries:
        single = single_query_qps(method, dataset.test, k, timing.single_max_queries, timing.single_max_seconds)
    record = method.describe() | {
        "build_s": build_s,
        "recall_at_k": recall_at(dataset.neighbors, found, k),
        "recall_1_at_k": recall_1_at(dataset.neighbors, found, k),
        "batched": batched,
        "single": single,
    }
    return record, found


def try_method(
    name: str, bits: float, dataset: Dataset, seed: int, k: int, timing: Timing
) -> tuple[dict[str, Any], Method | None, np.ndarray | None]:
    """`measure` the method ``name``; when it cannot run, a record with "skipped" (the reason) and Nones."""
    try:
        method = make_method(name, dataset.dim, bits, method_metric(dataset), seed)
        record, found = measure(method, dataset, k, timing)
    except Unsupported as reason:
        return {"method": name, "bits": bits, "skipped": str(reason)}, None, None
    return record, method, found


def dataset_info(dataset: Dataset) -> dict[str, Any]:
    """Name, sizes, dimension and distance of ``dataset``, for the result files."""
    return {"name": dataset.name, "n": len(dataset.train), "queries": len(dataset.test), "dim": dataset.dim, "distance": dataset.distance}


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for a Markdown table ("-" for None)."""
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_qps(value: float | None) -> str:
    """Queries per second, no decimals ("-" for None)."""
    return "-" if value is None else f"{value:,.0f}"


def skipped_md(skipped: Sequence[dict[str, Any]]) -> str:
    """A Markdown list of the (method, bits) pairs that could not run, with the reasons."""
    if not skipped:
        return ""
    return "\n\nSkipped:\n\n" + "\n".join(f"- {s['method']} at {s['bits']:g} bits: {s['skipped']}" for s in skipped)


def results_markdown(results: Sequence[dict[str, Any]], k: int) -> str:
    """The results table, one row per (method, bits)."""
    headers = ["method", "bits", "B/vector", "build s", f"{k}-recall@{k}", f"recall@1@{k}", "batched QPS", "single QPS", "params"]
    rows = [
        [
            r["method"],
            f"{r['bits']:g}",
            fmt(r["bytes_per_vector"], 1),
            fmt(r["build_s"], 2),
            fmt(r["recall_at_k"]),
            fmt(r["recall_1_at_k"]),
            fmt_qps(r["batched"]["qps"]),
            fmt_qps(r["single"]["qps"] if r["single"] else None),
            ", ".join(f"{key}={value}" for key, value in r["params"].items() if key != "seed"),
        ]
        for r in results
    ]
    return markdown_table(headers, rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=None, help=f"path, registered or synthetic name (default {DEFAULT_DATASET})")
    parser.add_argument("--bits", type=float, nargs="+", default=[2, 3, 4])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--seed", type=int, default=0, help="rotation seed of every seeded method")
    parser.add_argument("--repeats", type=int, default=3, help="timed batched searches (median reported)")
    parser.add_argument("--single-max-queries", type=int, default=200)
    parser.add_argument("--single-max-seconds", type=float, default=20.0)
    parser.add_argument("--no-single", action="store_true", help="skip the single-query loop")
    parser.add_argument("--out", default="results/bench_search")
    parser.add_argument("--quick", action="store_true", help=f"tiny smoke run ({QUICK_DATASET}, 1 repeat, 20 single queries)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.dataset = args.dataset or QUICK_DATASET
        args.repeats, args.single_max_queries = 1, min(args.single_max_queries, 20)
    args.dataset = args.dataset or DEFAULT_DATASET
    return args


def timing_from_args(args: argparse.Namespace) -> Timing:
    """The `Timing` the command-line options ask for."""
    return Timing(args.repeats, None if args.no_single else args.single_max_queries, args.single_max_seconds)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = configure_threads(args.threads)
    dataset = load_dataset(args.dataset, progress=not args.no_progress)
    timing = timing_from_args(args)
    grid = [(bits, name) for bits in args.bits for name in args.methods]
    results, skipped = [], []
    for bits, name in tqdm(grid, desc="methods", unit="run", disable=args.no_progress):
        record, _, _ = try_method(name, bits, dataset, args.seed, args.k, timing)
        (skipped if "skipped" in record else results).append(record)

    machine = machine_description(args.threads)
    output = {
        "benchmark": "bench_search",
        "dataset": dataset_info(dataset),
        "config": {key: value for key, value in vars(args).items() if key not in ("out", "no_progress")},
        "threads": threads,
        "machine": machine,
        "results": results,
        "skipped": skipped,
    }
    info = dataset_info(dataset)
    markdown = (
        f"# Search benchmark: {info['name']} (n={info['n']:,}, queries={info['queries']:,}, d={info['dim']}, {info['distance']})\n\n"
        f"{describe_machine_md(machine)}; threads: {describe_threads(threads)}\n\n"
        f"Batched QPS: all queries in one call, median of {timing.repeats}. Single QPS: one query per call"
        + (
            " (skipped)"
            if timing.single_max_queries is None
            else f", up to {timing.single_max_queries} queries or {timing.single_max_seconds:g} s"
        )
        + ". B/vector: code + per-vector factors, ids excluded.\n\n"
        + results_markdown(results, args.k)
        + skipped_md(skipped)
    )
    print(markdown)
    out = write_results(args.out, output, markdown)
    print(f"\nwrote {out / 'results.json'} and {out / 'results.md'}")
    return output


if __name__ == "__main__":
    main()
