"""The ``tqindex`` command: build an on-disk index, search it, describe it, verify it, benchmark.

    tqindex [--quiet] [--version] COMMAND ...
    tqindex build INPUT --out DIR [--bits 4] [--metric ip|cosine|l2] [--variant mse|prod] [--seed 0] [--batch 65536]
    tqindex search DIR --queries FILE [-k 10] [--truth FILE] [--out RESULT.npz|RESULT.npy]
    tqindex info DIR
    tqindex verify DIR
    tqindex bench DATASET [--bits 2 3 4] [-k 10] [--faiss]

Vector files: .npy (an (n, d) array of numbers, memory-mapped), .fvecs / .bvecs (TEXMEX), or an
ann-benchmarks .hdf5 file (its "train" for build, "test" for search). build adds INPUT --batch
rows at a time behind a progress bar, so a large .npy / .fvecs file is never wholly in RAM; a
failed build removes what it wrote. The metric of an .hdf5 file's index comes from its distance
(euclidean: l2, angular: cosine, dot or ip: ip; --metric may only repeat it), else --metric (default ip).
search refuses an .hdf5 query file whose distance does not match the index's metric, prints QPS,
and k-recall@k where there is ground truth: the .hdf5 file's "neighbors" or --truth (.ivecs, .npy
or .hdf5); --out writes scores and ids (.npz) or the ids alone (.npy); for an l2 index the scores
are squared distances, smallest first.
info prints the index as JSON; verify re-reads every file of the index, checks its checksums and
prints the report as JSON. bench builds in-memory indexes of an ann-benchmarks file or dataset name
(see tqindex.datasets.load_dataset) at each --bits, with the metric of its distance, and prints
bytes/vector, recall and QPS; --faiss adds FAISS's TurboQuant (RR,SQtqmse{b}) at the same bits.

--quiet (before or after COMMAND): no progress bars (shown on a terminal only anyway), only results.

Exit status: 0 success; 1 the operation failed (a missing, unreadable or corrupt file or index,
bad input), reported as one line "tqindex: error: MESSAGE" on stderr (TQINDEX_DEBUG=1 shows the
traceback instead); 2 a usage error (argparse's message); 130 interrupted; 141 the reader of its
output went away (a closed pipe), silently.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from tqindex import __version__
from tqindex._arrays import as_float32
from tqindex.datasets._optional import require
from tqindex.datasets.vecs import VECS_DTYPES, read_vecs
from tqindex.errors import TQIndexError
from tqindex.index import TurboQuantIndex

FAILURES = (TQIndexError, ValueError, TypeError, KeyError, OSError, ImportError)  # exit 1, one line
QUERY_BATCH = 1024  # queries searched per step (bounds the score matrix; drives the progress bar)
#: an ann-benchmarks file's "distance" attribute -> the index metric that ranks as it does
DISTANCE_METRICS = {"euclidean": "l2", "angular": "cosine", "dot": "ip", "ip": "ip"}


# ---- reading vector files --------------------------------------------------------------
def _open_vectors(path: Path, part: str, files: ExitStack) -> tuple[Any, Any]:
    """``(array, hdf5_file_or_None)``: an (n, d) array-like whose rows are read when sliced.

    .npy and TEXMEX files are memory-mapped; for .hdf5 ``part`` is the dataset and the file is
    kept open in ``files``.
    """
    suffix, h5 = path.suffix.lower(), None
    if suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as error:
            raise ValueError(f"{path}: not a readable .npy file ({error})") from error
    elif suffix in VECS_DTYPES:
        array = read_vecs(path)
    elif suffix in (".hdf5", ".h5"):
        h5py = require("h5py", "datasets")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        try:
            h5 = files.enter_context(h5py.File(path, "r"))
        except OSError as error:
            raise ValueError(f"{path}: not a readable HDF5 file ({error})") from error
        if part not in h5:
            raise ValueError(f"{path}: no dataset {part!r} (it holds {sorted(h5)})")
        array = h5[part]
    else:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; expected .npy, .fvecs, .ivecs, .bvecs or .hdf5")
    if len(array.shape) != 2 or array.dtype.kind not in "fiu":
        raise ValueError(f"{path}: expected an (n, d) array of numbers, got shape {array.shape} of {array.dtype}")
    return array, h5


def _file_distance(path: Path, h5: Any) -> tuple[str, str] | None:
    """An .hdf5 file's "distance" attribute and the index metric that ranks by it; None for other
    files or no distance. ValueError naming the distance when no metric ranks by it."""
    if h5 is None or "distance" not in h5.attrs:
        return None
    distance = _text(h5.attrs["distance"])
    if distance not in DISTANCE_METRICS:
        raise ValueError(f"{path}: distance {distance!r} is not supported (only {', '.join(DISTANCE_METRICS)})")
    return distance, DISTANCE_METRICS[distance]


def _show_progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


# ---- commands --------------------------------------------------------------------------
def _build(args: argparse.Namespace) -> None:
    with ExitStack() as files:
        vectors, h5 = _open_vectors(args.input, "train", files)
        n, dim = vectors.shape
        if n == 0 or dim == 0:
            raise ValueError(f"{args.input}: holds no vectors (shape {vectors.shape})")
        distance, metric = _file_distance(args.input, h5) or (None, args.metric or "ip")
        if args.metric not in (None, metric):
            raise ValueError(f"{args.input}: its distance is {distance!r}, which needs --metric {metric}, not {args.metric}")
        if args.out.is_dir() and any(args.out.iterdir()):
            raise ValueError(f"{args.out}: exists and is not empty: remove it or give another --out")
        existed, start = args.out.exists(), time.perf_counter()
        index = TurboQuantIndex(dim, args.bits, metric=metric, variant=args.variant, seed=args.seed, path=args.out)
        try:
            with index, tqdm(total=n, desc="build", unit="vec", unit_scale=True, disable=not _show_progress(args)) as bar:
                for i in range(0, n, args.batch):
                    batch = as_float32(vectors[i : i + args.batch], str(args.input), first_row=i)
                    try:
                        index.add(batch, progress=False)
                    except ValueError as error:
                        raise ValueError(f"{args.input}: vectors {i}..{i + len(batch) - 1}: {error}") from error
                    bar.update(len(batch))
        except BaseException:
            _remove_partial(args.out, existed)
            raise
    seconds = time.perf_counter() - start
    print(f"{n:,} vectors (d={dim}, {args.bits:g} bits, {metric}), {index.bytes_per_vector} bytes each, in {seconds:.1f} s -> {args.out}")


def _remove_partial(out: Path, existed: bool) -> None:
    """Remove what a failed build wrote: the directory, or its contents if it was there (empty) before."""
    if not existed:
        shutil.rmtree(out, ignore_errors=True)
    elif out.is_dir():
        for child in out.iterdir():
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else None if value is None else str(value)


def _search(args: argparse.Namespace) -> None:
    with ExitStack() as files:
        array, h5 = _open_vectors(args.queries, "test", files)
        distance = _file_distance(args.queries, h5)
        queries = as_float32(array[:], str(args.queries))
        truth_file = args.truth or (args.queries if h5 is not None and "neighbors" in h5 else None)
        truth = np.asarray(_open_vectors(truth_file, "neighbors", files)[0][:]) if truth_file else None
    if len(queries) == 0:
        raise ValueError(f"{args.queries}: holds no queries")
    if truth is not None and (len(truth) != len(queries) or truth.shape[1] < args.k):
        raise ValueError(f"{truth_file}: ground truth {truth.shape} does not fit {len(queries)} queries at k={args.k}")
    found_scores, found_ids = [], []
    with TurboQuantIndex.open(args.index) as index:
        if distance is not None and distance[1] != index.metric:
            raise ValueError(
                f"{args.queries}: its distance {distance[0]!r} needs an index of metric {distance[1]}, "
                f"but {args.index} has metric {index.metric}"
            )
        with tqdm(total=len(queries), desc="search", unit="query", disable=not _show_progress(args)) as bar:
            start = time.perf_counter()
            for i in range(0, len(queries), QUERY_BATCH):
                scores, ids = index.search(queries[i : i + QUERY_BATCH], args.k)
                found_scores.append(scores)
                found_ids.append(ids)
                bar.update(len(ids))
            seconds = time.perf_counter() - start
    scores, ids = np.concatenate(found_scores), np.concatenate(found_ids)
    print(f"{len(queries):,} queries, k={args.k}, in {seconds:.3f} s ({len(queries) / seconds:,.0f} QPS)")
    if truth is not None:
        from tqindex.datasets.groundtruth import recall_at

        print(f"{args.k}-recall@{args.k}: {recall_at(truth, ids, args.k):.4f}")
    if args.out:
        if args.out.suffix == ".npz":
            np.savez(args.out, scores=scores, ids=ids)
        else:
            np.save(args.out, ids)
        print(f"results -> {args.out}")


def _info(args: argparse.Namespace) -> None:
    with TurboQuantIndex.open(args.index) as index:
        info = {
            "path": str(args.index),
            "ntotal": index.ntotal,
            "dim": index.dim,
            "metric": index.metric,
            "codec": index.codec.config.to_dict(),
            "bytes_per_vector": index.bytes_per_vector,
            "bytes_on_disk": sum(f.stat().st_size for f in Path(args.index).iterdir() if f.is_file()),
        }
    print(json.dumps(info, indent=2))


def _verify(args: argparse.Namespace) -> None:
    with TurboQuantIndex.open(args.index) as index:
        report = index.verify()  # CorruptIndexError naming the damaged file
    print(json.dumps(report, indent=2, default=str))


def _bench(args: argparse.Namespace) -> None:
    from tqindex._cli_bench import bench

    bench(args.dataset, args.bits, args.k, faiss=args.faiss, progress=_show_progress(args))


# ---- arguments -------------------------------------------------------------------------
def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _result_path(text: str) -> Path:
    if not text.endswith((".npz", ".npy")):
        raise argparse.ArgumentTypeError(f"expected a .npz (scores and ids) or .npy (ids) file, got {text!r}")
    return Path(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tqindex", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, only results")
    quiet = argparse.ArgumentParser(add_help=False)  # --quiet after the command too
    quiet.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars, only results")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Any, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[quiet], help=help, description=help)
        sub.set_defaults(run=run)
        return sub

    build = command("build", _build, "encode a vector file into a new on-disk index")
    build.add_argument("input", type=Path, metavar="INPUT", help=".npy, .fvecs, .bvecs or ann-benchmarks .hdf5 (its train set)")
    build.add_argument("--out", type=Path, required=True, metavar="DIR", help="the new index directory")
    build.add_argument("--bits", type=float, default=4, help="bits per coordinate, 1..8 in steps of 1/8 (default 4)")
    build.add_argument("--metric", choices=("ip", "cosine", "l2"), help="default: from an .hdf5 file's distance, else ip")
    build.add_argument("--variant", choices=("mse", "prod"), default="mse")
    build.add_argument("--seed", type=int, default=0, help="seed of the random rotation")
    build.add_argument("--batch", type=_positive, default=65536, help="vectors read and added per step (default 65536)")
    search = command("search", _search, "search an index with a file of queries")
    search.add_argument("index", type=Path, metavar="DIR")
    search.add_argument("--queries", type=Path, required=True, metavar="FILE", help=".npy, .fvecs, .bvecs or .hdf5 (its test set)")
    search.add_argument("-k", type=_positive, default=10, help="neighbours per query (default 10)")
    search.add_argument("--truth", type=Path, metavar="FILE", help="true neighbour ids (.ivecs, .npy or .hdf5) for recall@k")
    search.add_argument("--out", type=_result_path, metavar="RESULT", help=".npz: scores and ids; .npy: ids")
    command("info", _info, "print an index's size and codec as JSON").add_argument("index", type=Path, metavar="DIR")
    command("verify", _verify, "re-read every file of an index and check its checksums").add_argument("index", type=Path, metavar="DIR")
    bench = command("bench", _bench, "recall and QPS of in-memory indexes on an ann-benchmarks dataset")
    bench.add_argument("dataset", metavar="DATASET", help="an ann-benchmarks .hdf5 file or a dataset name")
    bench.add_argument("--bits", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    bench.add_argument("-k", type=_positive, default=10)
    bench.add_argument("--faiss", action="store_true", help="add FAISS's TurboQuant RR,SQtqmse{bits} (needs faiss-cpu)")
    return parser


def _message(error: BaseException) -> str:
    """The error as one line."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        text = f"{error.filename}: {error.strerror}"
    elif isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    else:
        text = str(error) or type(error).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit:  # --help / --version: 0; a usage error: 2 (argparse printed why)
        return 0 if exit.code is None else exit.code if isinstance(exit.code, int) else 2
    try:
        args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
    except KeyboardInterrupt:
        print("tqindex: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`tqindex info DIR | head -1`): quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # what is still buffered goes nowhere
        return 141
    except FAILURES as error:
        if os.environ.get("TQINDEX_DEBUG"):
            raise
        print(f"tqindex: error: {_message(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
