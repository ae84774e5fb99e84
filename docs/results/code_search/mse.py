"""Unit-vector reconstruction error and cosine with and without code search."""
import json, sys
import numpy as np, torch
ROOT = __import__('pathlib').Path(__file__).resolve().parents[3]; sys.path.insert(0, str(ROOT))
from tqindex.codec import TurboQuantCodec
torch.set_num_threads(2)
rows = []
def unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32); return x / np.linalg.norm(x, axis=1, keepdims=True)
for d, rot in ((384, "dense"), (128, "hadamard"), (64, "hadamard")):
    x = unit(20000, d, 1); q = unit(20000, d, 2)
    for variant, bitlist in (("mse", (2, 2.5, 3, 3.5, 4)), ("prod", (3, 4))):
        for bits in bitlist:
            r = dict(d=d, rotation=rot, variant=variant, bits=bits)
            for search in (False, True):
                c = TurboQuantCodec(d, bits, variant=variant, rotation=rot, search=search)
                codes = c.encode(x); xh = c.decode(codes)
                mse = float(((xh - x) ** 2).sum(1).mean())
                cos = float(((xh * x).sum(1) / np.linalg.norm(xh, axis=1)).mean())
                est = np.einsum("ij,ij->i", q, xh) if variant == "mse" else np.concatenate([np.diag(c.inner_products(q[i:i+1000], codes[i:i+1000])) for i in range(0, len(q), 1000)])
                err = est - np.einsum("ij,ij->i", q, x)
                r[f"mse_{search}"] = mse; r[f"cos_{search}"] = cos; r[f"ip_var_{search}"] = float(err.var()); r[f"ip_bias_{search}"] = float(err.mean())
            r["mse_gain"] = 1 - r["mse_True"] / r["mse_False"]; r["ip_var_gain"] = 1 - r["ip_var_True"] / r["ip_var_False"]
            rows.append(r)
            print(f"d={d} {rot} {variant} b={bits}: mse {r['mse_False']:.5f} -> {r['mse_True']:.5f} ({100*r['mse_gain']:.1f}% lower); cos {r['cos_False']:.5f} -> {r['cos_True']:.5f}; ip var {r['ip_var_False']:.3e} -> {r['ip_var_True']:.3e} ({100*r['ip_var_gain']:.1f}%), bias {r['ip_bias_True']:+.1e}", flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
