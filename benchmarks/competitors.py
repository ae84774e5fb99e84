"""Every method the search benchmarks compare, behind one small interface.

``make_method(name, dim, bits, metric, seed)`` returns a `Method`: ``build(train)`` (timed),
``search(queries, k) -> (D, I)`` (best first: scores for "ip" and "cosine", squared distances
for "l2"; int64 row ids), ``bytes_per_vector`` and ``params``. ``metric`` is "ip", "cosine" or
"l2"; for "cosine" each method normalises vectors its own way (tqindex ``metric="cosine"``,
FAISS ``L2norm`` pre-transform, turbovec: numpy in the wrapper), inside the timed calls; "l2" is
tqindex ``metric="l2"`` and FAISS ``METRIC_L2`` (turbovec ranks by inner product only).

Bytes per vector count the code and every per-vector factor (norms, scales, RaBitQ's factors);
ids are excluded everywhere (FAISS flat indexes and turbovec number rows implicitly, tqindex
keeps 8 more bytes for its int64 ids):

* tqindex: ``index.bytes_per_vector`` = packed code + 4 bytes per float32 factor (1 for mse, 2 for prod).
* FAISS: ``sa_code_size()``, the stand-alone code, factors included inline (EDEN and SQtq: 8 bytes,
  multi-bit RaBitQ: 20, SQtqmse and PQ: none). Fast-scan indexes store codes in blocks of 32
  rows; ``stored_bytes_per_vector`` in ``params`` is the measured buffer size / rows.
* turbovec: measured, the growth of its ``to_bytes()`` serialisation per added vector.

Seeds: tqindex's rotation (and QJL matrix); FAISS's ``RR`` rotation (``RandomRotationMatrix.init``)
and PQ's k-means; turbovec's rotation is fixed by the dimension (only the calibration sample of
"turbovec-cal" is seeded). FAISS's SQtq QJL seed (``turboq_refine``) is not reachable from Python.
"""

from __future__ import annotations

import functools
import os
import sys
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from _common import set_threads
from tqindex.demo import pq_factory as _pq_factory

METRICS = ("ip", "cosine", "l2")
RABITQ_QUERY_BITS = 8  # qb for both RaBitQ indexes (FastScan's default; IndexRaBitQ defaults to 4)
TURBOVEC_CALIBRATION_ROWS = 1024


class Unsupported(Exception):
    """The method cannot run at these settings; the message says why."""


def configure_threads(threads: int) -> dict[str, Any]:
    """Use ``threads`` threads in torch, FAISS (OpenMP) and turbovec (rayon); return what was set.

    turbovec sizes its rayon pool from RAYON_NUM_THREADS when the pool first starts, so this
    must run before turbovec's first search or add in the process.
    """
    wanted = str(threads)
    if "turbovec" in sys.modules and os.environ.get("RAYON_NUM_THREADS") != wanted:
        warnings.warn("turbovec is already imported: its thread pool may keep its earlier size", stacklevel=2)
    os.environ["RAYON_NUM_THREADS"] = wanted
    set_threads(threads)
    import faiss
    import torch

    return {
        "threads": threads,
        "torch": torch.get_num_threads(),
        "faiss_omp": faiss.omp_get_max_threads(),
        "turbovec_rayon": os.environ["RAYON_NUM_THREADS"],
    }


def describe_threads(threads: dict[str, Any]) -> str:
    """One line for `configure_threads`' result."""
    return f"torch {threads['torch']}, FAISS OpenMP {threads['faiss_omp']}, turbovec RAYON_NUM_THREADS={threads['turbovec_rayon']}"


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32 C-contiguous."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, np.finfo(np.float32).tiny), dtype=np.float32)


class Method(ABC):
    """One index configuration at ``bits`` bits per dimension."""

    family = ""
    seeded = ""  # what ``seed`` changes; "" when nothing is seeded

    def __init__(self, name: str, dim: int, bits: float, metric: str, seed: int):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.name, self.dim, self.bits, self.metric, self.seed = name, dim, bits, metric, seed
        self.params: dict[str, Any] = {}

    def build(self, train: np.ndarray) -> float:
        """Train (where needed) and add ``train`` (n, dim) float32; returns the seconds it took."""
        start = time.perf_counter()
        self._build(np.ascontiguousarray(train, dtype=np.float32))
        return time.perf_counter() - start

    @abstractmethod
    def _build(self, train: np.ndarray) -> None: ...

    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of ``queries`` (m, dim): float32 scores (m, k) best first, int64 row ids (m, k)."""

    @property
    @abstractmethod
    def bytes_per_vector(self) -> float:
        """Bytes of code and per-vector factors per stored vector (ids excluded)."""

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary: name, family, bits, bytes per vector, params, what is seeded."""
        return {
            "method": self.name,
            "family": self.family,
            "bits": self.bits,
            "bytes_per_vector": self.bytes_per_vector,
            "params": self.params,
            "seeded": self.seeded,
        }


class TqindexMethod(Method):
    """``tqindex.TurboQuantIndex`` with a given variant, scale and scan backend."""

    family = "tqindex"

    def __init__(self, name: str, dim: int, bits: float, metric: str, seed: int, *, variant: str, scale: str, backend: str = "auto"):
        super().__init__(name, dim, bits, metric, seed)
        import tqindex
        from tqindex.kernels import fastscan

        try:
            self.index = tqindex.TurboQuantIndex(dim, bits, metric=metric, variant=variant, scale=scale, seed=seed, backend=backend)
        except ValueError as error:
            raise Unsupported(str(error)) from error
        config = self.index.codec.config
        self.seeded = "rotation and QJL matrix" if config.variant == "prod" else "rotation"
        self.params = {"variant": config.variant, "scale": config.scale, "rotation": config.rotation, "seed": seed, "backend": backend}
        if backend in ("auto", "fastscan") and fastscan.supports(self.index.codec):
            self.params["fastscan_isa"] = fastscan.isa()

    def _build(self, train: np.ndarray) -> None:
        self.index.add(train, progress=False)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k)

    @property
    def bytes_per_vector(self) -> float:
        return float(self.index.bytes_per_vector)


class FaissMethod(Method):
    """A FAISS index from a factory string: ``METRIC_L2`` for "l2", else ``METRIC_INNER_PRODUCT``."""

    family = "faiss"

    def __init__(self, name: str, dim: int, bits: float, metric: str, seed: int, *, factory: str, unit_norm_only: bool = False):
        super().__init__(name, dim, bits, metric, seed)
        import faiss

        self.factory = ("L2norm," if metric == "cosine" else "") + factory
        try:
            self.index = faiss.index_factory(dim, self.factory, faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as error:
            raise Unsupported(f"index_factory({dim}, {self.factory!r}) failed: {str(error).splitlines()[-1]}") from error
        self.unit_norm_only = unit_norm_only and metric != "cosine"
        self.inner = faiss.downcast_index(self.index.index if isinstance(self.index, faiss.IndexPreTransform) else self.index)
        seeded = []
        for transform in self._transforms():
            if isinstance(transform, faiss.RandomRotationMatrix):
                transform.init(seed)  # marks it trained, so train() keeps this rotation
                seeded.append("RR rotation")
        if hasattr(self.inner, "pq"):
            self.inner.pq.cp.seed = seed
            seeded.append("PQ k-means")
        self.seeded = ", ".join(seeded)
        self.params = {"factory": self.factory, "index": type(self.inner).__name__, "seed": seed}
        if hasattr(self.inner, "qb"):  # RaBitQ: bits the query is quantised to
            self.inner.qb = RABITQ_QUERY_BITS
            self.params["qb"] = RABITQ_QUERY_BITS

    def _transforms(self) -> list[Any]:
        import faiss

        if not isinstance(self.index, faiss.IndexPreTransform):
            return []
        return [faiss.downcast_VectorTransform(self.index.chain.at(i)) for i in range(self.index.chain.size())]

    def _build(self, train: np.ndarray) -> None:
        if self.unit_norm_only:
            norms = np.linalg.norm(train, axis=1)
            if np.abs(norms - 1).max() > 1e-3:
                span = f"{norms.min():.3g}..{norms.max():.3g}"
                raise Unsupported(f"{self.factory} stores no norm: it needs unit vectors (norms here span {span})")
        try:
            self.index.train(train)
        except RuntimeError as error:  # e.g. fewer training rows than k-means centroids
            raise Unsupported(f"{self.factory}: training failed: {str(error).splitlines()[-1]}") from error
        self.index.add(train)
        self.params["stored_bytes_per_vector"] = self.inner.codes.size() / self.inner.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    @property
    def bytes_per_vector(self) -> float:
        return float(self.index.sa_code_size())


def pq_factory(dim: int, bits: float, sub_bits: int) -> str:
    """`tqindex.demo.pq_factory` (PQ at ``bits`` per dimension with ``sub_bits``-bit sub-codes), `Unsupported` where M is fractional."""
    try:
        return _pq_factory(dim, bits, sub_bits)
    except ValueError as error:
        raise Unsupported(str(error)) from error


class TurbovecMethod(Method):
    """``turbovec.TurboQuantIndex``; "turbovec-cal" first fits its TQ+ calibration on a sample."""

    family = "turbovec"

    def __init__(self, name: str, dim: int, bits: float, metric: str, seed: int, *, calibrate: bool = False):
        super().__init__(name, dim, bits, metric, seed)
        if metric == "l2":
            raise Unsupported("turbovec ranks by inner product only, not L2")
        if bits not in (2, 3, 4):
            raise Unsupported(f"turbovec supports 2, 3 or 4 bits, not {bits}")
        if dim % 8:
            raise Unsupported(f"turbovec needs dim to be a multiple of 8, not {dim}")
        import turbovec

        self.index = turbovec.TurboQuantIndex(dim=dim, bit_width=int(bits))
        self.calibrate = calibrate
        self.seeded = "calibration sample" if calibrate else ""
        self.params = {"bit_width": int(bits), "calibrated": calibrate, "rayon_threads": os.environ.get("RAYON_NUM_THREADS")}
        if calibrate:
            self.params |= {"calibration_rows": TURBOVEC_CALIBRATION_ROWS, "seed": seed}

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        return unit_rows(x) if self.metric == "cosine" else np.ascontiguousarray(x, dtype=np.float32)

    def _build(self, train: np.ndarray) -> None:
        train = self._prepare(train)
        if self.calibrate:
            if len(train) <= TURBOVEC_CALIBRATION_ROWS:
                self.seeded = ""  # the sample is every row, whatever the seed
            rows = np.random.default_rng(self.seed).choice(len(train), min(TURBOVEC_CALIBRATION_ROWS, len(train)), replace=False)
            self.index.calibrate(np.ascontiguousarray(train[np.sort(rows)]))
        self.index.add(train)
        self.index.prepare()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.index.search(self._prepare(queries), k)
        return scores, ids.astype(np.int64, copy=False)

    @property
    def bytes_per_vector(self) -> float:
        return turbovec_bytes_per_vector(self.dim, int(self.bits))


@functools.lru_cache(maxsize=None)
def turbovec_bytes_per_vector(dim: int, bits: int) -> float:
    """Bytes turbovec's serialisation grows by per added vector (rows go in blocks of 32)."""
    import turbovec

    x = np.random.default_rng(0).standard_normal((64, dim)).astype(np.float32)
    sizes = []
    for rows in (32, 64):
        index = turbovec.TurboQuantIndex(dim=dim, bit_width=bits)
        index.add(x[:rows])
        sizes.append(len(index.to_bytes()))
    return (sizes[1] - sizes[0]) / 32


class IvfMethod(Method):
    """A method with ``nlist`` inverted lists (set by subclasses) fixed at build, ``nprobe`` lists probed per search."""

    nlist = 0
    train_rows: int | None = None  # train the lists on a seeded sample of this many rows (None: all)

    @abstractmethod
    def set_nprobe(self, nprobe: int) -> None: ...

    def training_set(self, train: np.ndarray) -> np.ndarray:
        """The rows the coarse quantizer (and codebooks) are trained on: ``train`` or a seeded sample of it."""
        if self.train_rows is None or self.train_rows >= len(train):
            return train
        rows = np.sort(np.random.default_rng(self.seed).choice(len(train), self.train_rows, replace=False))
        return np.ascontiguousarray(train[rows])


class TqindexIvfMethod(IvfMethod):
    """``tqindex.TurboQuantIVFIndex``: faiss k-means lists, TurboQuant codes of residuals or vectors."""

    family = "tqindex"
    seeded = "rotation and k-means"

    def __init__(self, name: str, dim: int, bits: float, metric: str, seed: int, nlist: int, *, by_residual: bool):
        super().__init__(name, dim, bits, metric, seed)
        self.nlist = nlist
        import tqindex

        try:
            self.index = tqindex.TurboQuantIVFIndex(dim, nlist, bits, metric=metric, by_residual=by_residual, seed=seed)
        except ValueError as error:
            raise Unsupported(str(error)) from error
        self.params = {"nlist": nlist, "by_residual": by_residual, "scale": self.index.codec.config.scale, "seed": seed}

    def _build(self, train: np.ndarray) -> None:
        self.index.train(self.training_set(train), progress=False)
        self.index.add(train, progress=False)

    def set_nprobe(self, nprobe: int) -> None:
        self.index.nprobe = nprobe

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k)

    @property
    def bytes_per_vector(self) -> float:
        return float(self.index.bytes_per_vector)


class FaissIvfMethod(FaissMethod, IvfMethod):
    """A FAISS IVF index ``IVF{nlist},{codes}`` (inner product; residual codes, FAISS's default).

    Bytes per vector: the IVF's ``code_size``, the code stored in the lists (factors included);
    ``sa_code_size`` would add the list number, which the lists themselves imply.
    """

    def __init__(self, name: str, dim: int, bits: float, metric: str, seed: int, nlist: int, *, prefix: str, codes: str):
        FaissMethod.__init__(self, name, dim, bits, metric, seed, factory=f"{prefix}IVF{nlist},{codes}")
        import faiss

        self.nlist = nlist
        self.ivf = faiss.extract_index_ivf(self.index)
        self.ivf.cp.seed = seed
        self.seeded = ", ".join(filter(None, [self.seeded, "k-means"]))
        self.params |= {"nlist": nlist}

    def _build(self, train: np.ndarray) -> None:
        try:
            self.index.train(self.training_set(train))
        except RuntimeError as error:
            raise Unsupported(f"{self.factory}: training failed: {str(error).splitlines()[-1]}") from error
        self.index.add(train)

    def set_nprobe(self, nprobe: int) -> None:
        self.ivf.nprobe = nprobe

    @property
    def bytes_per_vector(self) -> float:
        return float(self.ivf.code_size)


Factory = Callable[[str, int, float, str, int], Method]
IvfFactory = Callable[[str, int, float, str, int, int], IvfMethod]


def _faiss(pattern: str, bits_allowed: tuple[int, ...], **kwargs: Any) -> Factory:
    def make(name: str, dim: int, bits: float, metric: str, seed: int) -> Method:
        if bits not in bits_allowed:
            raise Unsupported(f"FAISS offers {pattern} for bits {bits_allowed}, not {bits}")
        return FaissMethod(name, dim, bits, metric, seed, factory=pattern.format(b=int(bits)), **kwargs)

    return make


def _faiss_pq(sub_bits: int) -> Factory:
    def make(name: str, dim: int, bits: float, metric: str, seed: int) -> Method:
        return FaissMethod(name, dim, bits, metric, seed, factory=pq_factory(dim, bits, sub_bits))

    return make


METHODS: dict[str, Factory] = {
    "tqindex": functools.partial(TqindexMethod, variant="mse", scale="auto"),  # the library default
    "tqindex-norm": functools.partial(TqindexMethod, variant="mse", scale="norm"),
    "tqindex-prod": functools.partial(TqindexMethod, variant="prod", scale="norm"),
    # the scan backends the fast-scan replaced on the CPU: numba look-up tables, decode + GEMM
    "tqindex-lut": functools.partial(TqindexMethod, variant="mse", scale="auto", backend="lut"),
    "tqindex-gemm": functools.partial(TqindexMethod, variant="mse", scale="auto", backend="torch"),
    # FAISS's SQ/EDEN/RaBitQ codecs do not rotate by themselves: the RR pre-transform does.
    "faiss-tqmse": _faiss("RR,SQtqmse{b}", (1, 2, 3, 4, 8), unit_norm_only=True),
    "faiss-tq": _faiss("RR,SQtq{b}", (2, 3, 4, 5)),
    "faiss-eden": _faiss("RR,EDEN{b}", (1, 2, 3, 4, 5, 6, 7, 8)),
    "faiss-rabitq": _faiss("RR,RaBitQ{b}", tuple(range(1, 10))),
    "faiss-rabitq-fs": _faiss("RR,RaBitQfs{b}", tuple(range(1, 10))),
    "faiss-pq": _faiss_pq(8),
    "faiss-pq-fs": _faiss_pq(4),
    "turbovec": functools.partial(TurbovecMethod, calibrate=False),
    "turbovec-cal": functools.partial(TurbovecMethod, calibrate=True),
}


def _faiss_ivf_rabitq(name: str, dim: int, bits: float, metric: str, seed: int, nlist: int) -> IvfMethod:
    if bits != int(bits) or not 1 <= bits <= 9:
        raise Unsupported(f"FAISS offers IVF RaBitQ for 1..9 bits, not {bits}")
    return FaissIvfMethod(name, dim, bits, metric, seed, nlist, prefix="RR,", codes=f"RaBitQ{int(bits)}")


def _faiss_ivf_pq(sub_bits: int) -> IvfFactory:
    def make(name: str, dim: int, bits: float, metric: str, seed: int, nlist: int) -> IvfMethod:
        pq = pq_factory(dim, bits, sub_bits)  # "[RR{d'},]PQ{M}np" or "...PQ{M}x4fs"
        embed, _, codes = pq.rpartition(",")
        return FaissIvfMethod(name, dim, bits, metric, seed, nlist, prefix=embed + "," if embed else "", codes=codes.removesuffix("np"))

    return make


IVF_METHODS: dict[str, IvfFactory] = {
    "tqindex-ivf": functools.partial(TqindexIvfMethod, by_residual=True),  # the library default
    "tqindex-ivf-vec": functools.partial(TqindexIvfMethod, by_residual=False),
    "faiss-ivf-rabitq": _faiss_ivf_rabitq,
    "faiss-ivf-pq": _faiss_ivf_pq(8),
    "faiss-ivf-pq-fs": _faiss_ivf_pq(4),
}


def make_ivf_method(name: str, dim: int, bits: float, metric: str, seed: int, nlist: int) -> IvfMethod:
    """The IVF method ``name`` (a key of `IVF_METHODS`) with ``nlist`` lists; `Unsupported` if it cannot run."""
    if name not in IVF_METHODS:
        raise ValueError(f"unknown IVF method {name!r}; known: {', '.join(IVF_METHODS)}")
    try:
        return IVF_METHODS[name](name, dim, bits, metric, seed, nlist)
    except ImportError as error:
        raise Unsupported(f"{error.name or error} is not installed") from error


def make_method(name: str, dim: int, bits: float, metric: str = "ip", seed: int = 0) -> Method:
    """The method ``name`` (a key of `METHODS`); `Unsupported` if it cannot run at these settings."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    try:
        return METHODS[name](name, dim, bits, metric, seed)
    except ImportError as error:
        raise Unsupported(f"{error.name or error} is not installed") from error
