"""The tqindex command: build, search, info."""

import json

import numpy as np

from conftest import unit_rows
from tqindex import TurboQuantIndex
from tqindex.cli import main
from tqindex.datasets import write_hdf5


def test_build_search_info_on_npy_files(tmp_path, capsys):
    x, q = unit_rows(500, 32, seed=1), unit_rows(7, 32, seed=2)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "q.npy", q)
    main(["build", str(tmp_path / "x.npy"), str(tmp_path / "idx"), "--bits", "3", "--no-progress"])
    main(["search", str(tmp_path / "idx"), str(tmp_path / "q.npy"), "-k", "5", "--out", str(tmp_path / "r.npz")])
    result = np.load(tmp_path / "r.npz")
    expected = TurboQuantIndex(32, 3)
    expected.add(x)
    assert np.array_equal(result["ids"], expected.search(q, 5)[1])
    capsys.readouterr()
    main(["info", str(tmp_path / "idx")])
    info = json.loads(capsys.readouterr().out)
    assert info["ntotal"] == 500 and info["codec"]["bits"] == 3.0 and info["bytes_per_vector"] == 16


def test_search_reports_recall_for_an_annbenchmarks_file(tmp_path, capsys):
    x, q = unit_rows(400, 16, seed=3), unit_rows(20, 16, seed=4)
    write_hdf5(tmp_path / "d.hdf5", x, q, distance="angular", k=10, progress=False)
    main(["build", str(tmp_path / "d.hdf5"), str(tmp_path / "idx"), "--bits", "8", "--metric", "cosine", "--no-progress"])
    capsys.readouterr()
    main(["search", str(tmp_path / "idx"), str(tmp_path / "d.hdf5"), "-k", "10"])
    recall = float(capsys.readouterr().out.split("10-recall@10:")[1])
    assert recall > 0.9
