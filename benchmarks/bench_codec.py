"""Encode throughput of tqindex's ``TurboQuantCodec`` next to FAISS's own TurboQuant encoders.

Data: i.i.d. standard Gaussian float32 rows from ``numpy.random.default_rng(seed)``. Both
codecs are data-oblivious (a fixed rotation and codebook), so speed depends only on shape.

Timed, as the median of ``--repeats`` runs after one untimed warm-up:

* tqindex encode: ``codec.encode(x)`` on the float32 numpy array, end to end (conversion to
  torch and the finiteness check, rotation, quantisation, packing, numpy out).
* FAISS add: ``index.add(x)`` on a freshly built and trained empty index (its pre-transforms,
  SQ encoding, appending the codes). Building and training happen outside the timed region.
* tqindex construction: ``TurboQuantCodec(...)`` (rotation + Lloyd-Max codebook), cold (codebook
  cache cleared) and cached (codebook reused; the rotation is always rebuilt).
* FAISS train: ``index.train()`` on the first ``TRAIN_ROWS`` rows (rotation + codebook), after
  ``index_factory`` (untimed).

Pairs compared: variant "mse" with ``L2norm,RR,SQtqmse{b}`` (FAISS keeps no norm: unit vectors
only) and variant "prod" with ``RR,SQtq{b}`` ((b-1)-bit MSE + 1 QJL bit + two float factors).
FAISS's SQ codecs do not rotate by themselves: the ``RR``/``HR`` pre-transform does.

With ``--search`` the tqindex codecs use code search (``TurboQuantCodec(search=True)``).

Usage: python benchmarks/bench_codec.py [--n N] [--repeats R] [--threads T] [--out DIR] [--quick] [--search]
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from _common import describe_machine_md, machine_description, markdown_table, set_threads, summarize, time_runs, write_results
from tqindex import codebook
from tqindex.codec import TurboQuantCodec

DIMS = (128, 384, 1536)
BITS = (2, 3, 4)
VARIANTS = ("mse", "prod")
ROTATION_DIMS = (384, 512)
ROTATION_BITS = 4
TRAIN_ROWS = 1000
CHECK_ROWS = 2000
QUICK_N = 2000
FAISS_SPEC = {"mse": "L2norm,{rotation},SQtqmse{bits}", "prod": "{rotation},SQtq{bits}"}
FAISS_ROTATION = {"dense": "RR", "hadamard": "HR"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="vectors encoded per run (default 100000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is reported (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch and FAISS (OpenMP) threads (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of the codecs (default 0)")
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS), help=f"dimensions (default {DIMS})")
    parser.add_argument("--bits", type=int, nargs="+", default=list(BITS), help=f"bits per coordinate (default {BITS})")
    parser.add_argument("--out", default="results/bench_codec", help="directory for results.json and results.md")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: n={QUICK_N}, one repeat")
    parser.add_argument("--search", action="store_true", help="tqindex codecs with code search (search=True)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args()
    if args.quick:
        args.n, args.repeats = QUICK_N, 1
    return args


@functools.lru_cache(maxsize=1)
def gaussian(n: int, d: int, seed: int) -> np.ndarray:
    """Seeded i.i.d. N(0, 1) float32 rows ``(n, d)`` (cached: configurations come grouped by d)."""
    return np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)


def direction_error(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Mean ``||x/|x| - x_hat/|x_hat| ||^2``: checks that both sides encode the same thing."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    v = x_hat / np.linalg.norm(x_hat, axis=1, keepdims=True)
    return float(np.mean(np.sum((u - v) ** 2, axis=1)))


def throughput(n: int, timing: dict[str, Any]) -> float:
    return n / timing["median_s"]


# ---- tqindex ------------------------------------------------------------------------------
SEARCH = False  # set from --search


def make_codec(d: int, bits: int, variant: str, rotation: str, seed: int) -> TurboQuantCodec:
    return TurboQuantCodec(d, bits, variant=variant, rotation=rotation, seed=seed, search=SEARCH)


def clear_codebook_cache() -> None:
    """Forget the cached Lloyd-Max codebooks, so the next codec computes them again."""
    codebook._lloyd_max.cache_clear()


def bench_tqindex(x: np.ndarray, bits: int, variant: str, rotation: str, seed: int, repeats: int) -> dict[str, Any]:
    """Construction (cold, cached), encode timing, bytes and direction error of one tqindex codec."""
    build = functools.partial(make_codec, x.shape[1], bits, variant, rotation, seed)
    cold = time_runs(lambda _: build(), repeats, setup=clear_codebook_cache)
    cached = time_runs(build, repeats)
    codec = build()
    encode = summarize(time_runs(lambda: codec.encode(x), repeats))
    sample = x[:CHECK_ROWS]
    codes = codec.encode(sample)
    assert codes.nbytes == len(sample) * codec.bytes_per_vector, (codes.nbytes, codec)
    return {
        "rotation": codec.config.rotation,
        "rotated_dim": codec.rotated_dim,
        "bytes_per_vector": codec.bytes_per_vector,
        "construct_cold": summarize(cold),
        "construct_cached": summarize(cached),
        "encode": encode,
        "vectors_per_s": throughput(len(x), encode),
        "direction_error": direction_error(sample, codec.decode(codes)),
    }


# ---- FAISS --------------------------------------------------------------------------------
def faiss_spec(variant: str, bits: int, rotation: str = "dense") -> str:
    return FAISS_SPEC[variant].format(rotation=FAISS_ROTATION[rotation], bits=bits)


def trained_index(spec: str, x: np.ndarray) -> faiss.Index:
    index = faiss.index_factory(x.shape[1], spec)
    index.train(x[:TRAIN_ROWS])
    return index


def stored_bytes_per_vector(index: faiss.IndexPreTransform) -> int:
    """Bytes per vector actually held by the index's code array after ``add``."""
    codes = faiss.downcast_index(index.index).codes
    return codes.size() // index.ntotal


def faiss_direction_error(index: faiss.IndexPreTransform, sample: np.ndarray) -> float | None:
    """``direction_error`` of the stored codes of ``sample``; None where FAISS cannot invert the
    transform (``HR`` with padding: "HadamardRotation inverse requires equal input/output dimensions")."""
    try:
        return direction_error(sample, index.reconstruct_n(0, len(sample)))
    except RuntimeError:
        return None


def bench_faiss(x: np.ndarray, spec: str, repeats: int) -> dict[str, Any]:
    """Train and add timing, bytes and direction error of one FAISS factory string."""
    d = x.shape[1]
    train = time_runs(lambda index: index.train(x[:TRAIN_ROWS]), repeats, setup=lambda: faiss.index_factory(d, spec))
    add = summarize(time_runs(lambda index: index.add(x), repeats, setup=lambda: trained_index(spec, x)))
    sample = x[:CHECK_ROWS]
    index = trained_index(spec, x)
    index.add(sample)
    code_size = index.sa_code_size()
    assert stored_bytes_per_vector(index) == code_size, (spec, stored_bytes_per_vector(index), code_size)
    return {
        "spec": spec,
        "rotated_dim": index.chain.at(index.chain.size() - 1).d_out,
        "bytes_per_vector": code_size,
        "train": summarize(train),
        "add": add,
        "vectors_per_s": throughput(len(x), add),
        "direction_error": faiss_direction_error(index, sample),
    }


# ---- configurations -----------------------------------------------------------------------
def encode_job(d: int, bits: int, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """One row of the main table: tqindex (rotation "auto") next to FAISS with RR."""
    x = gaussian(args.n, d, args.seed)
    return {
        "d": d,
        "bits": bits,
        "variant": variant,
        "tqindex": bench_tqindex(x, bits, variant, "auto", args.seed, args.repeats),
        "faiss": bench_faiss(x, faiss_spec(variant, bits), args.repeats),
    }


def rotation_job(d: int, rotation: str, args: argparse.Namespace) -> dict[str, Any]:
    """One row pair of the rotation table: dense vs Hadamard, tqindex and FAISS, variant mse."""
    x = gaussian(args.n, d, args.seed)
    return {
        "d": d,
        "bits": ROTATION_BITS,
        "rotation": rotation,
        "tqindex": bench_tqindex(x, ROTATION_BITS, "mse", rotation, args.seed, args.repeats),
        "faiss": bench_faiss(x, faiss_spec("mse", ROTATION_BITS, rotation), args.repeats),
    }


def jobs(args: argparse.Namespace) -> list[tuple[str, str, Callable[[], dict[str, Any]]]]:
    """(table name, label, job) for every configuration, grouped by dimension."""
    encode = [
        ("encode", f"d={d} b={bits} {variant}", functools.partial(encode_job, d, bits, variant, args))
        for d in args.dims
        for bits in args.bits
        for variant in VARIANTS
    ]
    rotation = [
        ("rotation", f"d={d} {rotation}", functools.partial(rotation_job, d, rotation, args))
        for d in ROTATION_DIMS
        for rotation in FAISS_ROTATION
    ]
    return encode + rotation


# ---- reporting ----------------------------------------------------------------------------
def rate(value: float) -> str:
    return f"{value:,.0f}"


def ms(timing: dict[str, Any]) -> str:
    return f"{1e3 * timing['median_s']:.1f}"


def error(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def encode_table(rows: list[dict[str, Any]]) -> str:
    headers = ["d", "bits", "variant", "tqindex rotation", "tqindex vec/s", "FAISS spec", "FAISS vec/s",
               "tqindex / FAISS", "tqindex B/vec", "FAISS B/vec", "tqindex dir. err", "FAISS dir. err"]
    body = [
        [r["d"], r["bits"], r["variant"], r["tqindex"]["rotation"], rate(r["tqindex"]["vectors_per_s"]),
         f"`{r['faiss']['spec']}`", rate(r["faiss"]["vectors_per_s"]),
         f"{r['tqindex']['vectors_per_s'] / r['faiss']['vectors_per_s']:.2f}",
         r["tqindex"]["bytes_per_vector"], r["faiss"]["bytes_per_vector"],
         error(r["tqindex"]["direction_error"]), error(r["faiss"]["direction_error"])]
        for r in rows
    ]
    return markdown_table(headers, body)


def construction_table(rows: list[dict[str, Any]]) -> str:
    headers = ["d", "bits", "variant", "tqindex cold ms", "tqindex cached ms", "FAISS spec", "FAISS train ms"]
    body = [
        [r["d"], r["bits"], r["variant"], ms(r["tqindex"]["construct_cold"]), ms(r["tqindex"]["construct_cached"]),
         f"`{r['faiss']['spec']}`", ms(r["faiss"]["train"])]
        for r in rows
    ]
    return markdown_table(headers, body)


def rotation_table(rows: list[dict[str, Any]]) -> str:
    headers = ["d", "bits", "rotation", "rotated dim", "tqindex vec/s", "tqindex B/vec", "tqindex dir. err",
               "FAISS spec", "FAISS vec/s", "FAISS B/vec", "FAISS dir. err"]
    body = [
        [r["d"], r["bits"], r["rotation"], r["tqindex"]["rotated_dim"], rate(r["tqindex"]["vectors_per_s"]),
         r["tqindex"]["bytes_per_vector"], error(r["tqindex"]["direction_error"]), f"`{r['faiss']['spec']}`",
         rate(r["faiss"]["vectors_per_s"]), r["faiss"]["bytes_per_vector"], error(r["faiss"]["direction_error"])]
        for r in rows
    ]
    return markdown_table(headers, body)


def report(results: dict[str, Any]) -> str:
    """The Markdown report: settings, machine, and the three tables."""
    s = results["settings"]
    return "\n\n".join([
        "# Codec encode throughput: tqindex vs FAISS",
        f"n = {s['n']:,} {s['data']}; median of {s['repeats']} runs after a warm-up; {s['threads']} threads; "
        f"tqindex code search {'on' if s.get('search') else 'off'}.",
        f"Machine: {describe_machine_md(results['machine'])}",
        "## Encode",
        "tqindex: `codec.encode(x)` end to end (numpy float32 in, numpy codes out), rotation \"auto\" "
        "(Hadamard for power-of-two d, else dense). FAISS: `index.add(x)` on a trained empty index. "
        "B/vec: stored bytes per vector; tqindex includes its float32 factors (4 B for mse, 8 B for prod); "
        "FAISS `SQtqmse` stores no norm (unit vectors only), `SQtq` includes two float32 factors. "
        f"dir. err: mean squared distance between the unit input and the unit decoded vector over {CHECK_ROWS} rows "
        "(for prod the two decoders treat the QJL bits differently).",
        encode_table(results["encode"]),
        "## Construction",
        "tqindex: `TurboQuantCodec(...)`: cold clears the codebook cache first; cached reuses the codebook "
        f"(the rotation is rebuilt every time). FAISS: `index.train()` on {TRAIN_ROWS} rows after `index_factory`.",
        construction_table(results["encode"]),
        "## Rotation: dense vs Hadamard (variant mse)",
        "Hadamard pads d to the next power of two (384 -> 512), which costs code bytes. "
        "n/a: FAISS cannot decode `HR` when it pads (no inverse).",
        rotation_table(results["rotation"]),
    ])


def main() -> None:
    global SEARCH
    args = parse_args()
    SEARCH = args.search
    set_threads(args.threads)
    results: dict[str, Any] = {
        "benchmark": "bench_codec",
        "settings": {
            "n": args.n, "repeats": args.repeats, "threads": args.threads, "seed": args.seed,
            "data": "i.i.d. N(0, 1) float32 rows, numpy default_rng(seed)",
            "statistic": "median of repeats after one warm-up run", "faiss_train_rows": TRAIN_ROWS,
            "check_rows": CHECK_ROWS, "quick": args.quick, "search": args.search,
        },
        "machine": machine_description(args.threads),
        "encode": [],
        "rotation": [],
    }
    progress = tqdm(jobs(args), desc="configurations", disable=args.no_progress)
    for table, label, job in progress:
        progress.set_postfix_str(label)
        results[table].append(job())
    markdown = report(results)
    print(markdown)
    out = write_results(args.out, results, markdown)
    print(f"\nwrote {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    main()
