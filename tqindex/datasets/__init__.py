"""Benchmark data for tqindex: ann-benchmarks HDF5 files, TEXMEX .fvecs/.ivecs/.bvecs files,
synthetic data, embedded text, exact ground truth.

Imports only numpy, torch and tqdm up front; h5py (``tqindex[datasets]``) and
sentence-transformers with the bundled model (``tqindex[corpus]``) load when first used.
"""

from .annbench import read_hdf5, write_hdf5
from .corpus import build_corpus_dataset, bundled_model, embed_corpus
from .dataset import Dataset
from .groundtruth import exact_knn, recall_1_at, recall_at
from .passages import iter_passages
from .registry import DATASETS, default_data_dir, load_dataset
from .synthetic import make_synthetic
from .vecs import read_vecs, write_vecs

__all__ = [
    "DATASETS",
    "Dataset",
    "build_corpus_dataset",
    "bundled_model",
    "default_data_dir",
    "embed_corpus",
    "exact_knn",
    "iter_passages",
    "load_dataset",
    "make_synthetic",
    "read_hdf5",
    "read_vecs",
    "recall_1_at",
    "recall_at",
    "write_hdf5",
    "write_vecs",
]
