"""What a reduced-precision rotation GEMM does to the codes: TF32 and bf16 emulated on the CPU.

On a GPU the rotation ``x P^T`` is most of an encode's work at d = 768-1536 (issue 12's encode
target), and torch runs it on the tensor cores in TF32 after
``torch.set_float32_matmul_precision("high")``. This measures what that costs in fidelity, on
the CPU: both operands rounded to TF32's 10 mantissa bits (or bf16's 7), products accumulated in
float32, as the tensor cores do; then the codec's own quantization. Per setting: the fraction of
code bytes equal to the float32 rotation's, the mean squared error of the inner-product
estimates against exact float64 products, and 10-recall@10 of the estimates.

Rows are anisotropic Gaussian (coordinate scales 0.2 to 2), queries Gaussian.

    python benchmarks/rotation_precision.py --out docs/results/rotation_precision
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe_machine_md, machine_description, markdown_table, write_results  # noqa: E402

from tqindex import TurboQuantCodec  # noqa: E402

#: mantissa bits kept by each emulated precision (float32 keeps 23)
PRECISIONS = {"float32": 23, "tf32": 10, "bf16": 7}


def round_mantissa(t: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 ``t`` rounded to ``bits`` mantissa bits, to nearest even (finite values)."""
    if bits >= 23:
        return t
    drop = 23 - bits
    i = t.contiguous().view(torch.int32)
    rounded = (i + ((1 << (drop - 1)) - 1) + ((i >> drop) & 1)) & ~((1 << drop) - 1)
    return rounded.view(torch.float32)


class EmulatedRotation:
    """A dense rotation whose forward product takes operands rounded to ``bits`` mantissa bits."""

    def __init__(self, rotation, bits: int):
        self._rotation = rotation
        self._transposed = round_mantissa(torch.from_numpy(rotation.state()).t().contiguous(), bits)
        self._bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return round_mantissa(x, self._bits) @ self._transposed

    def __getattr__(self, name: str):
        return getattr(self._rotation, name)


def recall_at_10(estimates: torch.Tensor, exact: torch.Tensor) -> float:
    found, truth = estimates.topk(10, dim=1).indices, exact.topk(10, dim=1).indices
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(found, truth)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--dims", type=int, nargs="+", default=[768, 1536])
    parser.add_argument("--bits", type=float, nargs="+", default=[2, 4])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/rotation_precision")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    rows = []
    for dim in args.dims:
        x = torch.from_numpy((rng.standard_normal((args.rows, dim)) * np.linspace(0.2, 2.0, dim)).astype(np.float32))
        q = torch.from_numpy(rng.standard_normal((args.queries, dim)).astype(np.float32))
        exact = q.double() @ x.double().T
        for bits in args.bits:
            for search in (False, True):
                codec = TurboQuantCodec(dim, bits, search=search, seed=args.seed)
                dense = codec.rotation
                reference = None
                for name, mantissa in PRECISIONS.items():
                    codec.rotation = EmulatedRotation(dense, mantissa)
                    codes = codec.encode(x)
                    codec.rotation = dense  # estimates rotate the queries in float32, as a search does
                    reference = codes if reference is None else reference
                    estimates = torch.as_tensor(codec.inner_products(q, codes)).double()
                    rows.append({
                        "dim": dim, "bits": bits, "search": search, "precision": name,
                        "same_bytes": float((torch.as_tensor(codes.packed) == torch.as_tensor(reference.packed)).float().mean()),
                        "mse": float((estimates - exact).pow(2).mean()), "recall_at_10": recall_at_10(estimates, exact),
                    })  # fmt: skip
                    print(rows[-1], flush=True)
    base = {(r["dim"], r["bits"], r["search"]): r["mse"] for r in rows if r["precision"] == "float32"}
    table = markdown_table(
        ["d", "bits", "search", "rotation", "code bytes as float32's", "estimate MSE / float32's", "10-recall@10"],
        [[r["dim"], f"{r['bits']:g}", r["search"], r["precision"], f"{r['same_bytes']:.4f}", f"{r['mse'] / base[(r['dim'], r['bits'], r['search'])]:.4f}",
          f"{r['recall_at_10']:.3f}"] for r in rows],
    )  # fmt: skip
    machine = machine_description(torch.get_num_threads())
    markdown = f"{describe_machine_md(machine)}\n\n{args.rows} rows, {args.queries} queries, seed {args.seed}\n\n{table}\n"
    out = write_results(args.out, {"machine": machine, "args": vars(args), "rows": rows}, markdown)
    print(f"\n{table}\n\nwrote {out}")


if __name__ == "__main__":
    main()
