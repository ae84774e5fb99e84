"""The ann-benchmarks wrapper (benchmarks/annb_wrapper/module.py) against a fake BaseANN."""

import importlib.util
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from tqindex.datasets import exact_knn, recall_at

MODULE = Path(__file__).resolve().parents[1] / "benchmarks" / "annb_wrapper" / "module.py"


class FakeBaseANN:
    """What ann-benchmarks' BaseANN offers, reduced to the interface."""

    def get_memory_usage(self):
        return None

    def get_additional(self):
        return {}

    def __str__(self):
        return self.name


def load_wrapper(name: str):
    spec = importlib.util.spec_from_file_location(name, MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def wrapper(monkeypatch):
    """The wrapper module imported with a fake ``ann_benchmarks.algorithms.base.module``."""
    names = ["ann_benchmarks", "ann_benchmarks.algorithms", "ann_benchmarks.algorithms.base"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    fake = types.ModuleType("ann_benchmarks.algorithms.base.module")
    fake.BaseANN = FakeBaseANN
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    return load_wrapper("annb_wrapper_with_fake_base")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    scale = (1.0 / np.sqrt(np.arange(1, 33))).astype(np.float32)  # anisotropic, like embeddings
    train = rng.standard_normal((600, 32), dtype=np.float32) * scale
    test = rng.standard_normal((25, 32), dtype=np.float32) * scale
    _, neighbors = exact_knn(train, test, 10, "angular", progress=False)
    return train, test, neighbors


def test_subclasses_the_benchmarks_base(wrapper):
    assert issubclass(wrapper.TurboQuant, FakeBaseANN)


def test_fit_query_and_batch_query(wrapper, data):
    train, test, neighbors = data
    algo = wrapper.TurboQuant("angular", 4)
    assert algo.get_memory_usage() == 0.0
    algo.fit(train)
    found = np.stack([algo.query(q, 10) for q in test])
    assert found.shape == (len(test), 10) and found.min() >= 0 and found.max() < len(train)
    assert recall_at(neighbors, found, 10) > 0.7

    algo.batch_query(test, 10)
    batch = algo.get_batch_results()
    assert len(batch) == len(test)
    np.testing.assert_array_equal(np.stack(batch), found)

    kb = algo.get_memory_usage()
    assert kb >= len(train) * algo.index.bytes_per_vector / 1024
    assert algo.get_additional() == {"bytes_per_vector": algo.index.bytes_per_vector}
    algo.done()


def test_query_arguments_change_speed_not_results(wrapper, data):
    train, test, _ = data
    algo = wrapper.TurboQuant("angular", 2, "mse", "norm")
    algo.fit(train)
    algo.batch_query(test, 5)
    before = np.stack(algo.get_batch_results())
    algo.set_query_arguments(64)
    algo.batch_query(test, 5)
    np.testing.assert_array_equal(np.stack(algo.get_batch_results()), before)
    assert str(algo) == "tqindex(bits=2, variant=mse, scale=norm, chunk_rows=64)"
    with pytest.raises(ValueError, match="chunk_rows"):
        algo.set_query_arguments(0)


def test_prod_variant_and_dot_metric(wrapper, data):
    train, test, _ = data
    algo = wrapper.TurboQuant("dot", 3, "prod", "norm")
    algo.fit(train)
    assert len(algo.query(test[0], 7)) == 7
    assert algo.index.metric == "ip" and algo.index.codec.config.variant == "prod"


def test_euclidean_runs_with_l2(wrapper):
    rng = np.random.default_rng(4)
    train, test = (rng.standard_normal((300, 8)) + 3).astype(np.float32), (rng.standard_normal((5, 8)) + 3).astype(np.float32)
    algo = wrapper.TurboQuant("euclidean", 8)
    algo.fit(train)
    truth = np.argsort(((test[:, None, :] - train[None]) ** 2).sum(axis=2), axis=1)[:, :5]
    algo.batch_query(test, 5)
    assert algo.index.metric == "l2"
    assert np.mean([len(set(found) & set(t)) / 5 for found, t in zip(algo.get_batch_results(), truth)]) >= 0.9


def test_refuses_an_unknown_metric_and_unfitted_use(wrapper):
    with pytest.raises(ValueError, match="hamming"):
        wrapper.TurboQuant("hamming", 4)
    with pytest.raises(RuntimeError, match="fit"):
        wrapper.TurboQuant("angular", 4).query(np.zeros(8, dtype=np.float32), 1)


def test_falls_back_to_a_local_base_without_ann_benchmarks(monkeypatch, data):
    monkeypatch.setitem(sys.modules, "ann_benchmarks", None)  # makes the import fail
    module = load_wrapper("annb_wrapper_standalone")
    assert module.BaseANN.__module__ == "annb_wrapper_standalone"
    train, test, _ = data
    algo = module.TurboQuant("angular", 4)
    algo.fit(train)
    algo.batch_query(test, 3)
    assert [len(r) for r in algo.get_batch_results()] == [3] * len(test)
    assert str(algo) == "tqindex(bits=4, variant=mse, scale=auto)"


def test_dockerfile_pins_the_cpu_torch_the_setup_scripts_install():
    root = Path(__file__).resolve().parents[1]
    pinned = re.search(r'cpu_torch="torch==([0-9.]+)"', (root / "scripts" / "bootstrap.sh").read_text())
    dockerfile = (root / "benchmarks" / "annb_wrapper" / "Dockerfile").read_text()
    assert pinned and f"torch=={pinned.group(1)}" in dockerfile and "/whl/cpu" in dockerfile
    assert not re.search(r"pip install torch(\s|$)", dockerfile)  # never an unpinned torch
