"""Peak memory while searching an on-disk index larger than the memory it is allowed to hold.

Builds (once) an on-disk TurboQuantIndex of at least ``--size-gb`` of codes from seeded random
vectors, then searches it in a fresh child process and reports that process's peak resident
set size (``getrusage(RUSAGE_SELF).ru_maxrss``, which counts every page the process ever had
resident, including mapped file pages) next to its RSS right after importing tqindex and
opening the index. The scan reads codes with ``pread`` in chunks, so the page cache that holds
the file is the kernel's, not the process's.

    python benchmarks/bench_ondisk.py --dir /tmp/tqi-2gb --size-gb 2 --out results/bench_ondisk
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe_machine_md, machine_description, markdown_table, write_results  # noqa: E402

import tqindex  # noqa: E402

_BATCH = 100_000

_SEARCH_CHILD = """
import json, resource, sys, time
import numpy as np, torch, tqindex
torch.set_num_threads({threads})
def rss_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024
index = tqindex.open({path!r}, chunk_rows={chunk_rows})
queries = np.random.default_rng(1).standard_normal(({queries}, index.dim)).astype(np.float32)
opened = rss_mb()
start = time.perf_counter()
D, I = index.search(queries, {k})
seconds = time.perf_counter() - start
print(json.dumps(dict(rss_after_open_mb=opened, rss_after_search_mb=rss_mb(),
                      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      search_s=seconds, rows=index.ntotal, found=int((I >= 0).sum()))))
"""


def build(path: Path, dim: int, bits: float, size_gb: float, progress: bool) -> tqindex.TurboQuantIndex:
    """Create the index at ``path`` (or reopen it) with at least ``size_gb`` GB of codes and factors."""
    if path.exists():
        return tqindex.open(path)
    index = tqindex.TurboQuantIndex(dim, bits, path=path)
    rows = int(size_gb * 1e9 / index.bytes_per_vector) + 1
    rng = np.random.default_rng(0)
    for start in tqdm(range(0, rows, _BATCH), desc="build", unit="batch", disable=not progress):
        index.add(rng.standard_normal((min(_BATCH, rows - start), dim), dtype=np.float32), progress=False)
    return index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="where the index lives (built if missing)")
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--bits", type=float, default=8)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--chunk-rows", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results/bench_ondisk"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    with build(args.dir, args.dim, args.bits, args.size_gb, not args.no_progress) as index:
        rows, bytes_per_vector = index.ntotal, index.bytes_per_vector
    on_disk = sum(f.stat().st_size for f in args.dir.iterdir())
    child = _SEARCH_CHILD.format(
        threads=args.threads, path=str(args.dir), chunk_rows=args.chunk_rows, queries=args.queries, k=args.k
    )
    measured = json.loads(subprocess.run([sys.executable, "-c", child], check=True, capture_output=True, text=True).stdout)
    results = {
        "machine": machine_description(args.threads),
        "settings": vars(args) | {"dir": str(args.dir), "out": str(args.out)},
        "index": {"rows": rows, "bytes_per_vector": bytes_per_vector, "bytes_on_disk": on_disk},
        "search": measured,
    }
    table = markdown_table(
        ["rows", "dim", "bits", "index on disk", "RSS after open", "peak RSS (search)", "search time", "queries"],
        [[
            f"{rows:,}", args.dim, f"{args.bits:g}", f"{on_disk / 1e9:.2f} GB",
            f"{measured['rss_after_open_mb']:.0f} MB", f"{measured['peak_rss_mb']:.0f} MB",
            f"{measured['search_s']:.1f} s", args.queries,
        ]],
    )
    markdown = f"{table}\n\n{describe_machine_md(results['machine'])}\n"
    write_results(args.out, results, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
