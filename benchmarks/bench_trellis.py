"""Trellis codes against scalar codes: error and encode throughput of ``TurboQuantCodec``.

Data: i.i.d. standard Gaussian float32 rows (``numpy.random.default_rng(seed)``); every codec
is data-oblivious, so the error depends only on the shape and the bits. For each head_dim and
bits, three codecs of the same stored format (variant "mse", scale "unbiased"): scalar
Lloyd-Max codes, the same with code search (``search=True``), and trellis codes
(``quantizer="trellis"``). Measured:

* relative MSE ``|x - decode(encode(x))|^2 / |x|^2`` (the unbiased scale's reconstruction);
* ``1 - cos^2`` of the decoded vector with ``x`` (the error left after the best scale);
* encode throughput (vectors/s, median of ``--repeats`` runs after a warm-up).

The default bits include the code bits of 3.5 *stored* bits with a one-byte factor
(3.5 - 8 / head_dim in steps of 1/8: 3.25, 3.375, 3.375), the KV cache's budget of interest.

Usage: python benchmarks/bench_trellis.py [--n N] [--dims ...] [--bits ...] [--out DIR] [--no-progress]
"""

from __future__ import annotations

import argparse
import itertools
import math

import numba
import numpy as np
import torch
from tqdm import tqdm

from _common import describe_machine_md, machine_description, markdown_table, set_threads, summarize, time_runs, write_results
from tqindex.codec import TurboQuantCodec

DIMS = (32, 64, 128)
BITS = (2.0, 3.0, "3.5 stored", 4.0)
CODECS = {"scalar": {}, "scalar + search": {"search": True}, "trellis": {"quantizer": "trellis"}}


def code_bits(bits: float | str, dim: int) -> float:
    """Bits per coordinate for the codes; "3.5 stored" = 3.5 minus a one-byte factor per vector,
    rounded down to the codec's steps of 1/8."""
    return math.floor((3.5 - 8 / dim) * 8) / 8 if bits == "3.5 stored" else float(bits)


def measure(dim: int, bits: float, options: dict, x: np.ndarray, repeats: int, seed: int) -> dict:
    codec = TurboQuantCodec(dim, bits, seed=seed, **options)
    decoded = codec.decode(codec.encode(x))
    rel_mse = float(np.mean(np.sum((decoded - x) ** 2, axis=1) / np.sum(x**2, axis=1)))
    cos = np.sum(decoded * x, axis=1) / (np.linalg.norm(decoded, axis=1) * np.linalg.norm(x, axis=1))
    times = time_runs(lambda: codec.encode(x), repeats)
    return {"rel_mse": rel_mse, "one_minus_cos2": float(np.mean(1 - cos**2)), "encode": summarize(times), "vectors_per_s": len(x) / float(np.median(times))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4000, help="vectors per configuration (default 4000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch and numba threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS))
    parser.add_argument("--out", default="results/bench_trellis", help="directory for results.json and results.md")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    set_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    torch.manual_seed(args.seed)

    rows, configs = [], list(itertools.product(args.dims, BITS))
    for dim, bits in tqdm(configs, disable=args.no_progress, desc="configurations"):
        x = np.random.default_rng(args.seed).standard_normal((args.n, dim)).astype(np.float32)
        b = code_bits(bits, dim)
        found = {name: measure(dim, b, options, x, args.repeats, args.seed) for name, options in CODECS.items()}
        for name, result in found.items():
            rows.append({"dim": dim, "bits": b, "codec": name, **result})
        reference = found["scalar + search"]["rel_mse"]
        rows[-1]["rel_mse_vs_search"] = found["trellis"]["rel_mse"] / reference

    headers = ["head_dim", "code bits", "codec", "relative MSE", "1 - cos^2", "trellis / search MSE", "encode vectors/s"]
    table = markdown_table(
        headers,
        [
            [r["dim"], f"{r['bits']:g}", r["codec"], f"{r['rel_mse']:.5f}", f"{r['one_minus_cos2']:.5f}",
             f"{r['rel_mse_vs_search']:.3f}" if "rel_mse_vs_search" in r else "", f"{r['vectors_per_s']:,.0f}"]
            for r in rows
        ],
    )  # fmt: skip
    machine = machine_description(args.threads)
    markdown = f"# Trellis vs scalar codes\n\n{describe_machine_md(machine)}\n\nn = {args.n} Gaussian vectors per row.\n\n{table}\n"
    out = write_results(args.out, {"machine": machine, "n": args.n, "rows": rows}, markdown)
    print(markdown)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
