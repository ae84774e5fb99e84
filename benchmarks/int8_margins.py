"""How tight the int8 scan's margin is, and how often it sends a query to the exact rescan (CPU).

The int8 form of the Triton scan (``tqindex/kernels/triton_int8.py``) ranks rows by
``f s_q s_c sum L Q + |f| margin``. Its result is the codec's own top-k when the k-th best rescored
candidate is at least the last candidate's bound; a query where it is not is rescanned exactly
(``scan.below_bounds``). This computes the kernel's formula in torch, in float64, over every row
(no GPU needed), on clustered rows whose queries lie near rows (small gaps between neighbours):

* error / margin: the largest ``|int8 estimate - float estimate|`` over all (query, row) pairs, as
  a fraction of the query's margin (above 1: the margin did not hold for that pair);
* rescans: the fraction of queries ``below_bounds`` flags;
* top-k kept: the fraction of queries whose true top-k is among the candidates.

Usage: python benchmarks/int8_margins.py [--n 200000] [--bits 2 4] [--z 5 0] [--queries 64] [--k 10]
"""

from __future__ import annotations

import argparse

import torch

from _common import markdown_table
from tqindex.codec import TurboQuantCodec
from tqindex.kernels import candidate_count
from tqindex.kernels import triton_int8 as int8  # only its host functions: no kernel runs


def clustered(n: int, dim: int, queries: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rows around 1,000 Gaussian centres (noise 0.5 per coordinate), queries near rows (noise 0.3)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(1000, dim, generator=generator)
    x = centres[torch.randint(0, 1000, (n,), generator=generator)] + 0.5 * torch.randn(n, dim, generator=generator)
    q = x[torch.randint(0, n, (queries,), generator=generator)] + 0.3 * torch.randn(queries, dim, generator=generator)
    return x, q


def measure(codec: TurboQuantCodec, x: torch.Tensor, q: torch.Tensor, z: float, k: int) -> list:
    codes = codec.encode(x)
    rotated = codec.rotate_queries(q)
    exact = codec.score(rotated, codes.packed, codes.factors).double()
    c_scale, _ = int8.level_scale(codec)
    levels = torch.round(codec.dequantize(codes.packed).double() / c_scale)
    prepared = int8.Int8Plan(codec).quantize(rotated, z)
    quantized = torch.round(rotated / (rotated.abs().amax(dim=1, keepdim=True) / 127)).double()
    f = codes.factors[:, 0].double()
    scale, margin = prepared.terms[:, :1].double(), prepared.terms[:, 1:].double()
    approx = (quantized @ levels.T) * scale * f
    bounds = approx + f.abs() * margin
    count = candidate_count(k)
    top_bounds, candidates = bounds.topk(count, dim=1)
    rescored = exact.gather(1, candidates).topk(k, dim=1).values
    rescans = (rescored[:, -1] < top_bounds[:, -1]).double().mean()
    true_top = exact.topk(k, dim=1).indices
    kept = sum(set(t.tolist()) <= set(c.tolist()) for t, c in zip(true_top, candidates)) / len(q)
    ratio = ((approx - exact).abs() / f.abs() / margin).max()
    return [f"{float(codec.config.bits):g}", f"{z:g}", f"{float(margin.median()):.5f}", f"{float(ratio):.3f}", f"{float(rescans):.3f}", f"{kept:.3f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2], choices=[2, 4])
    parser.add_argument("--z", type=float, nargs="+", default=[5.0, 0.0])
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    x, q = clustered(args.n, args.dim, args.queries, args.seed)
    rows = [measure(TurboQuantCodec(args.dim, bits, seed=args.seed), x, q, z, args.k) for bits in args.bits for z in args.z]
    print(f"{args.n:,} x {args.dim} clustered rows, {args.queries} queries, k = {args.k}, {candidate_count(args.k)} candidates:\n")
    print(markdown_table(["bits", "z", "median margin", "largest error / margin", "rescans", "top-k kept"], rows))


if __name__ == "__main__":
    main()
