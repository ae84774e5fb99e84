"""Encode throughput, tqindex codec with and without code search, interleaved; FAISS SQtqmse for reference."""
import json, sys, time, os
import numpy as np, torch, faiss
ROOT = __import__('pathlib').Path(__file__).resolve().parents[3]; sys.path.insert(0, str(ROOT))
from tqindex.codec import TurboQuantCodec
torch.set_num_threads(2); faiss.omp_set_num_threads(2)
n = 50000
out = []
for d in (128, 384):
    x = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
    for variant in ("mse", "prod"):
        for bits in (2, 3, 4):
            codecs = {s: TurboQuantCodec(d, bits, variant=variant, search=s) for s in (False, True)}
            spec = f"L2norm,RR,SQtqmse{bits}" if variant == "mse" else f"RR,SQtq{bits}"
            for c in codecs.values(): c.encode(x[:1000])
            times = {False: [], True: [], "faiss": []}
            for rep in range(5):
                for s, c in codecs.items():
                    t = time.perf_counter(); c.encode(x); times[s].append(time.perf_counter() - t)
                if d == 384:
                    index = faiss.index_factory(d, spec); index.train(x[:1000])
                    t = time.perf_counter(); index.add(x); times["faiss"].append(time.perf_counter() - t)
            r = dict(d=d, variant=variant, bits=bits, plain=n / np.median(times[False]), search=n / np.median(times[True]),
                     faiss=n / np.median(times["faiss"]) if times["faiss"] else None, load=os.getloadavg()[0])
            out.append(r)
            print(f"d={d} {variant} b={bits}: plain {r['plain']:,.0f} vec/s, search {r['search']:,.0f} vec/s (x{r['plain']/r['search']:.2f} slower)"
                  + (f", faiss {r['faiss']:,.0f}" if r['faiss'] else "") + f"  load {r['load']:.1f}", flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
