"""Queries per second of the CPU scan backends by batch size: where look-up tables beat decode + GEMM.

Sets ``tqindex.kernels.LUT_MAX_QUERIES`` (the batch size up to which "auto" uses the look-up-table
scan). Random Gaussian vectors, an in-memory index, one search call per batch.

    python benchmarks/bench_backends.py --n 100000 --dim 384 --bits 2 4 --out results/bench_backends
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--bits", type=float, nargs="+", default=[2, 4])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
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
    configs = [(bits, backend) for bits in args.bits for backend in ("lut", "torch")]
    for bits, backend in tqdm(configs, desc="configs", disable=args.no_progress):
        index = TurboQuantIndex(args.dim, bits, backend=backend)
        index.add(x, progress=False)
        for m in args.batches:
            times = summarize(time_runs(lambda: index.search(queries[:m], args.k), args.repeats))
            records.append({"bits": bits, "backend": backend, "batch": m, **times, "qps": m / times["median_s"]})

    rows = []
    for bits in args.bits:
        for m in args.batches:
            qps = {r["backend"]: r["qps"] for r in records if r["bits"] == bits and r["batch"] == m}
            rows.append([f"{bits:g}", m, f"{qps['lut']:,.0f}", f"{qps['torch']:,.0f}", "lut" if qps["lut"] > qps["torch"] else "torch"])
    machine = machine_description(args.threads)
    markdown = (
        f"{args.n:,} x {args.dim} random Gaussian vectors, k={args.k}, median of {args.repeats} searches.\n\n"
        + markdown_table(["bits", "queries per call", "lut QPS", "torch (decode+GEMM) QPS", "faster"], rows)
        + f"\n\n{describe_machine_md(machine)}\n"
    )
    write_results(args.out, {"machine": machine, "settings": {k: str(v) for k, v in vars(args).items()}, "records": records}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
