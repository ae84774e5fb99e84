"""GPU search and encode against the ceilings of the same GPU (issue 12's targets).

Ceilings, measured first in the same run: the device-to-device copy bandwidth (bytes read + written
over the time of ``dst.copy_(src)`` on a 4 GB buffer) and the uncompressed fp16 brute force
(``q @ x.T`` + ``torch.topk`` over float16 vectors in chunks of ``--brute-chunk`` rows, merged).

Measured, each against those ceilings (times: medians of ``--repeats`` runs after a warm-up, CUDA
events around each run):

* scan: ``TritonScanner.candidates`` over all rows resident on the GPU (the kernel and the merge of
  the programs' candidates), in the form ``get_scanner`` picks for each batch; achieved code
  bandwidth = code + factor bytes / time, as a fraction of the copy bandwidth.
* sweep: the same at the largest size under each tiling of ``SWEEP`` (both forms, rows and
  coordinates per step, warps, programs per SM, pipelining; gathers by inline PTX vs ``tl.load``),
  and the int8 form (``TritonScanner(dtype=torch.int8)``, ``triton_int8``: DP4A on CUDA cores, int8
  ``tl.dot`` on tensor cores) at 2 and 4 bits, with its whole ``search_resident`` and the fraction
  of its ids equal to the default form's; and, on tensor cores, float16 levels looked up in
  registers (``TritonScanner(register_tables=True)``) instead of gathered.
* search: ``search_resident`` (scan, exact rescoring on the device, one synchronisation), the path
  ``TurboQuantIndex.search`` takes on a resident GPU index.
* torch: the same codes decoded to fp16 chunk by chunk + one matmul + topk (``GemmScanner``), the
  baseline the tensor-core form must beat at large batches.
* index: ``TurboQuantIndex(d, bits, device="cuda")`` end to end (``add`` of ``--index-size`` rows,
  then ``search`` from numpy queries to numpy ids) against its own kernel time.
* encode: the fused GPU encoder (``kernels.encode``) in vectors/s at d, and on 100k x 1536, with the
  rotation GEMM in float32 and in TF32 (``torch.set_float32_matmul_precision("high")``).
* agreement: the fraction of ids ``search_resident`` shares with an exact float32 scan of the same
  codes (``GemmScanner(float32)`` + rescoring), ties aside.

Rows are i.i.d. Gaussian (d = 768), generated and encoded on the GPU in blocks. ``--smoke`` runs tiny
sizes on the CPU under ``TRITON_INTERPRET=1`` to check the script itself (its timings mean nothing).

Usage: python benchmarks/bench_gpu.py [--sizes N ...] [--bits B ...] [--batches M ...] [--index-size N]
       [--repeats R] [--out DIR] [--smoke]
Prints a short table last and writes results.json / results.md under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import numpy as np
import torch

from _common import describe_machine_md, machine_description, write_results
from tqindex import TurboQuantIndex
from tqindex.codec import TurboQuantCodec
from tqindex.kernels import Chunk, candidate_count, encode, get_scanner, scan_topk, search_resident
from tqindex.kernels.gemm import GemmScanner
from tqindex.kernels.graphs import SearchGraphs
from tqindex.kernels.triton_scan import FMA, INT8_MMA, MMA, ScanConfig, TritonScanner

SMOKE = {"sizes": [1000], "dim": 64, "batches": [1, 40], "index_size": 600, "repeats": 1, "brute_chunk": 400,
         "torch_chunk": 400, "encode_rows": 200, "copy_mb": 8}  # fmt: skip
BLOCK = 1 << 18  # rows generated and encoded per step
GRAPHED = 32  # batches of up to this many queries are also timed through CUDA graphs (kernels.graphs)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000_000], help="rows scanned (default 10M)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--bits", type=float, nargs="+", default=[2, 4], help="bits per coordinate, variant mse")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 1024], help="queries per search")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the tiling sweep (SWEEP) at the largest size")
    parser.add_argument("--index-size", type=int, default=1_000_000, help="rows of the end-to-end index (default 1M)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--brute-chunk", type=int, default=2_000_000, help="rows per q @ x.T step of fp16 brute force")
    parser.add_argument("--torch-chunk", type=int, default=1 << 18, help="rows per decode + matmul step of the torch baseline")
    parser.add_argument("--encode-rows", type=int, default=1_000_000, help="rows encoded for the throughput figure")
    parser.add_argument("--copy-mb", type=int, default=4096, help="buffer for the copy-bandwidth ceiling, MB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench_gpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU under TRITON_INTERPRET=1")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    return args


class Timer:
    """Median seconds of ``repeats`` runs after one warm-up: CUDA events on a GPU, the host clock on the CPU."""

    def __init__(self, device: torch.device, repeats: int):
        self.device, self.repeats = device, repeats

    def __call__(self, run: Callable[[], Any]) -> float:
        run()
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop) / 1e3)
            else:
                began = time.perf_counter()
                run()
                times.append(time.perf_counter() - began)
        return statistics.median(times)


def copy_bandwidth(device: torch.device, megabytes: int, timer: Timer) -> float:
    """Bytes read + written per second by a device-to-device copy."""
    src = torch.randint(0, 255, (megabytes << 20,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src))
    return 2 * src.numel() / seconds


def gaussian_blocks(n: int, dim: int, device: torch.device, seed: int):
    generator = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, n, BLOCK):
        yield start, torch.randn((min(BLOCK, n - start), dim), generator=generator, device=device)


def make_codes(codec: TurboQuantCodec, n: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    packed = torch.empty((n, codec.code_bytes), dtype=torch.uint8, device=device)
    factors = torch.empty((n, codec.n_factors), dtype=torch.float32, device=device)
    for start, x in gaussian_blocks(n, codec.dim, device, seed):
        codes = encode(codec, x)
        packed[start : start + len(x)], factors[start : start + len(x)] = codes.packed, codes.factors
    return packed, factors


_BRUTE: dict[tuple[int, int], float] = {}  # (n, m) -> seconds: the same for every width


def brute_force_seconds(n: int, dim: int, m: int, k: int, chunk: int, device: torch.device, timer: Timer, seed: int) -> float:
    """fp16 ``q @ x.T`` + topk over ``n`` uncompressed rows in chunks, merged: the uncompressed ceiling."""
    if (n, m) not in _BRUTE:
        _BRUTE[n, m] = _brute_force_seconds(n, dim, m, k, chunk, device, timer, seed)
    return _BRUTE[n, m]


def _brute_force_seconds(n: int, dim: int, m: int, k: int, chunk: int, device: torch.device, timer: Timer, seed: int) -> float:
    x = torch.empty((n, dim), dtype=torch.float16, device=device)
    for start, block in gaussian_blocks(n, dim, device, seed):
        x[start : start + len(block)] = block
    q = torch.randn((m, dim), device=device).to(torch.float16)

    def run() -> torch.Tensor:
        best = []
        for start in range(0, n, chunk):
            scores = (q @ x[start : start + chunk].t()).float()
            values, rows = scores.topk(min(k, scores.shape[1]), dim=1)
            best.append((values, rows + start))
        values, rows = torch.cat([b[0] for b in best], 1), torch.cat([b[1] for b in best], 1)
        return rows.gather(1, values.topk(k, dim=1).indices)

    seconds = timer(run)
    del x
    return seconds


def scan_rows(args, device, timer, copy_bps, n: int, bits: float) -> list[dict[str, Any]]:
    """Scan, search and torch baseline for one size and width at each batch (the form ``get_scanner``
    picks); brute force for each batch; at the largest size the tiling sweep (``SWEEP``)."""
    codec = TurboQuantCodec(args.dim, bits, seed=args.seed)
    packed, factors = make_codes(codec, n, device, args.seed)
    code_bytes = packed.numel() + 4 * factors.numel()
    rows = []
    for m in args.batches:
        queries = codec.rotate_queries(torch.randn((m, args.dim), generator=torch.Generator().manual_seed(m)).to(device))
        brute = brute_force_seconds(n, args.dim, m, args.k, args.brute_chunk, device, timer, args.seed + 1)
        scanner = get_scanner(codec, "triton", device, m)
        form = config_name(scanner.config)
        prepared = scanner.cast(queries)
        scan = timer(lambda: scanner.candidates(prepared, packed, factors, None, candidate_count(args.k)))
        search = timer(lambda: search_resident(codec, scanner, queries, packed, factors, None, args.k))
        row = dict(kind="scan", n=n, bits=bits, batch=m, form=form, scan_s=scan, search_s=search,
                   code_gbps=code_bytes / scan / 1e9, of_copy=code_bytes / scan / copy_bps, brute_s=brute, vs_brute=brute / search)  # fmt: skip
        if m >= 32:
            gemm = GemmScanner(codec, dtype=torch.float16)
            chunks = [Chunk(s, packed[s : s + args.torch_chunk], factors[s : s + args.torch_chunk]) for s in range(0, n, args.torch_chunk)]
            row["torch_s"] = timer(lambda: scan_topk(codec, gemm, queries, chunks, args.k, lambda at: (packed[at], factors[at])))
            row["vs_torch"] = row["torch_s"] / search
        rows.append(row)
        print(f"scan n={n} bits={bits:g} batch={m} {form}: scan {1e3 * scan:.3f} ms ({code_bytes / scan / 1e9:.0f} GB/s), "
              f"search {1e3 * search:.3f} ms, fp16 brute force {1e3 * brute:.3f} ms", flush=True)  # fmt: skip
    if n == max(args.sizes) and args.sweep:
        rows += sweep_rows(args, codec, packed, factors, code_bytes, copy_bps, timer, n)
    rows.append(agreement(codec, packed, factors, device, args))
    del packed, factors
    return rows


def _config(mma: bool, m: int, n: int, d: int, w: int, p: int, s: int = 3) -> ScanConfig:
    return ScanConfig(mma=mma, max_block_m=m, block_n=n, block_d=d, num_warps=w, programs_per_sm=p, num_stages=s)


#: tilings timed at the largest size: batch -> configs (batch 1 at every width, the others at the
#: largest): the defaults (``FMA``, ``MMA``) against their neighbours and each other where
#: ``get_scanner`` switches form. The wider sweep that chose them (tile
#: shapes, warps, programs per SM, pipelining) is kept in docs/results/bench_gpu_h200/sweep.
#: the int8 form with 128 coordinates a step (fewer instructions per coordinate at 2 bits:
#: benchmarks/scan_kernel_sass.py)
INT8_WIDE = _config(False, 4, 128, 128, 4, 16)
SWEEP: dict[int, list[ScanConfig]] = {
    1: [FMA, _config(False, 4, 64, 64, 4, 16), _config(False, 4, 128, 64, 4, 32), _config(False, 4, 256, 64, 8, 8)],
    2: [FMA, MMA],
    32: [MMA],
    1024: [MMA, _config(True, 128, 64, 64, 16, 4)],
}


def config_name(config: ScanConfig) -> str:
    c = config
    return f"{'mma' if c.mma else 'fma'} m{c.max_block_m} n{c.block_n} d{c.block_d} w{c.num_warps} p{c.programs_per_sm} s{c.num_stages}"


def sweep_rows(args, codec, packed, factors, code_bytes, copy_bps, timer, n) -> list[dict[str, Any]]:
    """``TritonScanner.candidates`` under each tiling of ``SWEEP``: time and code bandwidth; a
    tiling that fails to compile or run is recorded, not fatal."""
    bits = float(codec.config.bits)
    rows = []
    for m, configs in SWEEP.items():
        if m > 1 and bits != max(args.bits):
            continue
        queries = codec.rotate_queries(torch.randn((m, args.dim), generator=torch.Generator().manual_seed(m)).to(packed.device))
        variants = [(c, torch.float16, {}, "") for c in configs]
        if m == 1 and bits > 2:  # float32 queries (no conversion per value); codebook gathers by tl.load
            variants += [(FMA, torch.float32, {}, " fp32 queries"), (FMA, torch.float16, {"gather_asm": False}, " tl.load gather")]
        if bits in (2, 4):  # the int8 form: CUDA cores (DP4A; 64 and 128 coordinates a step) to 4 queries, tensor cores from 2
            variants += [(c, torch.int8, {}, " int8 dp4a") for c in (FMA, INT8_WIDE) if m <= FMA.max_block_m]
            variants += [(INT8_MMA, torch.int8, {}, " int8 tensor cores")] if m > 1 else []
            # float16 levels looked up in registers by byte permutes instead of gathered (the same operands)
            variants += [(c, torch.float16, {"register_tables": True}, " register look-ups") for c in configs if c.mma]
        for config, dtype, options, label in variants:
            name = config_name(config) + label
            try:
                scanner = TritonScanner(codec, config, dtype, **options)
                prepared = scanner.cast(queries)
                scan = timer(lambda: scanner.candidates(prepared, packed, factors, None, candidate_count(args.k)))
                row = dict(kind="sweep", n=n, bits=bits, batch=m, config=name, scan_s=scan, of_copy=code_bytes / scan / copy_bps)
                if dtype == torch.int8:  # the whole search, and its ids against the default form's
                    row["search_s"] = timer(lambda: search_resident(codec, scanner, queries, packed, factors, None, args.k))
                    _, ids = search_resident(codec, scanner, queries, packed, factors, None, args.k)
                    _, want = search_resident(codec, get_scanner(codec, "triton", packed.device, m), queries, packed, factors, None, args.k)
                    row["ids_equal"] = float((ids == want).float().mean())
                rows.append(row)
                print(f"sweep n={n} bits={bits:g} batch={m} {name}: {1e3 * scan:.3f} ms ({100 * code_bytes / scan / copy_bps:.1f}% copy)", flush=True)
            except Exception as failure:  # noqa: BLE001 - a tiling that does not compile is a result
                rows.append(dict(kind="sweep", n=n, bits=bits, batch=m, config=name, error=repr(failure)[:300]))
                print(f"sweep n={n} bits={bits:g} batch={m} {name}: failed {failure!r}"[:400], flush=True)
    return rows


def agreement(codec, packed, factors, device, args) -> dict[str, Any]:
    """Fraction of ``search_resident``'s ids that an exact float32 scan of the same codes also returns."""
    m = 32
    queries = codec.rotate_queries(torch.randn((m, args.dim), generator=torch.Generator().manual_seed(99)).to(device))
    n = min(packed.shape[0], 1_000_000)
    packed, factors = packed[:n], factors[:n]
    _, fast = search_resident(codec, TritonScanner(codec, MMA), queries, packed, factors, None, args.k)
    chunks = [Chunk(s, packed[s : s + args.torch_chunk], factors[s : s + args.torch_chunk]) for s in range(0, n, args.torch_chunk)]
    _, exact = scan_topk(codec, GemmScanner(codec, torch.float32), queries, chunks, args.k, lambda at: (packed[at], factors[at]))
    same = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(fast.cpu(), exact.cpu())) / (m * args.k)
    return {"kind": "agreement", "n": n, "bits": float(codec.config.bits), "batch": m, "ids_equal": same}


def index_rows(args, device, timer, bits: float) -> list[dict[str, Any]]:
    """``TurboQuantIndex`` on the GPU end to end: add, then search from numpy to numpy, against its kernel."""
    index = TurboQuantIndex(args.dim, bits, seed=args.seed, backend="triton").to(device)  # resident (the CPU too, for --smoke)
    began = time.perf_counter()
    for _, x in gaussian_blocks(args.index_size, args.dim, device, args.seed):
        index.add(x, progress=False)
    add_s = time.perf_counter() - began
    packed, factors = index._resident
    rows = [{"kind": "add", "n": args.index_size, "bits": bits, "seconds": add_s, "vectors_per_s": args.index_size / add_s}]
    for m in args.batches:
        queries = np.random.default_rng(m).standard_normal((m, args.dim)).astype(np.float32)
        scanner = get_scanner(index.codec, "triton", device, m)
        prepared = scanner.cast(index.codec.rotate_queries(torch.from_numpy(queries).to(device)))
        kernel = timer(lambda: scanner.candidates(prepared, packed, factors, None, candidate_count(args.k)))
        index._graphs = SearchGraphs(max_queries=0)
        search = timer(lambda: index.search(queries, args.k))
        index._graphs = SearchGraphs(max_queries=GRAPHED)  # the CUDA-graph search (off by default until measured)
        graphed = timer(lambda: index.search(queries, args.k)) if device.type == "cuda" and m <= GRAPHED else None
        rows.append({"kind": "index", "n": args.index_size, "bits": bits, "batch": m, "search_s": search, "kernel_s": kernel,
                     "over_kernel": search / kernel, "qps": m / search, "graphed_s": graphed})  # fmt: skip
        print(f"index n={args.index_size} bits={bits:g} batch={m}: search {1e3 * search:.3f} ms, kernel {1e3 * kernel:.3f} ms, "
              f"with CUDA graphs {'-' if graphed is None else f'{1e3 * graphed:.3f} ms'}", flush=True)
    index.close()
    return rows


def encode_rows(args, device, timer) -> list[dict[str, Any]]:
    """Encode throughput at torch's float32 matmul precisions: "highest" (float32 rotation GEMM, the
    default) and "high" (TF32 on the tensor cores), with the fraction of code bytes equal to the
    float32 rotation's."""
    rows = []
    saved = torch.get_float32_matmul_precision()
    for dim, n, bits, search in ((args.dim, args.encode_rows, 4, False), (args.dim, args.encode_rows, 4, True), (2 * args.dim, 100_000, 4, False)):
        n = min(n, args.encode_rows)
        codec = TurboQuantCodec(dim, bits, search=search)
        x = torch.randn((n, dim), device=device)
        reference = None
        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            try:
                seconds = timer(lambda: encode(codec, x))
                packed = encode(codec, x).packed
            finally:
                torch.set_float32_matmul_precision(saved)
            reference = packed if reference is None else reference
            same = float((packed == reference).float().mean())
            rows.append({"kind": "encode", "dim": dim, "n": n, "bits": bits, "search": search, "precision": precision, "seconds": seconds,
                         "vectors_per_s": n / seconds, "same_bytes": same})  # fmt: skip
            print(f"encode {n} x {dim} at {bits} bits (search={search}, matmul {precision}): {1e3 * seconds:.2f} ms, "
                  f"{n / seconds / 1e6:.1f} M vectors/s, {same:.4f} of code bytes as float32's", flush=True)  # fmt: skip
    return rows


def summary(results: dict[str, Any]) -> str:
    """The short table: each figure next to its ceiling and issue 12's target."""
    lines = []
    for r in results["rows"]:
        if r["kind"] == "scan":
            torch_part = f" | {r['vs_torch']:.2f}x torch" if r.get("vs_torch") else ""
            lines.append(f"scan   n={r['n']:>10,} b={r['bits']:g} m={r['batch']:>4} {r['form']:<30} "
                         f"scan {1e3 * r['scan_s']:8.3f} ms {100 * r['of_copy']:5.1f}% copy | search {1e3 * r['search_s']:8.3f} ms"
                         f" | {r['vs_brute']:.2f}x fp16 ({1e3 * r['brute_s']:.3f} ms){torch_part}")  # fmt: skip
        elif r["kind"] == "sweep" and "error" not in r:
            search = f" | search {1e3 * r['search_s']:8.3f} ms, {r['ids_equal']:.4f} ids as the default's" if "search_s" in r else ""
            lines.append(f"sweep  n={r['n']:>10,} b={r['bits']:g} m={r['batch']:>4} {r['config']:<45} {1e3 * r['scan_s']:8.3f} ms "
                         f"{100 * r['of_copy']:5.1f}% copy{search}")  # fmt: skip
        elif r["kind"] == "sweep":
            lines.append(f"sweep  n={r['n']:>10,} b={r['bits']:g} m={r['batch']:>4} {r['config']:<34} failed: {r['error'][:80]}")
        elif r["kind"] == "index":
            graphed = "" if r.get("graphed_s") is None else f"; with CUDA graphs {1e3 * r['graphed_s']:.3f} ms = {r['graphed_s'] / r['kernel_s']:.2f}x"
            lines.append(f"index  n={r['n']:>10,} b={r['bits']:g} m={r['batch']:>4} search {1e3 * r['search_s']:8.3f} ms = "
                         f"{r['over_kernel']:.2f}x its kernel ({1e3 * r['kernel_s']:.3f} ms), {r['qps']:,.0f} QPS{graphed}")  # fmt: skip
        elif r["kind"] == "encode":
            lines.append(f"encode {r['n']:>7,} x {r['dim']} b={r['bits']} search={r['search']} matmul {r['precision']}: {1e3 * r['seconds']:.2f} ms, "
                         f"{r['vectors_per_s'] / 1e6:.1f} M vectors/s, {r['same_bytes']:.4f} of bytes as float32's")  # fmt: skip
        elif r["kind"] == "add":
            lines.append(f"add    n={r['n']:>10,} b={r['bits']:g}: {r['seconds']:.2f} s, {r['vectors_per_s'] / 1e6:.2f} M vectors/s")
        elif r["kind"] == "agreement":
            lines.append(f"ids    n={r['n']:>10,} b={r['bits']:g} m={r['batch']}: {r['ids_equal']:.4f} equal to an exact fp32 scan")
    c = results["ceilings"]
    head = f"ceilings: copy {c['copy_gbps']:.0f} GB/s (read + write); device {results['gpu']['name']}; triton {results['gpu']['triton']}"
    return "\n".join([head, *lines])


def main() -> None:
    args = parse_args()
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--smoke runs on the CPU under TRITON_INTERPRET=1 (set it before python starts)")
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke under TRITON_INTERPRET=1 to check the script on the CPU")
    else:
        device = torch.device("cuda")
    timer = Timer(device, args.repeats)
    copy_bps = copy_bandwidth(device, args.copy_mb, timer)
    results = {
        "dim": args.dim, "k": args.k, "repeats": args.repeats, "smoke": args.smoke,
        "ceilings": {"copy_gbps": copy_bps / 1e9},
        "gpu": {"name": torch.cuda.get_device_name(device) if device.type == "cuda" else "none (interpreter smoke run)",
                "cuda": torch.version.cuda, "torch": torch.__version__, "triton": metadata.version("triton")},
        "machine": machine_description(torch.get_num_threads()),
        "rows": [],
    }  # fmt: skip

    def save() -> str:  # after every part: a run cut short keeps what it measured
        table = summary(results)
        out = write_results(args.out, results, "\n\n".join([f"Host: {describe_machine_md(results['machine'])}", "```\n" + table + "\n```"]))
        return f"wrote {out}/results.json and results.md\n\n{table}"

    results["rows"] += encode_rows(args, device, timer)
    save()
    for n in args.sizes:
        for bits in args.bits:
            results["rows"] += scan_rows(args, device, timer, copy_bps, n, bits)
            save()
    for bits in args.bits:
        results["rows"] += index_rows(args, device, timer, bits)
    print(save())


if __name__ == "__main__":
    main()
