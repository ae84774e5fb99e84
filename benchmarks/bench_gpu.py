"""GPU search throughput: the fused Triton scan against torch on the same GPU and against the CPU scan.

Data: i.i.d. standard Gaussian rows (d = 768 by default), generated and encoded on the GPU in
blocks (``TurboQuantCodec.encode`` on CUDA tensors), so 10M rows never exist as floats at once.
Codes and factors stay resident on the GPU. Queries: Gaussian, ``k = 10``.

Three backends, each timed as the median of ``--repeats`` runs after one untimed warm-up
(which also compiles the Triton kernel), with ``torch.cuda.synchronize()`` around every run:

* triton: ``TritonScanner`` (fp16 operands) over the rows as one chunk.
* torch: the same GPU, ``GemmScanner(dtype=float16)`` on CUDA tensors: decode a chunk to fp16,
  one matmul, ``topk``; chunks of ``--torch-chunk`` rows (bounded memory).
* cpu: ``GemmScanner`` (bf16 where the CPU has it, else fp32) on the host, chunks of
  ``--cpu-chunk`` rows; only for sizes up to ``--cpu-max-n`` (it takes minutes beyond).

Two timings per backend: "scan", the scanner's ``chunk_topk`` over every chunk (the kernel, or
decode + matmul + topk, plus the merge of tiles), and "search", ``rotate_queries`` + ``scan_topk``
(scan, running top-k, exact fp32 rescoring of the candidates): QPS = batch / search time.
Achieved bandwidth = bytes of codes and factors in the index / scan time (each byte counted once
per scan; re-reads from L2 for other query tiles are not counted), and its fraction of the
device's peak (``PEAK_GBPS`` by device name, or ``--peak-gbps``). Triton's ids are checked
against torch's (``ids_agree``: fraction of equal ids, ties aside).

Usage: python benchmarks/bench_gpu.py [--sizes N ...] [--bits B ...] [--batches M ...] [--k K]
       [--repeats R] [--peak-gbps G] [--out DIR] [--quick]
``--device cpu`` with ``TRITON_INTERPRET=1`` smoke-tests the script itself on tiny sizes; its
timings mean nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch

from _common import describe_machine_md, machine_description, markdown_table, write_results
from tqindex.codec import TurboQuantCodec
from tqindex.kernels import Chunk, Scanner, candidate_count, scan_topk
from tqindex.kernels.gemm import GemmScanner
from tqindex.kernels.triton_scan import TritonScanner

SIZES = (1_000_000, 10_000_000)
BITS = (2, 4)
BATCHES = (1, 32, 1024)
QUICK = {"sizes": [100_000], "batches": [1, 32], "repeats": 1}
ENCODE_BLOCK = 1 << 18
# vendor-specified peak memory bandwidth, GB/s; the first key found in torch.cuda.get_device_name() wins
PEAK_GBPS: tuple[tuple[str, float | None], ...] = (
    ("GH200", None),  # 4000 or 4900 depending on the memory fitted: pass --peak-gbps
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5, "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40 GB, SXM4 and PCIe
    ("L40", 864.0),  # L40 and L40S
    ("L4", 300.0),
    ("A10", 600.0),  # A10 and A10G
    ("RTX 4090", 1008.0),
    ("V100", 900.0),
    ("T4", 320.0),
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help=f"rows in the index (default {SIZES})")
    parser.add_argument("--dim", type=int, default=768, help="vector dimension (default 768)")
    parser.add_argument("--bits", type=float, nargs="+", default=list(BITS), help=f"bits per coordinate, variant mse (default {BITS})")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help=f"queries per search (default {BATCHES})")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement; the median is reported (default 5)")
    parser.add_argument("--torch-chunk", type=int, default=1 << 18, help="rows per decode + matmul step of the torch baseline")
    parser.add_argument("--cpu-chunk", type=int, default=1 << 16, help="rows per step of the CPU scan")
    parser.add_argument("--cpu-max-n", type=int, default=1_000_000, help="largest size the CPU scan is timed on (default 1M)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads (default: all usable)")
    parser.add_argument("--peak-gbps", type=float, default=None, help="device peak memory bandwidth in GB/s (default: from the device name)")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu under TRITON_INTERPRET=1 to smoke-test this script")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench_gpu", help="directory for results.json and results.md")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    return args


def check_device(name: str) -> torch.device:
    """The device to run on; refuses a CPU run outside the Triton interpreter (its timings would be meaningless)."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU (docs/benchmarks.md says the GPU numbers are unmeasured)")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--device cpu only smoke-tests the script, under TRITON_INTERPRET=1")
    return device


def peak_gbps(device: torch.device, override: float | None) -> float | None:
    """Peak memory bandwidth in GB/s: ``override``, else the table entry matching the device name, else None."""
    if override is not None or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    return next((gbps for key, gbps in PEAK_GBPS if key in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, Any]:
    """Median wall seconds of ``repeats`` runs after one warm-up (synchronised with the device around each), and the last result."""
    times = []
    for attempt in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        result = run()
        synchronize(device)
        if attempt:
            times.append(time.perf_counter() - start)
    return statistics.median(times), result


def make_codes(codec: TurboQuantCodec, n: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of ``n`` Gaussian rows encoded on ``device``: packed uint8 ``(n, B)``, factors float32 ``(n, F)``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    packed = torch.empty((n, codec.code_bytes), dtype=torch.uint8, device=device)
    factors = torch.empty((n, codec.n_factors), dtype=torch.float32, device=device)
    for start in range(0, n, ENCODE_BLOCK):
        stop = min(n, start + ENCODE_BLOCK)
        codes = codec.encode(torch.randn((stop - start, codec.dim), generator=generator, device=device))
        packed[start:stop], factors[start:stop] = codes.packed, codes.factors
    return packed, factors


def time_backend(
    codec: TurboQuantCodec,
    scanner: Scanner,
    packed: torch.Tensor,
    factors: torch.Tensor,
    chunk_rows: int,
    queries: torch.Tensor,
    k: int,
    repeats: int,
) -> tuple[dict[str, float], torch.Tensor]:
    """Median scan and search seconds of one backend over ``packed``/``factors`` in chunks, and the rows its search found ``(m, k)``."""
    device = packed.device
    queries = queries.to(device)
    chunks = [Chunk(s, packed[s : s + chunk_rows], factors[s : s + chunk_rows]) for s in range(0, packed.shape[0], chunk_rows)]
    prepared = scanner.prepare(codec.rotate_queries(queries))

    def scan() -> None:
        for c in chunks:
            scanner.chunk_topk(prepared, c.packed, c.factors, None, candidate_count(k))

    def search() -> torch.Tensor:
        return scan_topk(codec, scanner, codec.rotate_queries(queries), chunks, k, lambda at: (packed[at], factors[at]))[1]

    scan_s, _ = timed(scan, repeats, device)
    search_s, found = timed(search, repeats, device)
    return {"scan_s": scan_s, "search_s": search_s}, found.cpu()


def bench_config(args: argparse.Namespace, device: torch.device, peak: float | None, n: int, bits: float) -> list[dict[str, Any]]:
    """All backends and batch sizes for one index of ``n`` rows at ``bits``."""
    codec = TurboQuantCodec(args.dim, bits, seed=args.seed)
    packed, factors = make_codes(codec, n, device, args.seed)
    index_bytes = packed.numel() + factors.numel() * factors.element_size()
    backends: dict[str, tuple[Scanner, torch.Tensor, torch.Tensor, int]] = {
        "triton": (TritonScanner(codec), packed, factors, n),  # one chunk: the kernel sizes its own grid
        "torch": (GemmScanner(codec, dtype=torch.float16), packed, factors, args.torch_chunk),
    }
    if n <= args.cpu_max_n:
        backends["cpu"] = (GemmScanner(codec), packed.cpu(), factors.cpu(), args.cpu_chunk)
    rows = []
    for m in args.batches:
        queries = torch.randn((m, args.dim), generator=torch.Generator().manual_seed(args.seed + m))
        ids = {}
        for name, (scanner, codes, scales, chunk_rows) in backends.items():
            repeats = 1 if name == "cpu" else args.repeats
            timing, ids[name] = time_backend(codec, scanner, codes, scales, chunk_rows, queries, args.k, repeats)
            gbps = index_bytes / timing["scan_s"] / 1e9
            rows.append(
                {
                    "n": n, "bits": bits, "batch": m, "backend": name, **timing,
                    "qps": m / timing["search_s"], "scan_gbps": gbps, "peak_fraction": gbps / peak if peak else None,
                }
            )  # fmt: skip
            print(f"n={n} bits={bits} batch={m} {name}: {rows[-1]['qps']:.0f} QPS, scan {gbps:.1f} GB/s", flush=True)
        for row in rows[-len(backends) :]:
            if row["backend"] != "torch":
                row["ids_agree"] = float((ids[row["backend"]] == ids["torch"]).float().mean())
    return rows


def to_markdown(results: dict[str, Any]) -> str:
    gpu = results["gpu"]
    peak = f"{gpu['peak_gbps']:.0f} GB/s" if gpu["peak_gbps"] else "unknown"
    headers = ["n", "bits", "batch", "backend", "QPS", "search ms", "scan ms", "scan GB/s", "of peak", "ids = torch"]
    table = [
        [
            f"{r['n']:,}", f"{r['bits']:g}", r["batch"], r["backend"], f"{r['qps']:,.0f}", f"{1e3 * r['search_s']:.2f}",
            f"{1e3 * r['scan_s']:.2f}", f"{r['scan_gbps']:.1f}",
            f"{100 * r['peak_fraction']:.0f}%" if r["peak_fraction"] is not None else "-",
            f"{r['ids_agree']:.3f}" if "ids_agree" in r else "-",
        ]
        for r in results["rows"]
    ]  # fmt: skip
    return "\n\n".join(
        [
            f"GPU scan, d={results['dim']}, k={results['k']}, variant mse; times are medians of {results['repeats']} "
            f"run(s), 1 for the CPU. GPU: {gpu['name']}, peak bandwidth {peak}, CUDA {gpu['cuda']}, triton {gpu['triton']}.",
            f"Host: {describe_machine_md(results['machine'])}",
            markdown_table(headers, table),
        ]
    )


def main() -> None:
    args = parse_args()
    device = check_device(args.device)
    torch.set_num_threads(args.threads)
    peak = peak_gbps(device, args.peak_gbps)
    rows = [row for n in args.sizes for bits in args.bits for row in bench_config(args, device, peak, n, bits)]
    results = {
        "dim": args.dim, "k": args.k, "repeats": args.repeats,
        "gpu": {
            "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "none (interpreter smoke run)",
            "peak_gbps": peak, "cuda": torch.version.cuda, "triton": metadata.version("triton"),
        },
        "machine": machine_description(args.threads),
        "rows": rows,
    }  # fmt: skip
    out = write_results(args.out, results, to_markdown(results))
    print(f"wrote {out}/results.json and results.md")


if __name__ == "__main__":
    main()
