"""Queries per second of the CPU scan backends by batch size: the measurements behind "auto".

On the CPU "auto" picks the compiled fast-scan where it is built, and otherwise the numba
look-up tables up to ``tqindex.kernels.LUT_MAX_QUERY_BITS`` (queries x bits), then decode +
GEMM. Random Gaussian vectors, an in-memory index, one search call per batch, every backend on
the same index data and queries.

    python benchmarks/bench_backends.py --n 100000 --dim 384 --bits 2 3 4 --out results/bench_backends
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe_machine_md, machine_description, markdown_table, set_threads, summarize, time_runs, write_results  # noqa: E402

from tqindex import TurboQuantIndex  # noqa: E402
from tqindex.kernels import fastscan, lut  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--bits", type=float, nargs="+", default=[2, 3, 4])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1000])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results/bench_backends"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    set_threads(args.threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    queries = rng.standard_normal((max(args.batches), args.dim), dtype=np.float32)

    records = []
    configs = [(bits, backend) for bits in args.bits for backend in _backends(bits, args.dim)]
    for bits, backend in tqdm(configs, desc="configs", disable=args.no_progress):
        index = TurboQuantIndex(args.dim, bits, backend=backend)
        index.add(x, progress=False)
        for m in args.batches:
            times = summarize(time_runs(lambda: index.search(queries[:m], args.k), args.repeats))
            records.append({"bits": bits, "backend": backend, "batch": m, **times, "qps": m / times["median_s"]})

    backends = list(dict.fromkeys(r["backend"] for r in records))
    rows = []
    for bits in args.bits:
        for m in args.batches:
            qps = {r["backend"]: r["qps"] for r in records if r["bits"] == bits and r["batch"] == m}
            rows.append([f"{bits:g}", m, *(f"{qps[b]:,.0f}" if b in qps else "-" for b in backends), max(qps, key=qps.get)])
    machine = machine_description(args.threads)
    markdown = (
        f"{args.n:,} x {args.dim} random Gaussian vectors, k={args.k}, median of {args.repeats} searches.\n\n"
        + markdown_table(["bits", "queries per call", *(f"{b} QPS" for b in backends), "fastest"], rows)
        + f"\n\n{describe_machine_md(machine)}\n"
    )
    write_results(args.out, {"machine": machine, "settings": {k: str(v) for k, v in vars(args).items()}, "records": records}, markdown)
    print(markdown)


def _backends(bits: float, dim: int) -> list[str]:
    """The CPU backends that read this width: fast-scan where built, look-up tables where the layout allows, torch."""
    probe = TurboQuantIndex(dim, bits, backend="torch").codec
    return [b for b, ok in (("fastscan", fastscan.supports(probe)), ("lut", lut.supports(probe.layout)), ("torch", True)) if ok]


if __name__ == "__main__":
    main()
