"""Where GPU work runs: every Triton launch on its tensors' device, and a resident index's CUDA
graphs serving one search at a time when many threads search one index.

The launches run in the interpreter on CPU tensors (``on_device`` is then a no-op, so the tests
record what it is asked for); with two GPUs, an index on the second one searches while the first
is current.
"""

import contextlib
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from triton_device import DEVICE
from tqindex import TurboQuantIndex
from tqindex.kernels import graphs, grid, triton_encode, triton_scan
from tqindex.kernels.scan import resident_candidates, search_resident
from tqindex.kv import TurboQuantCache
from tqindex.kv import triton_attention

pytestmark = pytest.mark.triton

# module: its kernels launched inside on_device
LAUNCHES = {
    triton_scan: ("_scan_kernel", "_rescore_kernel"),
    triton_encode: ("_quantize_kernel",),
    triton_attention: ("_split_kernel", "_merge_kernel"),
}


def test_on_device_makes_a_cuda_device_current_and_is_a_no_op_elsewhere():
    assert isinstance(grid.on_device(torch.device("cpu")), contextlib.nullcontext)
    context = grid.on_device(torch.device("cuda", 1))  # made without CUDA; entered, it switches devices
    assert isinstance(context, torch.cuda.device) and context.idx == 1


def test_every_launch_runs_inside_on_device_for_its_tensors(monkeypatch):
    """Triton launches on the current CUDA device, not the tensors' (an index on ``cuda:1`` would
    hand ``cuda:0`` its pointers): each launch site enters ``on_device`` of its tensors' device."""
    current: list[torch.device] = []
    launched: dict[str, list[torch.device]] = {}

    @contextlib.contextmanager
    def recording(device):
        current.append(device)
        yield
        current.pop()

    class Checked:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid_):
            def launch(*args, **kwargs):
                devices = {a.device for a in args if isinstance(a, torch.Tensor)}
                launched.setdefault(self.kernel.__name__, []).append(current[-1] if current else None)
                assert current and devices == {current[-1]}, f"{self.kernel.__name__} launched outside on_device({devices})"
                return self.kernel[grid_](*args, **kwargs)

            return launch

    for module, names in LAUNCHES.items():
        monkeypatch.setattr(module, "on_device", recording)
        for name in names:
            monkeypatch.setattr(module, name, Checked(getattr(module, name)))
    rng = np.random.default_rng(0)
    index = TurboQuantIndex(64, 4, backend="triton").to(DEVICE)
    x = torch.from_numpy(rng.standard_normal((200, 64)).astype(np.float32)).to(DEVICE)
    index.add(x)  # on a GPU encoded by the fused kernel; on the CPU by codec.encode
    triton_encode.encode(index.codec, x)
    index.search(rng.standard_normal((2, 64)).astype(np.float32), 5)
    cache = TurboQuantCache(4, 4, window=8, chunk=8, backend="triton")
    cache.update(torch.randn(1, 2, 40, 64, device=DEVICE), torch.randn(1, 2, 40, 64, device=DEVICE), 0)
    keys, values = cache.layers[0].states()
    triton_attention.triton_codes_attention(torch.randn(1, 4, 1, 64, device=DEVICE), keys, values, None, scaling=0.125, causal=False)
    assert set(launched) == {name for names in LAUNCHES.values() for name in names}
    assert all(device == DEVICE for devices in launched.values() for device in devices)


def test_search_graphs_serve_one_search_at_a_time(monkeypatch):
    """A captured graph has one input buffer and one set of outputs: searches from several threads
    through one index each get the results of their own queries (copy in, replay and copy out as
    one step), where interleaved they read each other's. The graph is faked by the eager device
    part on CPU tensors, with each step slow enough for the threads to interleave."""
    rng = np.random.default_rng(1)
    index = TurboQuantIndex(48, 4, backend="triton").to(DEVICE)
    index.add(rng.standard_normal((300, 48)).astype(np.float32))
    scanner = triton_scan.TritonScanner(index.codec)
    args = (index.codec, scanner)
    resident = (*index._resident[:2], None, 5, None)  # packed, factors, valid, k, bias

    class Buffer:
        def __init__(self, tensor):
            self.tensor = tensor

        def copy_(self, source):
            time.sleep(0.003)
            self.tensor.copy_(source)

    class Graph:
        def __init__(self, queries, outputs):
            self.queries, self.outputs = queries, outputs

        def replay(self):
            time.sleep(0.003)
            packed, factors, valid, k, bias = resident
            fresh = resident_candidates(*args, self.queries.tensor, packed, factors, valid, k, bias)
            for out, new in zip(self.outputs, fresh):
                out.copy_(new)

    captured = []

    def capture(codec, scanner, rotated_queries, packed, factors, valid, k, bias):
        queries = Buffer(rotated_queries.clone())
        outputs = tuple(t.clone() for t in resident_candidates(codec, scanner, rotated_queries, packed, factors, valid, k, bias))
        captured.append(queries)
        return graphs._Captured(Graph(queries, outputs), queries, *outputs)

    monkeypatch.setattr(graphs, "_capture", capture)
    monkeypatch.setattr(graphs, "on_device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(graphs, "to_host", lambda *tensors: tuple(t.clone() for t in tensors))  # a device's copy to the host
    queries = [index.codec.rotate_queries(torch.from_numpy(rng.standard_normal((1, 48)).astype(np.float32))) for _ in range(6)]
    want = [search_resident(*args, q, *resident) for q in queries]
    searches = graphs.SearchGraphs(max_queries=8)
    got, errors = {}, []

    def search(i):
        try:
            for _ in range(4):
                got[i] = searches._replayed(*args, queries[i], *resident)
                for have, expected in zip(got[i], want[i]):
                    torch.testing.assert_close(have, expected)
        except BaseException as error:  # collected: an assertion in a thread must fail the test
            errors.append(error)

    threads = [threading.Thread(target=search, args=(i,)) for i in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a search thread hung"
    assert not errors, errors[0]
    assert len(captured) == 1, "one shape, one capture"


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_an_index_and_a_cache_on_the_second_gpu_work_while_the_first_is_current():
    """With ``cuda:0`` current, an index and a KV cache on ``cuda:1`` encode, search and attend
    there, and give what the same work on ``cuda:0`` gives."""
    rng = np.random.default_rng(2)
    x, q = rng.standard_normal((500, 64)).astype(np.float32), rng.standard_normal((3, 64)).astype(np.float32)
    torch.cuda.set_device(0)
    results = []
    for device in ("cuda:0", "cuda:1"):
        index = TurboQuantIndex(64, 4, backend="triton").to(device)
        index.add(torch.from_numpy(x).to(device))
        results.append(index.search(q, 5))
    np.testing.assert_array_equal(results[0][1], results[1][1])
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    outputs = []
    for device in ("cuda:0", "cuda:1"):
        torch.manual_seed(0)
        cache = TurboQuantCache(4, 4, window=8, chunk=8, backend="triton")
        cache.update(torch.randn(1, 2, 40, 64).to(device), torch.randn(1, 2, 40, 64).to(device), 0)
        keys, values = cache.layers[0].states()
        query = torch.randn(1, 4, 1, 64).to(device)
        outputs.append(triton_attention.triton_codes_attention(query, keys, values, None, scaling=0.125, causal=False).cpu())
    torch.testing.assert_close(outputs[0], outputs[1])
