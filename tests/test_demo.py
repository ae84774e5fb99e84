"""The main job's demo (scripts/demo.sh): its rows, the timed exact row, and which dataset it uses."""

import math

import numpy as np
import pytest

from conftest import unit_rows
from tqindex import demo
from tqindex.datasets import write_hdf5

SMALL = ["--n", "1000", "--queries", "20", "--dim", "16", "--threads", "1", "--no-progress"]


def table(out: str) -> dict[str, list[str]]:
    """The demo's Markdown rows by method name: [bytes/vector, build s, recall, QPS]."""
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_rows_for_exact_tqindex_and_every_faiss_method(monkeypatch, capsys):
    pytest.importorskip("faiss")
    demo.main(["--dataset", "synthetic", "--bits", "2", "2.5", *SMALL])
    rows = table(capsys.readouterr().out)
    assert set(rows) == {
        "exact float32 (brute force)",
        "tqindex 2-bit", "faiss RR,SQtqmse2", "faiss RaBitQ2",
        "faiss PQ4np (PQ)", "faiss PQ8x4fs (PQ fast scan)",  # 2 bits x 16 dims: 4 bytes, 8 nibbles
        # 2.5 bits: 5 PQ bytes or 10 nibbles, after a rotation into 20 dims; no SQtqmse or RaBitQ at fractional bits
        "tqindex 2.5-bit", "faiss RR20,PQ5np (PQ)", "faiss RR20,PQ10x4fs (PQ fast scan)",
    }
    exact = rows["exact float32 (brute force)"]
    assert exact[2] == "1.000" and math.isfinite(float(exact[3].replace(",", ""))) and float(exact[3].replace(",", "")) > 0
    for name, cells in rows.items():
        assert 0.2 < float(cells[2]) <= 1.0, name
    assert int(rows["faiss PQ4np (PQ)"][0]) == 4 and int(rows["tqindex 2-bit"][0]) == 16 * 2 // 8 + 4


def test_auto_says_how_to_build_the_wordnet_set_and_falls_back(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(demo, "WORDNET_PATH", tmp_path / "missing.hdf5")
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # exact and tqindex rows only: fast
    demo.main(["--bits", "3", *SMALL])
    out = capsys.readouterr().out
    assert "not built" in out and "python -m tqindex.datasets" in out and "synthetic" in out
    assert set(table(out)) == {"exact float32 (brute force)", "tqindex 3-bit"}


def test_auto_uses_the_wordnet_set_where_it_is_built(monkeypatch, tmp_path, capsys):
    x, q = unit_rows(300, 16, seed=1), unit_rows(12, 16, seed=2)
    monkeypatch.setattr(demo, "WORDNET_PATH", write_hdf5(tmp_path / "wordnet.hdf5", x, q, distance="angular", k=10, progress=False))
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)
    demo.main(["--bits", "4", "--no-progress"])
    out = capsys.readouterr().out
    assert "WordNet" in out and "300 vectors, d=16, 12 queries" in out and "not built" not in out


def test_euclidean_file_runs_with_l2(tmp_path, capsys):
    rng = np.random.default_rng(3)
    x, q = (rng.standard_normal((400, 16)) + 3).astype(np.float32), (rng.standard_normal((10, 16)) + 3).astype(np.float32)
    path = write_hdf5(tmp_path / "e.hdf5", x, q, distance="euclidean", k=10, progress=False)
    demo.main(["--dataset", str(path), "--bits", "8", "--no-progress"])
    rows = table(capsys.readouterr().out)
    assert rows["exact float32 (brute force)"][2] == "1.000" and float(rows["tqindex 8-bit"][2]) >= 0.9
