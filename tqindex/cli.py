"""The ``tqindex`` command: build an on-disk index, search it, describe it.

    tqindex build VECTORS OUT_DIR [--bits 4] [--metric ip|cosine] [--variant mse|prod]
    tqindex search INDEX_DIR QUERIES [-k 10] [--out RESULT.npz]
    tqindex info INDEX_DIR

VECTORS and QUERIES are ``.npy`` files of float vectors ``(n, d)`` or ann-benchmarks ``.hdf5``
files (their ``train`` / ``test`` sets). ``search`` prints recall@k when QUERIES is an .hdf5
file with ground truth.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from tqindex.index import TurboQuantIndex


def _load(path: Path, part: str) -> np.ndarray:
    """Vectors from an .npy file, or the ``part`` ("train" or "test") of an ann-benchmarks .hdf5 file."""
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r")
    if path.suffix in (".hdf5", ".h5"):
        from tqindex.datasets import read_hdf5

        return getattr(read_hdf5(path, progress=False), part)
    raise SystemExit(f"tqindex: {path}: expected an .npy or .hdf5 file")


def _build(args: argparse.Namespace) -> None:
    vectors = _load(args.vectors, "train")
    start = time.perf_counter()
    with TurboQuantIndex(vectors.shape[1], args.bits, metric=args.metric, variant=args.variant, seed=args.seed, path=args.out) as index:
        index.add(np.asarray(vectors), progress=not args.no_progress)
        print(f"{index.ntotal:,} vectors, {index.bytes_per_vector} bytes each, in {time.perf_counter() - start:.1f} s -> {args.out}")


def _search(args: argparse.Namespace) -> None:
    queries = _load(args.queries, "test")
    with TurboQuantIndex.open(args.index) as index:
        start = time.perf_counter()
        scores, ids = index.search(np.asarray(queries), args.k)
        seconds = time.perf_counter() - start
    print(f"{len(queries):,} queries in {seconds:.3f} s ({len(queries) / seconds:,.0f} QPS)")
    if args.queries.suffix in (".hdf5", ".h5"):
        from tqindex.datasets import read_hdf5, recall_at

        truth = read_hdf5(args.queries, progress=False).neighbors
        print(f"{args.k}-recall@{args.k}: {recall_at(truth, ids, args.k):.4f}")
    if args.out:
        np.savez(args.out, scores=scores, ids=ids)
        print(f"results -> {args.out}")


def _info(args: argparse.Namespace) -> None:
    with TurboQuantIndex.open(args.index) as index:
        info = {
            "ntotal": index.ntotal,
            "metric": index.metric,
            "codec": index.codec.config.to_dict(),
            "bytes_per_vector": index.bytes_per_vector,
            "bytes_on_disk": sum(f.stat().st_size for f in Path(args.index).iterdir()),
        }
    print(json.dumps(info, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tqindex", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="encode vectors into a new on-disk index")
    build.add_argument("vectors", type=Path)
    build.add_argument("out", type=Path)
    build.add_argument("--bits", type=float, default=4)
    build.add_argument("--metric", choices=("ip", "cosine"), default="ip")
    build.add_argument("--variant", choices=("mse", "prod"), default="mse")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--no-progress", action="store_true")
    build.set_defaults(run=_build)
    search = commands.add_parser("search", help="search an index with a batch of queries")
    search.add_argument("index", type=Path)
    search.add_argument("queries", type=Path)
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--out", type=Path, help="write scores and ids to this .npz file")
    search.set_defaults(run=_search)
    info = commands.add_parser("info", help="print an index's size and codec")
    info.add_argument("index", type=Path)
    info.set_defaults(run=_info)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())
