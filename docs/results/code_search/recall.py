"""10-recall@10 on WordNet/MiniLM with and without code search."""
import json, sys, time
import numpy as np, torch
ROOT = __import__('pathlib').Path(__file__).resolve().parents[3]; sys.path.insert(0, str(ROOT))
from tqindex import TurboQuantIndex
from tqindex.datasets import read_hdf5
from tqindex.datasets.groundtruth import recall_at
torch.set_num_threads(2)
ds = read_hdf5("results/data/wordnet-minilm-384-ip.hdf5", progress=False)
out = []
configs = [(b, "mse") for b in (2, 3, 4)] + [(3, "prod")] + [(b, "mse") for b in (2.5, 3.5)]
for bits, variant in configs:
    for search in (False, True):
        rs = []
        for seed in (0, 1, 2):
            index = TurboQuantIndex(ds.train.shape[1], bits, variant=variant, seed=seed, search=search)
            t = time.perf_counter(); index.add(ds.train); build = time.perf_counter() - t
            _, ids = index.search(ds.test, 10)
            r = recall_at(ds.neighbors, np.asarray(ids), 10)
            rs.append(r)
            out.append(dict(bits=bits, variant=variant, search=search, seed=seed, recall=r, build_s=build))
        print(bits, variant, search, np.round(rs, 4), "mean %.4f" % np.mean(rs), "build %.2fs" % build, flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
