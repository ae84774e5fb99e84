"""The compiled fast-scan (tqindex.kernels.fastscan): exact top-k for every layout and instruction set."""

import importlib
import os
import select
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from tqindex import TurboQuantCodec, TurboQuantIndex
from tqindex.kernels import fastscan, get_scanner
from tqindex.kernels.fastscan import BLOCK_ROWS, FastScanner, KeyColumns
from tqindex.kernels.gemm import GemmScanner
from tqindex.kernels.scan import Chunk, QueryChunk, scan_groups_topk

pytestmark = pytest.mark.skipif(not fastscan.available(), reason="the compiled fast-scan is not built (install with a C++ compiler)")

LAYOUTS = [
    (1, "mse"), (1.5, "mse"), (2, "mse"), (2.5, "mse"), (3, "mse"), (3.5, "mse"), (4, "mse"), (4.5, "mse"), (5, "mse"),
    (6, "mse"), (7, "mse"), (8, "mse"), (1, "prod"), (2, "prod"), (3, "prod"), (3.5, "prod"), (4, "prod"), (6, "prod"),
]  # fmt: skip


def _builds() -> dict:
    """Every build of the extension this CPU runs (the SIMD ones are checked against the portable
    one), and the one named by TQINDEX_TEST_FASTSCAN_MODULE (scripts/check_avx512.sh: AVX-512
    emulated with SIMDe, on CPUs without it)."""
    generic = importlib.import_module("tqindex.kernels._fastscan_generic")
    found = {"generic": generic}
    for isa, feature in (("avx2", "avx2"), ("avx512", "avx512bw")):
        if not generic.cpu_supports(feature):  # importing a build the CPU cannot run stops the process
            continue
        try:
            found[isa] = importlib.import_module(f"tqindex.kernels._fastscan_{isa}")
        except ImportError:
            continue
    extra = os.environ.get("TQINDEX_TEST_FASTSCAN_MODULE")
    if extra:
        found[extra] = importlib.import_module(extra)
    return found


BUILDS = _builds() if fastscan.available() else {}


def _scanner(codec: TurboQuantCodec, build: str, z: float = fastscan.DEFAULT_Z) -> FastScanner:
    """A scanner whose plan was made by ``build``."""
    scanner = FastScanner(codec, z=z)
    module = BUILDS[build]
    if module is not scanner._module:
        scanner._module = module
        scanner._plan = module.make_plan(*scanner._plan_args)
    return scanner


def _exact_topk(codec, rotated, codes, k, valid=None):
    scores = codec.score(rotated, torch.as_tensor(codes.packed), torch.as_tensor(codes.factors))
    if valid is not None:
        scores[:, ~torch.as_tensor(valid)] = float("-inf")
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]  # ties: the lower row first
    return scores.gather(1, order), order


def _chunks(codes, size, valid=None, columns=None):
    n = len(codes.packed)
    for start in range(0, n, size):
        stop = min(n, start + size)
        yield Chunk(
            start,
            torch.from_numpy(codes.packed[start:stop]),
            torch.from_numpy(codes.factors[start:stop]),
            None if valid is None else torch.from_numpy(valid[start:stop]),
            key_columns=None if columns is None else columns[start // BLOCK_ROWS : -(-stop // BLOCK_ROWS)],
        )


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("bits,variant", LAYOUTS)
def test_top_k_is_the_codec_exact_ranking(bits, variant, build):
    # odd widths leave partial bytes and keys (and, for prod codes, a partial byte of signs)
    dim = 37 if bits in (2.5, 5) or (bits, variant) == (3, "prod") else 64
    codec = TurboQuantCodec(dim, bits, variant=variant, seed=3)
    rng = np.random.default_rng(int(bits * 10))
    codes = codec.encode(rng.standard_normal((700, dim)).astype(np.float32))
    rotated = codec.rotate_queries(torch.from_numpy(rng.standard_normal((5, dim)).astype(np.float32)))
    valid = rng.random(700) > 0.25
    scanner = _scanner(codec, build)
    columns = scanner.key_columns(codes.packed)
    want_scores, want_rows = _exact_topk(codec, rotated, codes, 12, valid)
    # chunks of 160 rows (multiples of 32 for the key columns), with and without key columns
    for use in (None, columns):
        scores, rows = scanner.search(rotated, _chunks(codes, 160, valid, use), 12)
        assert torch.equal(rows, want_rows)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("bits,variant", [(3, "mse"), (4, "mse"), (2, "prod"), (4, "prod"), (3.5, "mse")])
def test_every_build_gives_the_same_tables_and_results(build, bits, variant):
    """The same tables, rows and rescored scores, bit for bit (exact.h: one order of summation)."""
    codec = TurboQuantCodec(96, bits, variant=variant)
    rng = np.random.default_rng(0)
    codes = codec.encode(rng.standard_normal((500, 96)).astype(np.float32))
    rotated = codec.rotate_queries(torch.from_numpy(rng.standard_normal((6, 96)).astype(np.float32)))
    reference, other = _scanner(codec, "generic"), _scanner(codec, build)
    for a, b in zip(reference.begin(rotated, 5).tables(), other.begin(rotated, 5).tables()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(reference.key_columns(codes.packed[:333]), other.key_columns(codes.packed[:333]))
    want, got = reference.search(rotated, _chunks(codes, 500), 200), other.search(rotated, _chunks(codes, 500), 200)
    assert torch.equal(want[1], got[1]) and torch.equal(want[0], got[0])


@pytest.mark.parametrize("bits,variant", [(2, "mse"), (3, "mse"), (4, "prod"), (6, "mse")])
def test_margin_bounds_the_table_error(bits, variant):
    """Every row's quantized-table score is within |f| * margin of its exact score (the pruning rule's premise)."""
    codec = TurboQuantCodec(48, bits, variant=variant)
    rng = np.random.default_rng(1)
    codes = codec.encode(rng.standard_normal((400, 48)).astype(np.float32))
    rotated = codec.rotate_queries(torch.from_numpy(rng.standard_normal((3, 48)).astype(np.float32)))
    scanner = FastScanner(codec, z=0.0)
    lut, scale, bias, margin = scanner.begin(rotated, 1).tables()
    assert lut.max() <= 127 and (lut.astype(np.int64).max(axis=2).sum(axis=1) <= 65535).all()  # key pairs add in 8 bits
    keys = scanner._module.key_columns(scanner._plan, codes.packed, 1)  # (blocks, G/2, 32)
    nibbles = np.stack([keys & 15, keys >> 4], axis=2).reshape(len(keys), -1, BLOCK_ROWS)  # (blocks, G, 32)
    nibbles = nibbles.transpose(0, 2, 1).reshape(-1, nibbles.shape[1])[: len(codes.packed)]  # (n, G)
    segment = np.arange(scanner.n_keys) >= scanner.index_keys
    exact = codec.score(rotated, torch.from_numpy(codes.packed), torch.from_numpy(codes.factors)).numpy()
    f = codes.factors
    for i in range(len(rotated)):
        entries = lut[i][np.arange(scanner.n_keys), nibbles].astype(np.float64)  # (n, G)
        approx = np.zeros(len(f))
        bound = np.zeros(len(f))
        for s in (0, 1) if variant == "prod" else (0,):
            total = entries[:, segment == bool(s)].sum(axis=1)
            approx += f[:, s] * (total * scale[i, s] + bias[i, s])
            bound += np.abs(f[:, s]) * margin[i, s]
        assert (np.abs(approx - exact[i]) <= bound + 1e-5).all()
        assert np.abs(approx - exact[i]).max() > 0  # the tables are quantized: the bound is exercised


def test_statistical_margin_rescores_fewer_rows():
    codec = TurboQuantCodec(128, 4)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4000, 128)).astype(np.float32)
    codes = codec.encode(x)
    rotated = codec.rotate_queries(torch.from_numpy(x[:4] + 0.3 * rng.standard_normal((4, 128)).astype(np.float32)))
    counts = {}
    for z in (0.0, 4.0):
        search = FastScanner(codec, z=z).begin(rotated, 10)
        search.scan(codes.packed, codes.factors, None, 0, 1, None)
        counts[z] = search.rescored()
        assert torch.equal(torch.from_numpy(search.result()[1]), _exact_topk(codec, rotated, codes, 10)[1])
    assert counts[4.0] < counts[0.0] < 4 * 4000 // 4


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_a_forked_child_searches_on_threads_of_its_own():
    """A child forked after the parent's threaded searches gets the parent's results on two
    threads: its own pool (GNU OpenMP, whose team the parent's searches used, hangs there)."""
    codec = TurboQuantCodec(64, 4)
    rng = np.random.default_rng(7)
    codes = codec.encode(rng.standard_normal((20000, 64)).astype(np.float32))
    rotated = codec.rotate_queries(torch.from_numpy(rng.standard_normal((9, 64)).astype(np.float32)))
    scanner = FastScanner(codec)

    def rows_on_two_threads() -> np.ndarray:
        search = scanner.begin(rotated, 10, 2)
        search.scan(codes.packed, codes.factors, None, 0, 2, None)
        return np.ascontiguousarray(search.result()[1])

    want = rows_on_two_threads()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the search, its rows down the pipe, and out (no pytest machinery)
        status = 1
        try:
            os.write(write, rows_on_two_threads().tobytes())
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], 120)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        assert ready, "the forked child's search hung"
        got = os.read(read, want.nbytes)
    finally:
        os.close(read)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    np.testing.assert_array_equal(np.frombuffer(got, dtype=want.dtype).reshape(want.shape), want)


# A parent that ran torch's threaded products, then a child whose first search loads the extension:
# GNU OpenMP hangs in such a child, so that search must not use the team the parent's OpenMP ran.
# The child only searches (codes and queries from files): torch's and numba's own threaded work
# hangs there as well.
_PARENT_USES_TORCH_THREADS = """
import os, sys, torch
torch.set_num_threads(2)
a = torch.randn(600, 600)
for _ in range(3):
    a @ a
"""
_SEARCH_ON_TWO_THREADS = """
import numpy as np, torch
from tqindex.codec import TurboQuantCodec
from tqindex.kernels.fastscan import FastScanner
data = np.load(sys.argv[1])
search = FastScanner(TurboQuantCodec(64, 4)).begin(torch.from_numpy(data["rotated"]), 10, 2)
search.scan(data["packed"], data["factors"], None, 0, 2, None)
np.save(sys.argv[2], search.result()[1])
"""
_LATE_LOAD_SCRIPTS = {
    # imported in the parent, loaded in an os.fork child
    "os.fork": _PARENT_USES_TORCH_THREADS
    + "import tqindex.kernels.fastscan\n"
    + "pid = os.fork()\n"
    + "if pid == 0:\n"
    + "".join("    " + line + "\n" for line in _SEARCH_ON_TWO_THREADS.strip().splitlines())
    + "    os._exit(0)\n"
    + "sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n",
    # imported for the first time in a multiprocessing child forked from a parent that never did
    "multiprocessing": _PARENT_USES_TORCH_THREADS
    + "import multiprocessing as mp\n"
    + "def child():\n"
    + "".join("    " + line + "\n" for line in _SEARCH_ON_TWO_THREADS.strip().splitlines())
    + "if __name__ == '__main__':\n"
    + "    process = mp.get_context('fork').Process(target=child)\n"
    + "    process.start()\n"
    + "    process.join()\n"
    + "    sys.exit(process.exitcode)\n",
}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
@pytest.mark.parametrize("how", sorted(_LATE_LOAD_SCRIPTS))
def test_a_child_whose_first_search_loads_the_extension_does_not_hang(how, tmp_path):
    """The extension is loaded on the first search: in a child forked from a parent that ran
    torch's OpenMP threads, that search runs on threads of its own (it hung in libgomp) and finds
    the rows this process finds."""
    codec = TurboQuantCodec(64, 4)
    rng = np.random.default_rng(7)
    codes = codec.encode(rng.standard_normal((20000, 64)).astype(np.float32))
    rotated = codec.rotate_queries(torch.from_numpy(rng.standard_normal((9, 64)).astype(np.float32)))
    np.savez(tmp_path / "data.npz", rotated=rotated.numpy(), packed=codes.packed, factors=codes.factors)
    search = FastScanner(codec).begin(rotated, 10, 2)
    search.scan(codes.packed, codes.factors, None, 0, 2, None)
    script = tmp_path / "late_load.py"
    script.write_text(_LATE_LOAD_SCRIPTS[how])
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "data.npz"), str(tmp_path / "rows.npy")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the hung child too
        process.communicate()
        pytest.fail(f"the {how} child's first search hung")
    assert process.returncode == 0, stderr
    np.testing.assert_array_equal(np.load(tmp_path / "rows.npy"), search.result()[1])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")
def test_searches_on_fewer_threads_than_torch_do_not_restart_its_threads():
    """A search on 2 threads while torch runs 4: no thread ends (GNU OpenMP ended the team's
    threads beyond a smaller team, and torch's next product started new ones)."""
    codec = TurboQuantCodec(64, 4)
    rng = np.random.default_rng(8)
    codes = codec.encode(rng.standard_normal((20000, 64)).astype(np.float32))
    rotated = codec.rotate_queries(torch.from_numpy(rng.standard_normal((9, 64)).astype(np.float32)))
    a = torch.randn(600, 600)
    saved = torch.get_num_threads()
    torch.set_num_threads(4)
    try:

        def search_then_product() -> None:
            search = FastScanner(codec).begin(rotated, 10, 2)
            search.scan(codes.packed, codes.factors, None, 0, 2, None)
            a @ a

        search_then_product()  # a pool of std::threads starts here where that is the pool
        before = set(os.listdir("/proc/self/task"))
        for _ in range(3):
            search_then_product()
        assert set(os.listdir("/proc/self/task")) == before
    finally:
        torch.set_num_threads(saved)


def test_openmp_can_be_turned_off_and_is_off_in_children(monkeypatch):
    assert fastscan._openmp_is_safe() == (os.environ.get("TQINDEX_OPENMP", "1") != "0")
    monkeypatch.setenv("TQINDEX_OPENMP", "0")
    assert not fastscan._openmp_is_safe()
    monkeypatch.setenv("TQINDEX_OPENMP", "1")
    monkeypatch.setattr(fastscan, "_IMPORTED_IN", os.getpid() + 1)  # as in a child forked after the import
    assert not fastscan._openmp_is_safe()


def test_threads_and_query_batches_do_not_change_results():
    codec = TurboQuantCodec(64, 2)
    rng = np.random.default_rng(4)
    codes = codec.encode(rng.standard_normal((3000, 64)).astype(np.float32))
    rotated = codec.rotate_queries(torch.from_numpy(rng.standard_normal((9, 64)).astype(np.float32)))
    scanner = FastScanner(codec)
    results = []
    for threads in (1, 2, 3):
        search = scanner.begin(rotated, 7)
        search.scan(codes.packed, codes.factors, None, 0, threads, None)
        results.append(search.result())
    one_by_one = [scanner.begin(rotated[i : i + 1], 7) for i in range(9)]
    for search in one_by_one:
        search.scan(codes.packed, codes.factors, None, 0, 2, None)
    stacked = np.concatenate([s.result()[1] for s in one_by_one])
    for scores, rows in results:
        np.testing.assert_array_equal(rows, results[0][1])
        np.testing.assert_array_equal(rows, stacked)


def test_a_row_bias_is_added_before_selecting():
    """The L2 index's per-row bias: results are the exact top-k of ``codec.score + bias``."""
    codec = TurboQuantCodec(48, 3)
    rng = np.random.default_rng(9)
    codes = codec.encode(rng.standard_normal((500, 48)).astype(np.float32))
    rotated = codec.rotate_queries(torch.from_numpy(rng.standard_normal((4, 48)).astype(np.float32)))
    bias = np.linspace(-60, 60, 500, dtype=np.float32)  # large against the scores (std ~7): the ranking follows it
    exact = codec.score(rotated, torch.from_numpy(codes.packed), torch.from_numpy(codes.factors)) + torch.from_numpy(bias)
    want = torch.argsort(exact, dim=1, descending=True, stable=True)[:, :8]
    scanner = FastScanner(codec)
    for columns in (None, scanner.key_columns(codes.packed)):
        search = scanner.begin(rotated, 8)
        search.scan(codes.packed, codes.factors, None, 0, 2, columns, bias)
        scores, rows = search.result()
        np.testing.assert_array_equal(rows, want.numpy())
        np.testing.assert_allclose(scores, exact.gather(1, want).numpy(), rtol=1e-5, atol=1e-5)
    assert (want >= 250).all()  # the bias decided it
    with pytest.raises(ValueError, match="bias: expected"):
        scanner.begin(rotated, 8).scan(codes.packed, codes.factors, None, 0, 1, None, bias[:10])


def _groups(codes, rng):
    """Query groups over 600 rows for 5 queries (an inverted file's shape): each query meets a row
    in one group at most; per-query and per-row biases, a validity mask, and scattered rows
    numbered by ``rows``. Also the bias each (query, row) met, float32 ``(5, 600)``, -inf where none."""
    packed, factors = torch.from_numpy(codes.packed), torch.from_numpy(codes.factors)
    met = torch.full((5, 600), float("-inf"))
    scattered = torch.from_numpy(rng.permutation(np.arange(400, 600))[:150])
    row_bias = torch.from_numpy(rng.uniform(-3, 3, 600).astype(np.float32))
    valid = torch.from_numpy(rng.random(200) > 0.3)
    plans = [  # queries, query bias, rows, chunk bias, valid
        ([0, 3], [1.5, -2.0], torch.arange(0, 200), False, None),
        ([1, 3, 4], [0.0, 4.0, -1.0], torch.arange(200, 400), True, valid),
        ([2], [0.5], scattered, True, None),
        ([0, 1, 4], None, torch.arange(400, 600), False, None),
    ]
    groups = []
    for queries, query_bias, rows, with_bias, mask in plans:
        gathered = bool((rows != torch.arange(int(rows[0]), int(rows[0]) + len(rows))).any())
        bias = row_bias[rows] if with_bias else None
        chunk = Chunk(0 if gathered else int(rows[0]), packed[rows], factors[rows], mask, bias)
        qb = None if query_bias is None else torch.tensor(query_bias)
        groups.append(QueryChunk(torch.tensor(queries), chunk, qb, rows if gathered else None))
        for j, query in enumerate(queries):
            allowed = rows if mask is None else rows[mask]
            met[query, allowed] = (0.0 if qb is None else float(qb[j])) + (row_bias[allowed] if with_bias else 0.0)
    return groups, met


@pytest.mark.parametrize("build", list(BUILDS))
def test_groups_scan_some_queries_each_with_their_biases_and_row_numbers(build):
    """``search_groups`` (the inverted-file scan) and the rescoring path of ``scan_groups_topk``
    both give the exact top-k of ``codec.score + bias`` over the rows each query met."""
    codec = TurboQuantCodec(40, 3)
    rng = np.random.default_rng(11)
    codes = codec.encode(rng.standard_normal((600, 40)).astype(np.float32))
    rotated = codec.rotate_queries(torch.from_numpy(rng.standard_normal((5, 40)).astype(np.float32)))
    groups, met = _groups(codes, rng)
    exact = codec.score(rotated, torch.from_numpy(codes.packed), torch.from_numpy(codes.factors)) + met
    want = torch.argsort(exact, dim=1, descending=True, stable=True)[:, :7]
    fetch = lambda rows: (torch.from_numpy(codes.packed)[rows], torch.from_numpy(codes.factors)[rows])  # noqa: E731
    bias_of = lambda rows: met.gather(1, rows.clamp_min(0))  # noqa: E731
    for scanner in (_scanner(codec, build), _scanner(codec, build, z=0.0), GemmScanner(codec)):
        scores, rows = scan_groups_topk(codec, scanner, rotated, groups, 7, fetch, bias_of)
        assert torch.equal(rows, want), type(scanner).__name__
        np.testing.assert_allclose(scores, exact.gather(1, want), rtol=1e-5, atol=1e-5)
    search = FastScanner(codec).begin(rotated, 3)
    one = groups[0].chunk
    for queries, match in (([0, 0], "distinct"), ([5], "distinct"), ([-1], "distinct")):
        with pytest.raises(ValueError, match=match):
            search.scan(one.packed.numpy(), one.factors.numpy(), None, 0, 1, None, None, None, np.array(queries, np.int64))
    with pytest.raises(ValueError, match="query_bias: expected 2"):
        search.scan(one.packed.numpy(), one.factors.numpy(), None, 0, 1, None, None, None, np.array([0, 1]), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="rows: expected 200"):
        search.scan(one.packed.numpy(), one.factors.numpy(), None, 0, 1, None, None, np.arange(5))


def test_fewer_valid_rows_than_k_pad_with_minus_one():
    codec = TurboQuantCodec(32, 4)
    codes = codec.encode(np.random.default_rng(5).standard_normal((100, 32)).astype(np.float32))
    valid = np.zeros(100, bool)
    valid[[3, 50, 99]] = True
    search = FastScanner(codec).begin(codec.rotate_queries(torch.ones(1, 32)), 5)
    search.scan(codes.packed, codes.factors, valid.view(np.uint8), 1000, 1, None)
    scores, rows = search.result()
    assert sorted(rows[0, :3].tolist()) == [1003, 1050, 1099] and rows[0, 3:].tolist() == [-1, -1]
    assert np.isneginf(scores[0, 3:]).all()


def test_key_columns_grow_with_the_rows():
    codec = TurboQuantCodec(40, 3)
    packed = codec.encode(np.random.default_rng(6).standard_normal((250, 40)).astype(np.float32)).packed
    scanner = FastScanner(codec)
    columns = KeyColumns(scanner)
    for stop in (0, 10, 31, 32, 33, 100, 250):
        columns.update(packed[:stop])
        np.testing.assert_array_equal(columns.rows(0, stop), scanner.key_columns(packed[:stop]))
    np.testing.assert_array_equal(columns.rows(64, 128), scanner.key_columns(packed[64:128]))
    with pytest.raises(ValueError, match="blocks of 32"):
        columns.rows(10, 20)


def test_bad_arrays_are_refused():
    codec = TurboQuantCodec(32, 4)
    codes = codec.encode(np.random.default_rng(7).standard_normal((10, 32)).astype(np.float32))
    scanner = FastScanner(codec)
    search = scanner.begin(codec.rotate_queries(torch.ones(1, 32)), 3)
    with pytest.raises(ValueError, match="packed: expected"):
        search.scan(codes.packed[:, :5], codes.factors, None, 0, 1, None)
    with pytest.raises(ValueError, match="factors: expected"):
        search.scan(codes.packed, codes.factors[:5], None, 0, 1, None)
    with pytest.raises(ValueError, match="key_columns: expected"):
        search.scan(codes.packed, codes.factors, None, 0, 1, np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="queries: expected"):
        scanner._module.Search(scanner._plan, np.zeros((1, 5), np.float32), 3, 0.0)


def test_trellis_codes_are_refused():
    codec = TurboQuantCodec(32, 3, quantizer="trellis")
    assert not fastscan.supports(codec)
    with pytest.raises(ValueError, match="trellis"):
        FastScanner(codec)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_index_search_equals_the_torch_backend(bits, tmp_path):
    rng = np.random.default_rng(8)
    x, q = rng.standard_normal((1540, 48)).astype(np.float32), rng.standard_normal((6, 48)).astype(np.float32)
    fast = TurboQuantIndex(48, bits, backend="fastscan")
    reference = TurboQuantIndex(48, bits, backend="torch", chunk_rows=256)
    on_disk = TurboQuantIndex(48, bits, path=tmp_path / "i.tqi", backend="fastscan")  # no key columns: rows transposed
    for index in (fast, reference, on_disk):
        index.add(x[:1000])
        index.remove_ids(np.arange(0, 1000, 9))
        index.search(q[:1], 3)  # the key columns are made here ...
        index.add(x[1000:])  # ... and must take these rows at the next search
    want = reference.search(q, 10, filter=np.arange(0, 1540, 2))
    for index in (fast, on_disk):
        D, I = index.search(q, 10, filter=np.arange(0, 1540, 2))
        np.testing.assert_array_equal(I, want[1])
        np.testing.assert_allclose(D, want[0], rtol=1e-5, atol=1e-5)
    assert fast._columns is not None and fast._columns.count == 1540 and on_disk._columns is None
    assert fast.memory_usage() >= fast._columns.nbytes + 1540 * fast.codec.code_bytes
    on_disk.close()


def test_auto_picks_the_fast_scan_on_the_cpu_and_not_on_cuda():
    codec = TurboQuantCodec(64, 4)
    assert isinstance(get_scanner(codec, "auto", "cpu", queries=1), FastScanner)
    assert isinstance(get_scanner(codec, "auto", "cpu", queries=1000), FastScanner)
    assert isinstance(get_scanner(codec, "torch", "cpu", queries=1), GemmScanner)
    with pytest.raises(ValueError, match="CPU only"):
        get_scanner(codec, "fastscan", "cuda")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("build", list(BUILDS))
def test_search_lists_equals_the_groups_scanned_one_call_each(build, threads):
    """`FastScanner.search_lists`, one kernel call over groups of rows with their key columns, a
    bias per (group, query) and a mask, returns what `search_groups` returns scanning each group
    in its own call: the same rows and exact scores."""
    rng = np.random.default_rng(11)
    codec = TurboQuantCodec(40, 4)
    n = 32 * 12
    codes = codec.encode(rng.standard_normal((n, 40)).astype(np.float32))
    packed, factors = np.asarray(codes.packed), np.asarray(codes.factors)
    scanner = _scanner(codec, build)
    queries = codec.rotate_queries(torch.from_numpy(rng.standard_normal((5, 40)).astype(np.float32)))
    starts, stops = np.array([0, 64, 128, 320]), np.array([50, 134, 300, 384])  # odd block counts: AVX-512's two-block steps  # lists of 50, 70, 172 and 64 rows
    members = [[0, 2], [1, 2, 3, 4], [0, 4], [3]]
    offsets, who = np.cumsum([0] + [len(m) for m in members]), np.concatenate(members)
    bias = rng.standard_normal(len(who)).astype(np.float32)
    valid = rng.random(n) > 0.2
    got = scanner.search_lists(queries, packed, factors, scanner.key_columns(packed), starts, stops, offsets, who, bias, 7, valid, threads)
    groups = [
        QueryChunk(torch.tensor(m), Chunk(int(s), torch.from_numpy(packed[s:e]), torch.from_numpy(factors[s:e]), torch.from_numpy(valid[s:e])),
                   torch.from_numpy(bias[o : o + len(m)]))
        for s, e, m, o in zip(starts, stops, members, offsets)
    ]  # fmt: skip
    want = scanner.search_groups(queries, groups, 7)
    np.testing.assert_array_equal(got[1].numpy(), want[1].numpy())
    np.testing.assert_allclose(got[0].numpy(), want[0].numpy(), rtol=1e-6)
    assert (got[1].numpy() >= 0).all() and valid[got[1].numpy()].all()


def test_search_lists_refuses_groups_it_cannot_scan():
    codec = TurboQuantCodec(40, 4)
    codes = codec.encode(np.random.default_rng(0).standard_normal((100, 40)).astype(np.float32))
    packed, factors = np.asarray(codes.packed), np.asarray(codes.factors)
    scanner = FastScanner(codec)
    queries = codec.rotate_queries(torch.randn(3, 40))
    columns = scanner.key_columns(packed)
    one = np.array([0, 1])
    with pytest.raises(ValueError, match="multiples of 32"):
        scanner.search_lists(queries, packed, factors, columns, np.array([10]), np.array([50]), one, np.array([0]), None, 5)
    with pytest.raises(ValueError, match="a group outside the rows"):
        scanner.search_lists(queries, packed, factors, None, np.array([64]), np.array([101]), one, np.array([0]), None, 5)
    with pytest.raises(ValueError, match="distinct positions"):
        scanner.search_lists(queries, packed, factors, None, np.array([0]), np.array([50]), np.array([0, 2]), np.array([1, 1]), None, 5)
    with pytest.raises(ValueError, match="distinct positions"):
        scanner.search_lists(queries, packed, factors, None, np.array([0]), np.array([50]), one, np.array([3]), None, 5)


@pytest.mark.parametrize("k", [1, 3, 32, 100, 257])
def test_top_k_rows_equals_torch_topk_with_ties_to_the_lower_column(k):
    rng = np.random.default_rng(k)
    scores = torch.from_numpy(rng.standard_normal((70, 257)).astype(np.float32))
    scores[3] = 1.0  # all tied
    scores[4, ::2] = 9.0  # ties at the top
    scores[5, :10] = -0.0
    scores[5, 10:] = -1.0
    values, columns = fastscan.top_k_rows(scores, k, threads=2)
    expected_values, _ = scores.topk(k, dim=1)
    assert values.dtype == torch.float32 and columns.dtype == torch.int64 and values.shape == columns.shape == (70, k)
    torch.testing.assert_close(values, expected_values, rtol=0, atol=0)
    assert torch.equal(torch.gather(scores, 1, columns), values)
    # ties to the lower column: every row's (value desc, column asc) order
    for row in range(70):
        pairs = list(zip((-values[row]).tolist(), columns[row].tolist()))
        assert pairs == sorted(pairs)
    assert columns[3].tolist() == list(range(k))
    assert columns[4, : min(k, 129)].tolist() == list(range(0, 2 * min(k, 129), 2))
    assert columns[5, : min(k, 10)].tolist() == list(range(min(k, 10)))


@pytest.mark.parametrize("k", [1, 4])
def test_top_k_rows_with_a_nan_stays_in_the_row(k):
    """Rows must be finite; one with a NaN still gets columns of the row (no read past it)."""
    scores = torch.randn(3, 40)
    scores[1, 0] = float("nan")
    scores[2, :] = float("nan")
    _, columns = fastscan.top_k_rows(scores, k, threads=1)
    assert ((columns >= 0) & (columns < 40)).all()


def test_top_k_rows_refuses_k_outside_the_row():
    scores = torch.zeros(2, 5)
    for k in (0, 6):
        with pytest.raises(ValueError, match="k must be in 1..5"):
            fastscan.top_k_rows(scores, k)


def test_make_plan_refuses_levels_and_fields_outside_their_arrays():
    """A plan whose rows or levels would be read out of bounds is refused when it is made."""
    codec = TurboQuantCodec(64, 4, variant="prod")
    scanner = FastScanner(codec)
    args = list(scanner._plan_args)  # ..., fields (12), sign_field (13), levels (14), level_offset (15)
    bad_offsets = args[15].copy()
    bad_offsets[5] = len(args[14]) - 1  # its 3-bit codes would reach past the end
    with pytest.raises(ValueError, match="level_offset: a code past the levels"):
        scanner._module.make_plan(*args[:15], bad_offsets)
    bad_fields = args[12].copy()
    bad_fields[0, 0] = codec.code_bytes - 1  # the field's bytes would run past the row
    with pytest.raises(ValueError, match="fields: a field outside the row"):
        scanner._module.make_plan(*args[:12], bad_fields, *args[13:])
    bad_sign = args[13].copy()
    bad_sign[0] = codec.code_bytes - 2
    with pytest.raises(ValueError, match="sign_field: outside the row"):
        scanner._module.make_plan(*args[:13], bad_sign, *args[14:])
    scanner._module.make_plan(*args)  # the codec's own arguments pass
