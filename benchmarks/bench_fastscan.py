"""What each code width costs the compiled fast-scan: look-ups per row, key bytes, and time.

For every width (integer, fractional, prod), an in-memory index of random Gaussian vectors is
searched with ``backend="fastscan"``: one query per call and batches of ``--batch`` queries, on
``--threads`` threads. Reported per width: keys per row (4-bit table look-ups per row and
query), whether the keys are the packed nibbles as they stand ("direct") or are regrouped at
load time, the key-column bytes per row kept beside the codes in RAM, and nanoseconds per row and
query (search time / (rows x queries)), so widths compare at equal work; single queries also
straight through the scanner (``FastScanner.search``: the kernel, its tables and rescoring),
with and without the key columns (without: the rows transposed in registers, as an on-disk
index is scanned). Also the per-call cost
of one search over a small index above the compiled scan itself (``--small`` rows).

    python benchmarks/bench_fastscan.py --n 100000 --dim 384 --out results/bench_fastscan
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe_machine_md, machine_description, markdown_table, set_threads, summarize, time_runs, write_results  # noqa: E402

from tqindex import TurboQuantIndex  # noqa: E402
from tqindex.kernels import fastscan, get_scanner  # noqa: E402
from tqindex.kernels.scan import Chunk  # noqa: E402

WIDTHS = [(1, "mse"), (2, "mse"), (2.5, "mse"), (3, "mse"), (3.5, "mse"), (4, "mse"), (5, "mse"), (6, "mse"), (8, "mse"), (2, "prod"), (4, "prod")]


def width_rows(x: np.ndarray, queries: np.ndarray, args: argparse.Namespace) -> list[dict]:
    records = []
    for bits, variant in tqdm(WIDTHS, desc="widths", disable=args.no_progress):
        index = TurboQuantIndex(x.shape[1], bits, variant=variant, backend="fastscan")
        index.add(x, progress=False)
        scanner = get_scanner(index.codec, "fastscan")
        single = summarize(time_runs(lambda: [index.search(q, args.k) for q in queries[: args.single]], args.repeats))
        # the same single queries straight through the scanner, without the key columns (as an on-disk index is scanned)
        rotated = index.codec.rotate_rows(torch.from_numpy(queries[: args.single]))
        codes, factors = (torch.from_numpy(index._store.read_rows(name, 0, len(x))) for name in ("codes", "factors"))
        columns = Chunk(0, codes, factors, key_columns=index._key_columns(scanner).rows(0, len(x)))
        bare = Chunk(0, codes, factors)
        direct = summarize(time_runs(lambda: [scanner.search(rotated[i : i + 1], [columns], args.k) for i in range(args.single)], args.repeats))
        transposing = summarize(time_runs(lambda: [scanner.search(rotated[i : i + 1], [bare], args.k) for i in range(args.single)], args.repeats))
        batch = summarize(time_runs(lambda: index.search(queries[: args.batch], args.k), args.repeats))
        records.append({
            "bits": bits, "variant": variant, "code_bytes": index.codec.code_bytes, "keys_per_row": scanner.n_keys,
            "direct": scanner.direct, "key_column_bytes": scanner.n_keys // 2,
            "single": single, "single_ns_per_row": single["median_s"] / args.single / len(x) * 1e9,
            "single_kernel": direct, "single_kernel_ns_per_row": direct["median_s"] / args.single / len(x) * 1e9,
            "single_no_key_columns": transposing, "single_no_key_columns_ns_per_row": transposing["median_s"] / args.single / len(x) * 1e9,
            "batch": batch, "batch_ns_per_row": batch["median_s"] / args.batch / len(x) * 1e9,
        })  # fmt: skip
    return records


def call_overhead(dim: int, rows: int, k: int) -> list[dict]:
    """One query over ``rows`` rows: ``index.search`` against the same work done by the scanner
    directly (query rotation + ``FastScanner.search`` over prepared chunks), in one loop each."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    q = rng.standard_normal((1, dim), dtype=np.float32)
    out = []
    for bits in (2, 3, 4):
        index = TurboQuantIndex(dim, bits, backend="fastscan")
        index.add(x, progress=False)
        scanner = get_scanner(index.codec, "fastscan")
        store = index._store
        chunk = Chunk(
            0, torch.from_numpy(store.read_rows("codes", 0, rows)), torch.from_numpy(store.read_rows("factors", 0, rows)),
            key_columns=index._key_columns(scanner).rows(0, rows),
        )  # fmt: skip

        def best_us(run, number=2000):
            run()
            return min(timeit.repeat(run, number=number, repeat=5)) / number * 1e6

        search = best_us(lambda: index.search(q, k))
        scan = best_us(lambda: scanner.search(index.codec.rotate_rows(torch.from_numpy(q)), [chunk], k))
        rotation = best_us(lambda: index.codec.rotate_rows(torch.from_numpy(q)))
        out.append({"bits": bits, "rows": rows, "search_us": search, "rotation_plus_scan_us": scan, "rotation_us": rotation})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--single", type=int, default=50, help="queries searched one per call")
    parser.add_argument("--batch", type=int, default=64, help="queries per batched call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--small", type=int, default=1000, help="rows of the index the per-call cost is measured on")
    parser.add_argument("--out", type=Path, default=Path("results/bench_fastscan"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    if not fastscan.available():
        sys.exit("the compiled fast-scan is not built: reinstall tqindex with a C++ compiler")
    set_threads(args.threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    queries = rng.standard_normal((max(args.single, args.batch), args.dim), dtype=np.float32)
    records = width_rows(x, queries, args)
    overhead = call_overhead(args.dim, args.small, args.k)

    rows = [
        [f"{r['bits']:g}", r["variant"], r["code_bytes"], r["keys_per_row"], "yes" if r["direct"] else "regrouped",
         r["key_column_bytes"], f"{r['single_ns_per_row']:.2f}", f"{r['single_kernel_ns_per_row']:.2f}", f"{r['single_no_key_columns_ns_per_row']:.2f}", f"{r['batch_ns_per_row']:.2f}"]
        for r in records
    ]  # fmt: skip
    small = [
        [r["bits"], f"{r['search_us']:.1f}", f"{r['rotation_plus_scan_us']:.1f}", f"{r['rotation_us']:.1f}",
         f"{r['search_us'] - r['rotation_plus_scan_us']:.1f}"]
        for r in overhead
    ]  # fmt: skip
    machine = machine_description(args.threads)
    markdown = (
        f"{args.n:,} x {args.dim} random Gaussian vectors, k={args.k}, {args.threads} thread(s), median of {args.repeats}; "
        f"single: {args.single} queries one per call; batched: {args.batch} queries per call. Build: {fastscan.isa()}.\n\n"
        + markdown_table(
            ["bits", "variant", "code B/row", "keys/row", "keys", "key-column B/row", "single ns/row (index.search)", "single ns/row (kernel)", "single ns/row (kernel, no key columns)", f"batch-{args.batch} ns/row/query"], rows
        )
        + f"\n\nOne query over {args.small:,} rows (best of 5 x 2,000 calls, microseconds):\n\n"
        + markdown_table(["bits", "index.search", "rotation + FastScanner.search", "of which rotation", "the rest of the call"], small)
        + f"\n\n{describe_machine_md(machine)}\n"
    )
    settings = {k: str(v) for k, v in vars(args).items()}
    write_results(args.out, {"machine": machine, "settings": settings, "widths": records, "call_overhead": overhead}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
