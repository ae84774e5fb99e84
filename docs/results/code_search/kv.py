"""Attention fidelity on MiniLM (head_dim 32) with and without code search (kv_fidelity.py's measure)."""
import functools, json, random, sys
import torch
ROOT = __import__('pathlib').Path(__file__).resolve().parents[3]; sys.path[:0] = [str(ROOT), str(ROOT / 'benchmarks')]
import kv_fidelity as kf
from tqindex.kv import TurboQuantCache
torch.set_num_threads(2)
tok, model = kf.load_model()
texts = kf.sample_passages(8 * 24, 0)
long_texts = [" ".join(texts[8 * i : 8 * i + 8]) for i in range(24)]
captured = kf.capture_qkv(tok, model, long_texts)
head_dim = captured[0][0][1].shape[-1]
rows = []
for bits in (2.5, 3, 3.5, 4, 5):
    for search in (False, True):
        kf.TurboQuantCache = functools.partial(TurboQuantCache, search=search)
        m = kf.turboquant(bits, head_dim, "mse")
        r = kf.attention_fidelity(m, captured)
        r.update(bits=bits, search=search, name=m.name); rows.append(r)
        print(bits, search, {k: round(v, 5) for k, v in r.items() if isinstance(v, float)}, flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
