"""Device operations of one resident ``index.search`` (issue 12's end-to-end overhead), counted without a GPU.

On a GPU each torch operation of the search is at least one kernel launch, and a resident search
is small enough that launches, not bytes, set its time beyond the scan kernel. This logs the aten
operations of one ``TurboQuantIndex(..., backend="triton").to(device).search`` under a
``TorchDispatchMode`` (views and allocations left out, and what runs inside a Triton launch) and
counts the Triton kernel launches, so forms of the search path can be compared on any machine.
Under ``TRITON_INTERPRET=1`` (set before Python starts) it runs on the CPU.

Usage: TRITON_INTERPRET=1 python benchmarks/search_launches.py [--rows 2000] [--dim 64] [--bits 4] [--queries 1]
"""

from __future__ import annotations

import argparse
import collections

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tqindex.kernels.triton_scan as triton_scan
from tqindex import TurboQuantIndex

#: not device work of their own: views and allocations
_FREE = ("view", "_unsafe_view", "t", "alias", "transpose", "expand", "slice", "select", "unsqueeze", "squeeze", "permute",
         "as_strided", "detach", "empty", "empty_like", "empty_strided", "lift_fresh", "_reshape_alias")  # fmt: skip


class _Log(TorchDispatchMode):
    """The aten operations run under it, but for those inside a Triton launch (``paused``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


class _Counted:
    """A Triton kernel whose launches are counted, with the log paused during them (the
    interpreter copies every argument to the host and back)."""

    def __init__(self, kernel, counts: collections.Counter, log: _Log):
        self.kernel, self.counts, self.log = kernel, counts, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counts[self.kernel.__name__] += 1
            self.log.paused = True
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                self.log.paused = False

        return launch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--bits", type=float, default=4)
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() and not triton_scan._INTERPRETED else "cpu")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    index = TurboQuantIndex(args.dim, args.bits, backend="triton").to(args.device)
    index.add(rng.standard_normal((args.rows, args.dim)).astype(np.float32))
    queries = rng.standard_normal((args.queries, args.dim)).astype(np.float32)
    index.search(queries, 10)  # warm: compiles, device copies of the codec's tables
    kernels: collections.Counter = collections.Counter()
    log = _Log()
    real = {name: getattr(triton_scan, name) for name in ("_scan_kernel", "_rescore_kernel") if hasattr(triton_scan, name)}
    for name, kernel in real.items():
        setattr(triton_scan, name, _Counted(kernel, kernels, log))
    try:
        with log:
            index.search(queries, 10)
    finally:
        for name, kernel in real.items():
            setattr(triton_scan, name, kernel)
    ops = collections.Counter(op for op in log.ops if op not in _FREE)
    print(f"index.search of {args.queries} quer{'y' if args.queries == 1 else 'ies'} over {args.rows} x {args.dim} ({args.bits:g} bits, {args.device}):")
    print(f"  torch operations: {sum(ops.values())} ({', '.join(f'{op} {n}' for op, n in ops.most_common())})")
    print(f"  Triton launches: {sum(kernels.values())} ({', '.join(f'{op} {n}' for op, n in kernels.most_common())})")


if __name__ == "__main__":
    main()
