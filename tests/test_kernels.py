"""Scan kernels on the CPU: the look-up-table scan, the GEMM scan, dispatch, resident codes."""

import importlib
import shutil

import numpy as np
import pytest
import torch

from conftest import unit_rows
from tqindex import TurboQuantCodec, TurboQuantIndex
from tqindex.kernels import LUT_MAX_QUERY_BITS, fastscan, get_scanner
from tqindex.kernels.gemm import GemmScanner
from tqindex.kernels.lut import LutScanner, supports


def test_the_fast_scan_is_built_wherever_a_compiler_is():
    """The installs behind the test commands build the extension (the fast-scan tests skip only
    on a machine with no C++ compiler, where the package falls back with a warning)."""
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    assert fastscan.available() or compiler is None, f"a compiler is here ({compiler}) but: {fastscan._LOAD_ERROR}"
    if fastscan.available() and importlib.import_module("tqindex.kernels._fastscan_generic").cpu_supports("avx2"):
        assert fastscan.isa() in ("avx2", "avx512")  # the SIMD builds were built and chosen


@pytest.fixture
def without_fastscan(monkeypatch):
    """As on a machine where the compiled fast-scan did not build."""
    monkeypatch.setattr(fastscan, "_MODULE", None)
    monkeypatch.setattr(fastscan, "_LOAD_ERROR", "the compiled fast-scan extension is not built (simulated)")


@pytest.mark.parametrize(
    "bits,variant",
    [(1, "mse"), (2, "mse"), (2.5, "mse"), (3, "mse"), (4, "mse"), (4.5, "mse"), (5, "mse"), (5.5, "mse"), (6, "mse"),
     (8, "mse"), (1, "prod"), (2, "prod"), (3, "prod"), (4, "prod"), (5, "prod")],
)
def test_lut_scores_equal_the_codec_estimator(bits, variant):
    codec = TurboQuantCodec(100, bits, variant=variant)
    codes = codec.encode(torch.randn(300, 100, generator=torch.Generator().manual_seed(int(bits * 10))))
    rotated = codec.rotate_queries(torch.randn(3, 100, generator=torch.Generator().manual_seed(99)))
    scanner = LutScanner(codec)
    kernel = "bytes" if scanner._per_byte else "byte_and_bits" if scanner._byte_and_bits else "groups"
    expected_kernel = {(2.5, "mse"): "byte_and_bits", (3, "mse"): "byte_and_bits", (4, "prod"): "byte_and_bits", (5.5, "mse"): "groups"}
    assert kernel == expected_kernel.get((bits, variant), kernel)  # each of the three kernels runs here
    scores, rows = scanner.chunk_topk(scanner.prepare(rotated), codes.packed, codes.factors, None, 300)
    expected = codec.score(rotated, codes.packed, codes.factors)
    np.testing.assert_allclose(scores, expected.gather(1, rows), rtol=1e-5, atol=1e-4)
    assert torch.equal(rows.sort(dim=1).values, torch.arange(300).expand(3, -1))


def test_lut_honours_the_valid_mask():
    codec = TurboQuantCodec(32, 4)
    codes = codec.encode(torch.randn(50, 32))
    valid = torch.arange(50) % 3 == 0
    scanner = LutScanner(codec)
    scores, rows = scanner.chunk_topk(scanner.prepare(codec.rotate_queries(torch.randn(2, 32))), codes.packed, codes.factors, valid, 30)
    finite = torch.isfinite(scores)
    assert finite.sum(dim=1).tolist() == [17, 17]
    assert bool(valid[rows[finite]].all())


@pytest.mark.parametrize(
    "bits,supported", [(1, True), (2, True), (2.5, True), (3, True), (4, True), (6, True), (8, True), (1.5, False), (3.5, False), (7, False)]
)
def test_lut_supports_layouts_whose_group_keys_fit(bits, supported):
    codec = TurboQuantCodec(64, bits)
    assert supports(codec.layout) is supported
    if not supported:
        with pytest.raises(ValueError, match="look-up-table"):
            LutScanner(codec)


@pytest.mark.filterwarnings("ignore:tqindex. the compiled fast-scan")
def test_dispatch_by_batch_size_and_layout(without_fastscan):
    four, three = TurboQuantCodec(64, 4), TurboQuantCodec(64, 3)
    with pytest.warns(RuntimeWarning, match="not built \\(simulated\\).*slower"):
        assert isinstance(get_scanner(four, "auto", "cpu", queries=1), LutScanner)
    assert isinstance(get_scanner(four, "auto", "cpu", queries=LUT_MAX_QUERY_BITS // 4), LutScanner)
    assert isinstance(get_scanner(four, "auto", "cpu", queries=LUT_MAX_QUERY_BITS // 4 + 1), GemmScanner)
    assert isinstance(get_scanner(TurboQuantCodec(64, 2), "auto", "cpu", queries=LUT_MAX_QUERY_BITS // 2), LutScanner)
    assert isinstance(get_scanner(three, "auto", "cpu", queries=1), LutScanner)
    assert isinstance(get_scanner(TurboQuantCodec(64, 7), "auto", "cpu", queries=1), GemmScanner)
    assert isinstance(get_scanner(four, "torch", "cpu", queries=1), GemmScanner)
    with pytest.raises(ValueError, match="CPU only"):
        get_scanner(four, "lut", "cuda")
    with pytest.raises(ValueError, match="backend"):
        get_scanner(four, "simd")


@pytest.mark.parametrize("backend", ["lut", "torch"])
def test_every_cpu_backend_gives_the_same_search_results(backend):
    x, q = unit_rows(2000, 64, seed=1), unit_rows(4, 64, seed=2)
    reference = TurboQuantIndex(64, 2, backend="torch", chunk_rows=300)
    index = TurboQuantIndex(64, 2, backend=backend, chunk_rows=300)
    for i in (reference, index):
        i.add(x)
        i.remove_ids(np.arange(0, 2000, 7))
    for a, b in zip(index.search(q, 20), reference.search(q, 20)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    for a, b in zip(index.search(q, 20, filter=np.arange(100)), reference.search(q, 20, filter=np.arange(100))):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_resident_codes_give_the_same_results_and_take_new_rows(tmp_path):
    x, q = unit_rows(1200, 32, seed=3), unit_rows(5, 32, seed=4)
    with TurboQuantIndex(32, 4, path=tmp_path / "idx") as on_disk:
        on_disk.add(x[:1000])
    streamed = TurboQuantIndex.open(tmp_path / "idx", mode="a")
    resident = TurboQuantIndex.open(tmp_path / "idx", mode="r").to("cpu")
    assert resident.memory_usage() > 1000 * resident.codec.code_bytes > streamed.memory_usage()
    for a, b in zip(resident.search(q, 10), streamed.search(q, 10)):
        assert np.array_equal(a, b)
    in_ram = TurboQuantIndex(32, 4).to("cpu")
    in_ram.add(x)
    plain = TurboQuantIndex(32, 4)
    plain.add(x)
    for a, b in zip(in_ram.search(q, 10, filter=np.arange(500, 1200)), plain.search(q, 10, filter=np.arange(500, 1200))):
        assert np.array_equal(a, b)
    np.testing.assert_array_equal(in_ram.reconstruct([3, 1100]), plain.reconstruct([3, 1100]))


def test_making_an_on_disk_index_resident_holds_one_slice_in_host_memory(tmp_path, monkeypatch):
    """``to(device)`` copies the stored columns a slice at a time (`_UPLOAD_BYTES`): an index larger
    than the host's memory can still be made resident on a GPU. Measured here on the CPU with
    tracemalloc, which sees numpy's allocations (torch's destination tensor is not counted)."""
    import tracemalloc

    import tqindex.index

    x, q = unit_rows(3000, 64, seed=5), unit_rows(4, 64, seed=6)
    with TurboQuantIndex(64, 4, path=tmp_path / "idx") as on_disk:
        on_disk.add(x)
    monkeypatch.setattr(tqindex.index, "_UPLOAD_BYTES", 4096)
    index = TurboQuantIndex.open(tmp_path / "idx", mode="r")
    column_bytes = index._store.column("codes").nbytes  # 96 kB
    tracemalloc.start()
    try:
        index.to("cpu")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < column_bytes / 4, f"{peak} bytes of host memory at once for a {column_bytes}-byte column"
    for a, b in zip(index.search(q, 10), TurboQuantIndex.open(tmp_path / "idx", mode="r").search(q, 10)):
        assert np.array_equal(a, b)


def test_adds_to_a_resident_index_copy_only_their_rows_until_the_spare_runs_out():
    """Resident columns keep spare rows (`resident.GROWTH`): an add writes its rows there instead of
    copying every row held; copies and pickles hold the rows without the spare; results equal an
    index that never was resident."""
    import pickle

    from tqindex.resident import GROWTH

    x, q = unit_rows(1300, 32, seed=7), unit_rows(4, 32, seed=8)
    resident = TurboQuantIndex(32, 4).to("cpu")
    plain = TurboQuantIndex(32, 4)
    for index in (resident, plain):
        index.add(x[:1000])
    for index in (resident, plain):
        index.add(x[1000:1001])  # the resident one full: regrown by a quarter
    buffer, capacity = resident._resident[0].data_ptr(), resident._held.capacity
    assert capacity == int(1000 * GROWTH)
    for i in range(1001, 1250):
        for index in (resident, plain):  # the same batches: encoding one row or many rounds apart
            index.add(x[i : i + 1])
        assert resident._resident[0].data_ptr() == buffer, f"the add of row {i} copied the rows held"
    for index in (resident, plain):
        index.add(x[1250:])  # past the spare: regrown once more
    assert resident._held.rows == 1300 <= resident._held.capacity
    assert resident.memory_usage() >= resident._held.capacity * resident.codec.code_bytes
    resident.remove_ids(np.arange(0, 1300, 9))
    plain.remove_ids(np.arange(0, 1300, 9))
    for copied in (resident, pickle.loads(pickle.dumps(resident))):
        for a, b in zip(copied.search(q, 10), plain.search(q, 10)):
            assert np.array_equal(a, b)
    assert pickle.loads(pickle.dumps(resident))._held.capacity == 1300  # the spare stays behind


def test_resident_columns_stage_only_into_spare_rows():
    from tqindex.resident import ResidentColumns

    held = ResidentColumns([torch.arange(6).view(3, 2)])
    held.reserve(5)
    assert (held.rows, held.capacity) == (3, 5)
    with pytest.raises(ValueError, match="not spare"):
        held.stage(2, [torch.zeros(1, 2, dtype=torch.int64)])  # over a held row
    with pytest.raises(ValueError, match="not spare"):
        held.stage(4, [torch.zeros(2, 2, dtype=torch.int64)])  # past the room
    held.stage(3, [torch.full((2, 2), 7)])
    assert held.rows == 3  # staged, not held
    held.hold(5)
    assert held.views[0][3:].eq(7).all() and held.views[0][:3].equal(torch.arange(6).view(3, 2))
    with pytest.raises(ValueError, match="cannot hold 6 rows"):
        held.hold(6)
