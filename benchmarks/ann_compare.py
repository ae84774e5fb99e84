"""ann-benchmarks-style comparison (issue 5): every method of ``competitors.py``, over several seeds.

For each bit width and method, and each seed in ``--seeds`` (methods with nothing seeded run
once): bytes per vector, build time, k-recall@k, recall@1@k, Recall@1@k' for k' = 1..``--k-curve``,
the ann-benchmarks "k-nn" recall (a returned id counts when its true distance, recomputed from
the raw vectors, is within the k-th true distance + 1e-3: ann-benchmarks' ``get_recall_values``
with ``knn_threshold``; distances are 1 - cos for "angular", -<q, x> for "dot" and ||q - x|| for
"euclidean"), batched QPS
and single-query QPS (the single-query loop runs for the first seed only). Recalls are averaged
over seeds, with their min, max and standard deviation. Build, search and scoring reuse
``bench_search.py``; what each seed changes is recorded per method ("seeded").

Writes DIR/results.json (every run), DIR/results.md (table) and three plots:
recall_vs_bytes.png, recall_vs_qps.png (with each method's Pareto frontier), recall1_at_k.png.

Usage: python benchmarks/ann_compare.py --dataset NAME_OR_PATH.hdf5 --bits 2 3 4 --out DIR
       [--seeds 0 1 2] [--k 10] [--k-curve 100] [--threads 2] [--methods ...] [--no-single]

IVF: with ``--nlist N`` the run is instead the nprobe sweep of ``ivf_sweep.py``: every method of
``--ivf-methods`` (tqindex's IVF index with residual or vector codes, FAISS IVF-RaBitQ and IVF-PQ)
at N lists, timed side by side per nprobe, with the exhaustive tqindex scan as a reference
(``--flat-reference``); it writes DIR/ivf_results.json, ivf_results.md and ivf_recall_vs_qps.png.

       python benchmarks/ann_compare.py --dataset PATH --bits 4 --out DIR --nlist 1024
       [--nprobe 1 2 4 8 16 32 64 128] [--ivf-methods ...] [--rounds 3] [--ivf-single 0]
       [--flat-reference] [--target-recall 0.9] [--seeds 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from _common import describe_machine_md, machine_description, markdown_table, write_results  # noqa: E402
from bench_search import Timing, dataset_info, fmt, fmt_qps, skipped_md, timing_from_args, try_method  # noqa: E402
import ivf_sweep  # noqa: E402
from competitors import IVF_METHODS, METHODS, configure_threads, describe_threads  # noqa: E402
from tqindex.datasets import Dataset, load_dataset  # noqa: E402

ANNB_EPSILON = 1e-3  # ann-benchmarks' knn_threshold: k-th true distance + epsilon
RECALL_KEYS = ("recall_at_k", "recall_1_at_k", "annb_knn_recall")
FAMILY_STYLES = {
    "tqindex": {"marker": "o", "linestyle": "-"},
    "faiss": {"marker": "s", "linestyle": "--"},
    "turbovec": {"marker": "^", "linestyle": ":"},
}


def annb_distances(dataset: Dataset, ids: np.ndarray) -> np.ndarray:
    """ann-benchmarks distances (smaller is better) from each query to ``train[ids]``: (m, k) float64.

    "angular": 1 - cos; "dot": minus the inner product; "euclidean": the L2 distance (not squared,
    as ann-benchmarks stores it). Padding ids (-1) get +inf.
    """
    found = dataset.train[np.clip(ids, 0, None)].astype(np.float64)  # (m, k, d)
    queries = dataset.test.astype(np.float64)
    dots = np.einsum("md,mkd->mk", queries, found)
    if dataset.distance == "euclidean":
        distances = np.linalg.norm(queries[:, None, :] - found, axis=2)
    elif dataset.distance == "angular":
        norms = np.linalg.norm(queries, axis=1)[:, None] * np.linalg.norm(found, axis=2)
        distances = 1.0 - dots / np.maximum(norms, np.finfo(np.float64).tiny)
    else:
        distances = -dots
    return np.where(ids < 0, np.inf, distances)


def true_annb_distances(dataset: Dataset, k: int) -> np.ndarray:
    """The dataset's first ``k`` true distances in ann-benchmarks' smaller-is-better convention."""
    stored = dataset.distances[:, :k].astype(np.float64)
    return -stored if dataset.distance == "dot" else stored


def annb_knn_recall(dataset: Dataset, ids: np.ndarray, k: int, epsilon: float = ANNB_EPSILON) -> float:
    """ann-benchmarks' "k-nn" recall of found ``ids`` (m, >=k): distance-threshold based, tie-tolerant."""
    threshold = true_annb_distances(dataset, k)[:, k - 1 : k] + epsilon
    return float((annb_distances(dataset, ids[:, :k]) <= threshold).sum(axis=1).mean() / k)


def recall_1_curve(neighbors: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Recall@1@k for k = 1..found.shape[1]: fraction of queries whose true nearest is in found[:, :k]."""
    hits = found == neighbors[:, :1]
    first = np.where(hits.any(axis=1), hits.argmax(axis=1), found.shape[1])
    return np.cumsum(np.bincount(first, minlength=found.shape[1] + 1)[: found.shape[1]]) / len(found)


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, min, max and (population) standard deviation."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()), "std": float(a.std())}


def run_seeds(name: str, bits: float, dataset: Dataset, seeds: Sequence[int], k: int, k_curve: int, timing: Timing) -> dict[str, Any]:
    """Every seed of one (method, bits): per-seed records and their summary, or a "skipped" record."""
    runs = []
    for i, seed in enumerate(seeds):
        seed_timing = timing if i == 0 else dataclasses.replace(timing, single_max_queries=None)
        record, method, found = try_method(name, bits, dataset, seed, k, seed_timing)
        if method is None:
            return record
        _, curve_ids = method.search(dataset.test, k_curve)
        del method  # free this index before the next seed builds its own
        runs.append(
            record
            | {
                "seed": seed,
                "annb_knn_recall": annb_knn_recall(dataset, found, k),
                "recall_1_curve": recall_1_curve(dataset.neighbors, np.asarray(curve_ids)).tolist(),
            }
        )
        if not record["seeded"]:
            break  # nothing changes with the seed: one run says it all
    first = runs[0]
    summary = {key: spread([r[key] for r in runs]) for key in RECALL_KEYS} | {
        "recall_1_curve": np.mean([r["recall_1_curve"] for r in runs], axis=0).tolist(),
        "build_s": float(np.median([r["build_s"] for r in runs])),
        "batched_qps": float(np.median([r["batched"]["qps"] for r in runs])),
        "single_qps": first["single"]["qps"] if first["single"] else None,
    }
    per_seed = ("seed", "build_s", *RECALL_KEYS, "recall_1_curve", "batched", "single")
    return {key: first[key] for key in ("method", "family", "bits", "bytes_per_vector", "seeded")} | {
        "params": {key: value for key, value in first["params"].items() if key != "seed"},
        "runs": [{key: r[key] for key in per_seed} for r in runs],
        "summary": summary,
    }


def results_markdown(results: Sequence[dict[str, Any]], k: int, k_curve: int) -> str:
    """One row per (method, bits): recall means with [min, max] over seeds."""
    curve_ks = sorted({1, k, k_curve})
    headers = ["method", "bits", "B/vector", "build s", f"{k}-recall@{k} [min, max]", "ann-b k-nn recall"]
    headers += [*(f"R@1@{c}" for c in curve_ks), "batched QPS", "single QPS", "seeds"]
    rows = []
    for r in results:
        s = r["summary"]
        recall = s["recall_at_k"]
        rows.append(
            [
                r["method"],
                f"{r['bits']:g}",
                fmt(r["bytes_per_vector"], 1),
                fmt(s["build_s"], 2),
                f"{recall['mean']:.3f} [{recall['min']:.3f}, {recall['max']:.3f}]",
                fmt(s["annb_knn_recall"]["mean"]),
                *(fmt(s["recall_1_curve"][c - 1]) for c in curve_ks),
                fmt_qps(s["batched_qps"]),
                fmt_qps(s["single_qps"]),
                str(len(r["runs"])),
            ]
        )
    return markdown_table(headers, rows)


def _colour(name: str) -> tuple[float, ...]:
    """A fixed colour per method (by its place in `METHODS`)."""
    colours = plt.get_cmap("tab20").colors
    return colours[list(METHODS).index(name) % len(colours)]


def _line(record: dict[str, Any]) -> dict[str, Any]:
    """Plot keyword arguments of a method's line: its colour, its family's marker and line style."""
    return {"color": _colour(record["method"]), **FAMILY_STYLES.get(record["family"], {"marker": "o", "linestyle": "-"})}


def _by_method(results: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        grouped.setdefault(r["method"], []).append(r)
    return {name: sorted(rs, key=lambda r: r["bits"]) for name, rs in grouped.items()}


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (recall, qps) that no other point beats on both, by increasing recall."""
    frontier: list[tuple[float, float]] = []
    for recall, qps in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not frontier or qps > frontier[-1][1]:
            frontier.append((recall, qps))
    return frontier[::-1]


def plot_recall_vs_bytes(results: Sequence[dict[str, Any]], k: int, title: str, path: Path) -> None:
    """k-recall@k (mean, whiskers min..max over seeds) against bytes per vector, one line per method."""
    fig, ax = plt.subplots(figsize=(9, 6))
    for name, rs in _by_method(results).items():
        x = [r["bytes_per_vector"] for r in rs]
        stats = [r["summary"]["recall_at_k"] for r in rs]
        y = [s["mean"] for s in stats]
        err = [[s["mean"] - s["min"] for s in stats], [s["max"] - s["mean"] for s in stats]]
        ax.errorbar(x, y, yerr=err, capsize=3, label=name, **_line(rs[0]))
        for r, xi, yi in zip(rs, x, y):
            ax.annotate(f"{r['bits']:g}b", (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7, color=_colour(name))
    ax.set(xlabel="bytes per vector (code + per-vector factors)", ylabel=f"{k}-recall@{k}", title=f"Recall vs size: {title}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_recall_vs_qps(results: Sequence[dict[str, Any]], k: int, title: str, path: Path) -> None:
    """QPS (log) against k-recall@k, batched and single-query panels; lines are each method's Pareto frontier."""
    panels = [("batched_qps", "batched QPS (all queries in one call)")]
    if any(r["summary"]["single_qps"] for r in results):
        panels.append(("single_qps", "single-query QPS (one query per call)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels) + 2, 6), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for name, rs in _by_method(results).items():
            measured = [r for r in rs if r["summary"][key]]
            if not measured:
                continue
            points = [(r["summary"]["recall_at_k"]["mean"], r["summary"][key]) for r in measured]
            style = _line(rs[0])
            ax.scatter(*zip(*points), marker=style["marker"], color=style["color"])
            ax.plot(*zip(*pareto_frontier(points)), label=name, **style)
            for r, point in zip(measured, points):
                ax.annotate(f"{r['bits']:g}b", point, textcoords="offset points", xytext=(4, 4), fontsize=7, color=style["color"])
        ax.set_yscale("log")
        ax.set(xlabel=f"{k}-recall@{k} (mean over seeds)", ylabel=label, title=f"{label.split(' (')[0]}: {title}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_recall_1_curves(results: Sequence[dict[str, Any]], title: str, path: Path) -> None:
    """Recall@1@k against k (log), one panel per bit width, one line per method."""
    bits = sorted({r["bits"] for r in results})
    fig, axes = plt.subplots(1, len(bits), figsize=(5.5 * len(bits) + 2, 5), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], bits):
        for r in (r for r in results if r["bits"] == b):
            curve = r["summary"]["recall_1_curve"]
            ax.plot(range(1, len(curve) + 1), curve, label=r["method"], markevery=0.2, markersize=4, **_line(r))
        ax.set_xscale("log")
        ax.set(xlabel="k (results returned)", title=f"{b:g} bits")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("Recall@1@k (true nearest in top k)")
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"Recall@1@k: {title}")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="an ann-benchmarks .hdf5 path, registered name or synthetic name")
    parser.add_argument("--bits", type=float, nargs="+", default=[2, 3, 4])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--k-curve", type=int, default=100, help="largest k of the Recall@1@k curve")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--repeats", type=int, default=3, help="timed batched searches per seed (median reported)")
    parser.add_argument("--single-max-queries", type=int, default=200)
    parser.add_argument("--single-max-seconds", type=float, default=20.0)
    parser.add_argument("--no-single", action="store_true", help="skip the single-query loop")
    parser.add_argument("--no-progress", action="store_true")
    ivf = parser.add_argument_group("IVF sweep (with --nlist)")
    ivf.add_argument("--nlist", type=int, default=None, help="run the IVF nprobe sweep with this many lists")
    ivf.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    ivf.add_argument("--ivf-methods", nargs="+", default=list(IVF_METHODS), choices=list(IVF_METHODS), metavar="METHOD")
    ivf.add_argument("--train-rows", type=int, default=None, help="train the lists on a seeded sample of this many rows (default all)")
    ivf.add_argument("--rounds", type=int, default=3, help="timed batched searches per nprobe, methods in turn (median reported)")
    ivf.add_argument("--ivf-single", type=int, default=0, help="queries of the single-query loop per nprobe (0: skip)")
    ivf.add_argument("--flat-reference", action="store_true", help="time the exhaustive tqindex scan alongside")
    ivf.add_argument("--target-recall", type=float, default=0.9, help="the speed-up table's recall threshold")
    return parser.parse_args(argv)


def run_ivf(args: argparse.Namespace, dataset: Dataset, threads: dict[str, Any]) -> dict[str, Any]:
    """The IVF nprobe sweep (``ivf_sweep.py``) for every bit width; writes the ivf_* files."""
    records, skipped = [], []
    for bits in args.bits:
        methods, missing = ivf_sweep.build(args.ivf_methods, dataset, bits, args.nlist, args.seeds[0], args.flat_reference, args.train_rows)
        skipped += missing
        records += ivf_sweep.sweep(methods, dataset, args.k, args.nprobe, args.rounds, args.ivf_single, not args.no_progress)
        del methods
    info = dataset_info(dataset)
    title = f"{info['name']} (n={info['n']:,}, d={info['dim']}, {info['distance']}), nlist={args.nlist}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot = out / "ivf_recall_vs_qps.png"
    if records:
        ivf_sweep.plot(records, args.k, title, plot)
    machine = machine_description(args.threads)
    output = {
        "benchmark": "ann_compare_ivf",
        "dataset": info,
        "config": {key: value for key, value in vars(args).items() if key not in ("out", "no_progress")},
        "threads": threads,
        "machine": machine,
        "results": records,
        "speedups": ivf_sweep.speedups(records, args.target_recall),
        "skipped": skipped,
        "plots": {"recall_vs_qps": plot.name} if records else {},
    }
    markdown = (
        f"# IVF nprobe sweep: {title}, {info['queries']:,} queries\n\n"
        f"{describe_machine_md(machine)}; threads: {describe_threads(threads)}\n\n"
        f"Each method built once (seed {args.seeds[0]}; lists trained on {args.train_rows or 'all'} train rows); per nprobe the methods' batched "
        f"searches (all queries in one call) are timed in turn, {args.rounds} rounds, median reported"
        + ("; the flat tqindex scan once per nprobe step" if args.flat_reference else "")
        + ". B/vector: the code stored per vector (factors included; ids and list numbers excluded).\n\n"
        + ivf_sweep.markdown(records, args.k, args.target_recall)
        + skipped_md(skipped)
        + (f"\n\n![recall vs QPS]({plot.name})" if records else "")
    )
    print(markdown)
    (out / "ivf_results.json").write_text(json.dumps(output, indent=1) + "\n")
    (out / "ivf_results.md").write_text(markdown + "\n")
    print(f"\nwrote {out / 'ivf_results.json'}, {out / 'ivf_results.md'} and {plot.name}")
    return output


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = configure_threads(args.threads)
    dataset = load_dataset(args.dataset, progress=not args.no_progress)
    if args.nlist is not None:
        return run_ivf(args, dataset, threads)
    k_curve = min(args.k_curve, len(dataset.train))
    timing = timing_from_args(args)
    grid = [(bits, name) for bits in args.bits for name in args.methods]
    results, skipped = [], []
    for bits, name in tqdm(grid, desc="methods", unit="method", disable=args.no_progress):
        record = run_seeds(name, bits, dataset, args.seeds, args.k, k_curve, timing)
        (skipped if "skipped" in record else results).append(record)

    info = dataset_info(dataset)
    title = f"{info['name']} (n={info['n']:,}, d={info['dim']}, {info['distance']})"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plots = {name: out / f"{name}.png" for name in ("recall_vs_bytes", "recall_vs_qps", "recall1_at_k")}
    if results:
        plot_recall_vs_bytes(results, args.k, title, plots["recall_vs_bytes"])
        plot_recall_vs_qps(results, args.k, title, plots["recall_vs_qps"])
        plot_recall_1_curves(results, title, plots["recall1_at_k"])
    machine = machine_description(args.threads)
    output = {
        "benchmark": "ann_compare",
        "dataset": info,
        "config": {key: value for key, value in vars(args).items() if key not in ("out", "no_progress")}
        | {"k_curve": k_curve, "annb_epsilon": ANNB_EPSILON},
        "threads": threads,
        "machine": machine,
        "results": results,
        "skipped": skipped,
        "plots": {name: path.name for name, path in plots.items()} if results else {},
    }
    seeded_by_method: dict[str, set[str]] = {}
    for r in results:
        seeded_by_method.setdefault(r["method"], set()).add(r["seeded"] or "nothing (run once)")
    seeded = "; ".join(f"{name}: {' or '.join(sorted(texts))}" for name, texts in seeded_by_method.items())
    markdown = (
        f"# ann-benchmarks-style comparison: {title}, {info['queries']:,} queries\n\n"
        f"{describe_machine_md(machine)}; threads: {describe_threads(threads)}\n\n"
        f"Seeds {args.seeds}; what they change: {seeded}.\n\n"
        f"Recall columns: mean over seeds. ann-b k-nn recall: ann-benchmarks' distance-threshold recall "
        f"(k-th true distance + {ANNB_EPSILON:g}). Batched QPS: median over seeds of the median of {args.repeats} runs; "
        f"single QPS: first seed{' (skipped)' if timing.single_max_queries is None else ''}. "
        f"B/vector: code + per-vector factors, ids excluded.\n\n"
        + results_markdown(results, args.k, k_curve)
        + skipped_md(skipped)
        + ("\n\n" + " ".join(f"![{name}]({path.name})" for name, path in plots.items()) if results else "")
    )
    print(markdown)
    write_results(out, output, markdown)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'} and {len(output['plots'])} plots")
    return output


if __name__ == "__main__":
    main()
