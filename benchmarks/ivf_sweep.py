"""The IVF part of ann_compare.py: each IVF method built once, then an nprobe sweep timed side by side.

Per bit width, every method of ``--ivf-methods`` is built with the same ``--nlist`` (train on the
whole train set + add, timed) and kept in memory. Then, per nprobe, each method is warmed up and
its batched search (all queries in one call) is timed in turn, ``--rounds`` times, so that the
load of a shared machine falls on every method alike, each after a rest of ``SETTLE_S``; the
median is reported. With
``--flat-reference`` the exhaustive tqindex index at the same bits is timed once in each nprobe
step, the speed an IVF index has to beat. Single-query QPS (``--ivf-single`` queries, one per
call, interleaved the same way) is optional.

Writes DIR/ivf_results.json, DIR/ivf_results.md, DIR/ivf_recall_vs_qps.png.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from _common import markdown_table  # noqa: E402
from bench_search import fmt, fmt_qps, method_metric  # noqa: E402
from competitors import IvfMethod, Method, Unsupported, make_ivf_method, make_method  # noqa: E402
from tqindex.datasets import Dataset, recall_1_at, recall_at  # noqa: E402

FLAT = "tqindex-flat"
STYLES = {"tqindex": ("o", "-"), "faiss": ("s", "--")}


def build(
    names: Sequence[str], dataset: Dataset, bits: float, nlist: int, seed: int, flat: bool, train_rows: int | None = None
) -> tuple[list[Method], list[dict[str, Any]]]:
    """Build every IVF method (trained on ``train_rows`` sampled rows, or all) and the flat reference;
    returns the built ones and the skipped records."""
    built, skipped = [], []
    metric = method_metric(dataset)
    for name in names:
        try:
            method = make_ivf_method(name, dataset.dim, bits, metric, seed, nlist)
            method.train_rows = train_rows
            method.params["train_rows"] = train_rows or len(dataset.train)
            method.build_s = method.build(dataset.train)
        except Unsupported as reason:
            skipped.append({"method": name, "bits": bits, "skipped": str(reason)})
            continue
        built.append(method)
    if flat:
        method = make_method("tqindex", dataset.dim, bits, metric, seed)
        method.name = FLAT
        method.build_s = method.build(dataset.train)
        built.append(method)
    return built, skipped


#: seconds of rest before each timed search: the OpenMP threads of the method timed before (torch's
#: runtime for tqindex, FAISS's own for FAISS) spin for a few milliseconds after their last work,
#: and would otherwise share the cores with the next method's timed search
SETTLE_S = 0.1


def _timed_search(method: Method, queries: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    time.sleep(SETTLE_S)
    start = time.perf_counter()
    _, ids = method.search(queries, k)
    return time.perf_counter() - start, np.asarray(ids)


def _single_qps(method: Method, queries: np.ndarray, k: int) -> float:
    time.sleep(SETTLE_S)
    start = time.perf_counter()
    for row in queries:
        method.search(row[None, :], k)
    return len(queries) / (time.perf_counter() - start)


def sweep(
    methods: Sequence[Method], dataset: Dataset, k: int, nprobes: Sequence[int], rounds: int, single: int, progress: bool
) -> list[dict[str, Any]]:
    """Per (method, nprobe): recall, batched QPS (median over rounds) and single-query QPS."""
    queries = dataset.test
    records = []
    for nprobe in tqdm(nprobes, desc="nprobe", disable=not progress):
        ivf = [m for m in methods if isinstance(m, IvfMethod)]
        flat = [m for m in methods if not isinstance(m, IvfMethod)]
        for method in ivf:
            method.set_nprobe(nprobe)
            method.search(queries[:8], k)  # warm-up
        times: dict[str, list[float]] = {m.name: [] for m in methods}
        found: dict[str, np.ndarray] = {}
        for round_ in range(rounds):
            for method in ivf + (flat if round_ == 0 else []):
                seconds, found[method.name] = _timed_search(method, queries, k)
                times[method.name].append(seconds)
        singles = {m.name: _single_qps(m, queries[:single], k) for m in ivf} if single else {}
        for method in methods:
            median = float(np.median(times[method.name]))
            records.append(
                method.describe()
                | {
                    "nprobe": nprobe if method in ivf else None,
                    "build_s": method.build_s,
                    "recall_at_k": recall_at(dataset.neighbors, found[method.name], k),
                    "recall_1_at_k": recall_1_at(dataset.neighbors, found[method.name], k),
                    "batched": {"qps": len(queries) / median, "times_s": times[method.name]},
                    "single_qps": singles.get(method.name),
                }
            )
    return records


def speedups(records: Sequence[dict[str, Any]], target: float) -> list[dict[str, Any]]:
    """Per (IVF method, bits): the fastest nprobe reaching ``target`` recall, and its QPS over the flat scan's."""
    flat_qps: dict[float, list[float]] = {}
    for r in records:
        if r["method"] == FLAT:
            flat_qps.setdefault(r["bits"], []).append(r["batched"]["qps"])
    rows = []
    for key in sorted({(r["method"], r["bits"]) for r in records if r["method"] != FLAT}):
        reaching = [r for r in records if (r["method"], r["bits"]) == key and r["recall_at_k"] >= target]
        best = max(reaching, key=lambda r: r["batched"]["qps"], default=None)
        flat = float(np.median(flat_qps[key[1]])) if key[1] in flat_qps else None
        rows.append(
            {
                "method": key[0],
                "bits": key[1],
                "nprobe": best["nprobe"] if best else None,
                "recall_at_k": best["recall_at_k"] if best else None,
                "qps": best["batched"]["qps"] if best else None,
                "flat_qps": flat,
                "speedup": best["batched"]["qps"] / flat if best and flat else None,
            }
        )
    return rows


def markdown(records: Sequence[dict[str, Any]], k: int, target: float) -> str:
    headers = ["method", "bits", "B/vector", "nprobe", f"{k}-recall@{k}", f"recall@1@{k}", "batched QPS", "single QPS", "build s"]
    rows = [
        [
            r["method"],
            f"{r['bits']:g}",
            fmt(r["bytes_per_vector"], 1),
            "-" if r["nprobe"] is None else str(r["nprobe"]),
            fmt(r["recall_at_k"]),
            fmt(r["recall_1_at_k"]),
            fmt_qps(r["batched"]["qps"]),
            fmt_qps(r["single_qps"]),
            fmt(r["build_s"], 1),
        ]
        for r in sorted(records, key=lambda r: (r["bits"], r["method"], r["nprobe"] or 0))
    ]
    fast = speedups(records, target)
    speed_rows = [
        [s["method"], f"{s['bits']:g}", str(s["nprobe"] or "-"), fmt(s["recall_at_k"]), fmt_qps(s["qps"]), fmt_qps(s["flat_qps"]), fmt(s["speedup"], 1)]
        for s in fast
    ]
    return (
        markdown_table(headers, rows)
        + f"\n\nFastest setting reaching {k}-recall@{k} >= {target:g}, against the exhaustive tqindex scan at the same bits:\n\n"
        + markdown_table(["method", "bits", "nprobe", f"{k}-recall@{k}", "batched QPS", "flat QPS", "speed-up"], speed_rows)
    )


def plot(records: Sequence[dict[str, Any]], k: int, title: str, path: Path) -> None:
    """Batched QPS (log) against k-recall@k: one line per (method, bits) over nprobe; the flat scan as stars."""
    fig, ax = plt.subplots(figsize=(10, 6))
    colours = plt.get_cmap("tab10").colors
    keys = sorted({(r["method"], r["bits"]) for r in records})
    for i, (name, bits) in enumerate(keys):
        rs = sorted((r for r in records if (r["method"], r["bits"]) == (name, bits)), key=lambda r: r["nprobe"] or 0)
        points = [(r["recall_at_k"], r["batched"]["qps"]) for r in rs]
        colour = colours[i % len(colours)]
        if name == FLAT:
            recall = points[0][0]
            ax.scatter([recall], [np.median([p[1] for p in points])], marker="*", s=160, color=colour, label=f"{name} {bits:g}b")
            continue
        marker, line = STYLES.get(rs[0]["family"], ("^", ":"))
        ax.plot(*zip(*points), marker=marker, linestyle=line, color=colour, label=f"{name} {bits:g}b")
        for r, point in zip(rs, points):
            ax.annotate(str(r["nprobe"]), point, textcoords="offset points", xytext=(3, 3), fontsize=6, color=colour)
    ax.set_yscale("log")
    ax.set(xlabel=f"{k}-recall@{k}", ylabel="batched QPS (all queries in one call)", title=f"IVF, nprobe sweep: {title}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
