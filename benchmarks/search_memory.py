"""Peak memory a search adds, by number of queries: it should not grow with the batch.

Builds an on-disk index of ``--rows`` seeded random vectors, then for each count in
``--queries`` searches it in a fresh child process and reports how much that search raised the
process's peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss`` after the search minus
before it; the queries, the index and one warm-up search are in place before). The results
``(m, k)`` are part of the growth; the score matrix of a scan step should not be: the index
scans the queries in tiles (``TurboQuantIndex.search``).

    python benchmarks/search_memory.py --queries 1000 10000 100000 --out docs/results/search_memory
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe_machine_md, machine_description, markdown_table, write_results  # noqa: E402

import tqindex  # noqa: E402

_CHILD = """
import json
import numpy as np, torch, tqindex
torch.set_num_threads({threads})
def status_mb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024
index = tqindex.open({path!r}, chunk_rows={chunk_rows})
queries = np.random.default_rng(1).standard_normal(({queries}, index.dim)).astype(np.float32)
index.search(queries[:64], {k})  # warm-up: kernels compiled, scanner tables made
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # resets VmHWM to VmRSS
before = status_mb("VmRSS")
D, I = index.search(queries, {k})
print(json.dumps(dict(rss_before_mb=before, peak_mb=status_mb("VmHWM"), found=int((I >= 0).sum()))))
"""


def measure(path: Path, queries: int, k: int, chunk_rows: int, threads: int) -> dict:
    """RSS (MiB) before and at the peak of one search of ``queries`` queries, in a fresh process."""
    code = _CHILD.format(path=str(path), queries=queries, k=k, chunk_rows=chunk_rows, threads=threads)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "queries": queries, "growth_mb": result["peak_mb"] - result["rss_before_mb"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--bits", type=float, default=4)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--chunk-rows", type=int, default=8192)
    parser.add_argument("--queries", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write results.json and results.md here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index"
        with tqindex.TurboQuantIndex(args.dim, args.bits, path=path) as index:
            index.add(np.random.default_rng(0).standard_normal((args.rows, args.dim), dtype=np.float32), progress=False)
        runs = [measure(path, m, args.k, args.chunk_rows, args.threads) for m in args.queries]
    settings = {key: getattr(args, key) for key in ("rows", "dim", "bits", "k", "chunk_rows", "threads")}
    results = {"settings": settings, "runs": runs, "machine": machine_description(args.threads)}
    print(json.dumps(runs, indent=1))
    if args.out:
        table = markdown_table(
            ["queries", "RSS before (MiB)", "peak RSS in the search (MiB)", "growth (MiB)"],
            [[f"{r['queries']:,}", f"{r['rss_before_mb']:.0f}", f"{r['peak_mb']:.0f}", f"{r['growth_mb']:.1f}"] for r in runs],
        )
        head = f"On-disk index of {args.rows:,} x {args.dim} at {args.bits:g} bits, k={args.k}, chunk_rows={args.chunk_rows}.\n\n"
        write_results(args.out, results, head + table + "\n\n" + describe_machine_md(results["machine"]))


if __name__ == "__main__":
    main()
