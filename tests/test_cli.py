"""The tqindex command: build, search, info, verify, bench; progress, --quiet, exit codes, one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import unit_rows
from tqindex import TurboQuantIndex, __version__
from tqindex.cli import main
from tqindex.datasets import exact_knn, recall_at, write_hdf5, write_vecs


def _one_error_line(capsys, *needles: str) -> str:
    """The single stderr line of a failed command, checked for its prefix and ``needles``."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("tqindex: error: ") and "Traceback" not in captured.err
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


@pytest.fixture
def files(tmp_path):
    """x (600, 32) as .npy and .fvecs, queries (9, 32) as .npy and .fvecs, true top-10 as .ivecs."""
    x, q = unit_rows(600, 32, seed=1), unit_rows(9, 32, seed=2)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "q.npy", q)
    write_vecs(tmp_path / "x.fvecs", x)
    write_vecs(tmp_path / "q.fvecs", q)
    write_vecs(tmp_path / "truth.ivecs", exact_knn(x, q, 10, "ip", progress=False)[1])
    return tmp_path, x, q


def test_build_in_batches_search_and_info_on_npy_files(files, capsys):
    tmp, x, q = files
    assert main(["build", str(tmp / "x.npy"), "--out", str(tmp / "idx"), "--bits", "3", "--batch", "128"]) == 0
    assert "600 vectors (d=32, 3 bits, ip), 16 bytes each" in capsys.readouterr().out
    assert main(["search", str(tmp / "idx"), "--queries", str(tmp / "q.npy"), "-k", "5", "--out", str(tmp / "r.npz")]) == 0
    out = capsys.readouterr().out
    assert "9 queries, k=5" in out and "QPS" in out and "recall" not in out  # no ground truth given
    expected = TurboQuantIndex(32, 3)
    expected.add(x)  # in one go: adding in batches of 128 must give the same index
    scores, ids = expected.search(q, 5)
    result = np.load(tmp / "r.npz")
    assert np.array_equal(result["ids"], ids) and np.allclose(result["scores"], scores, atol=1e-5)
    assert main(["info", str(tmp / "idx")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ntotal"] == 600 and info["dim"] == 32 and info["metric"] == "ip"
    assert info["codec"]["bits"] == 3.0 and info["bytes_per_vector"] == 16 and info["bytes_on_disk"] > 600 * 16


def test_fvecs_input_with_ivecs_truth_reports_recall_and_writes_ids(files, capsys):
    tmp, x, q = files
    assert main(["--quiet", "build", str(tmp / "x.fvecs"), "--out", str(tmp / "idx"), "--bits", "4", "--batch", "100"]) == 0
    args = ["search", str(tmp / "idx"), "--queries", str(tmp / "q.fvecs"), "--truth", str(tmp / "truth.ivecs")]
    assert main(args + ["--out", str(tmp / "ids.npy")]) == 0
    recall = float(capsys.readouterr().out.split("10-recall@10:")[1].split()[0])
    ids = np.load(tmp / "ids.npy")
    assert ids.shape == (9, 10)
    assert recall == pytest.approx(recall_at(exact_knn(x, q, 10, "ip", progress=False)[1], ids, 10), abs=1e-4)
    assert 0.6 < recall <= 1.0


def test_bvecs_input_is_read_as_vectors(tmp_path, capsys):
    codes = np.random.default_rng(0).integers(0, 256, (300, 16)).astype(np.uint8)
    write_vecs(tmp_path / "b.bvecs", codes)
    assert main(["build", str(tmp_path / "b.bvecs"), "--out", str(tmp_path / "idx"), "--bits", "8"]) == 0
    assert main(["search", str(tmp_path / "idx"), "--queries", str(tmp_path / "b.bvecs"), "-k", "1", "--out", str(tmp_path / "r.npy")]) == 0
    expected = TurboQuantIndex(16, 8)
    expected.add(codes.astype(np.float32))
    assert np.array_equal(np.load(tmp_path / "r.npy"), expected.search(codes.astype(np.float32), 1)[1])


def test_annbenchmarks_file_infers_cosine_and_reports_recall(tmp_path, capsys):
    x, q = unit_rows(400, 16, seed=3) * 3.0, unit_rows(20, 16, seed=4)  # not unit length: cosine matters
    write_hdf5(tmp_path / "d.hdf5", x, q, distance="angular", k=10, progress=False)
    assert main(["build", str(tmp_path / "d.hdf5"), "--out", str(tmp_path / "idx"), "--bits", "8"]) == 0
    assert "cosine" in capsys.readouterr().out
    assert main(["search", str(tmp_path / "idx"), "--queries", str(tmp_path / "d.hdf5"), "-k", "10"]) == 0
    assert float(capsys.readouterr().out.split("10-recall@10:")[1]) > 0.9
    assert main(["build", str(tmp_path / "d.hdf5"), "--out", str(tmp_path / "same"), "--metric", "cosine"]) == 0
    assert "cosine)" in capsys.readouterr().out


def test_euclidean_file_builds_an_l2_index_and_reports_recall(tmp_path, capsys):
    rng = np.random.default_rng(7)
    x, q = (rng.standard_normal((500, 16)) * 2 + 3).astype(np.float32), (rng.standard_normal((20, 16)) * 2 + 3).astype(np.float32)
    write_hdf5(tmp_path / "e.hdf5", x, q, distance="euclidean", k=10, progress=False)
    assert main(["-q", "build", str(tmp_path / "e.hdf5"), "--out", str(tmp_path / "idx"), "--bits", "8"]) == 0
    assert "l2)" in capsys.readouterr().out
    assert main(["-q", "search", str(tmp_path / "idx"), "--queries", str(tmp_path / "e.hdf5"), "--out", str(tmp_path / "r.npz")]) == 0
    assert float(capsys.readouterr().out.split("10-recall@10:")[1].split()[0]) >= 0.9
    scores = np.load(tmp_path / "r.npz")["scores"]
    assert np.all(np.diff(scores, axis=1) >= 0)  # squared distances, smallest first


@pytest.mark.parametrize(
    "build_distance,query_distance,needles",
    [
        ("angular", "dot", ["'dot'", "metric ip", "metric cosine"]),
        ("euclidean", "angular", ["'angular'", "metric cosine", "metric l2"]),
        ("dot", "euclidean", ["'euclidean'", "metric l2", "metric ip"]),
    ],
)
def test_search_refuses_a_query_file_of_another_distance(tmp_path, capsys, build_distance, query_distance, needles):
    x, q = unit_rows(200, 8, seed=8), unit_rows(5, 8, seed=9)
    write_hdf5(tmp_path / "b.hdf5", x, q, distance=build_distance, k=5, progress=False)
    write_hdf5(tmp_path / "q.hdf5", x, q, distance=query_distance, k=5, progress=False)
    assert main(["-q", "build", str(tmp_path / "b.hdf5"), "--out", str(tmp_path / "idx")]) == 0
    capsys.readouterr()
    assert main(["-q", "search", str(tmp_path / "idx"), "--queries", str(tmp_path / "q.hdf5"), "-k", "5"]) == 1
    _one_error_line(capsys, "q.hdf5", *needles)
    assert main(["-q", "search", str(tmp_path / "idx"), "--queries", str(tmp_path / "b.hdf5"), "-k", "5"]) == 0


def test_build_refuses_a_metric_the_file_distance_contradicts_or_an_unknown_distance(tmp_path, capsys):
    import h5py

    x, q = unit_rows(50, 8, seed=10), unit_rows(3, 8, seed=11)
    write_hdf5(tmp_path / "e.hdf5", x, q, distance="euclidean", k=5, progress=False)
    assert main(["-q", "build", str(tmp_path / "e.hdf5"), "--out", str(tmp_path / "idx"), "--metric", "ip"]) == 1
    _one_error_line(capsys, "e.hdf5", "'euclidean'", "--metric l2", "not ip")
    with h5py.File(tmp_path / "e.hdf5", "r+") as f:
        f.attrs["distance"] = "hamming"
    assert main(["-q", "build", str(tmp_path / "e.hdf5"), "--out", str(tmp_path / "idx")]) == 1
    _one_error_line(capsys, "e.hdf5", "'hamming'", "not supported")
    assert not (tmp_path / "idx").exists()


def test_verify_passes_then_names_a_damaged_column_file(files, capsys):
    tmp, _, _ = files
    assert main(["build", str(tmp / "x.npy"), "--out", str(tmp / "idx")]) == 0
    capsys.readouterr()
    assert main(["verify", str(tmp / "idx")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ntotal"] == 600
    column = tmp / "idx" / "codes.col"
    data = bytearray(column.read_bytes())
    data[len(data) // 2] ^= 0xFF
    column.write_bytes(bytes(data))
    assert main(["verify", str(tmp / "idx")]) == 1
    _one_error_line(capsys, "codes.col")


def test_progress_bar_on_a_terminal_and_quiet_turns_it_off(files, capsys, monkeypatch):
    tmp, _, _ = files
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["build", str(tmp / "x.npy"), "--out", str(tmp / "a"), "--batch", "200"]) == 0
    assert "600/600" in capsys.readouterr().err
    assert main(["build", str(tmp / "x.npy"), "--out", str(tmp / "b"), "--quiet"]) == 0  # --quiet after the command
    assert main(["-q", "search", str(tmp / "b"), "--queries", str(tmp / "q.npy")]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "QPS" in captured.out


def test_failed_build_leaves_nothing_behind(files, capsys):
    tmp, x, _ = files
    x = x.copy()
    x[450, 3] = np.nan  # found in the 4th batch of 128, after three were committed
    np.save(tmp / "nan.npy", x)
    assert main(["build", str(tmp / "nan.npy"), "--out", str(tmp / "idx"), "--batch", "128"]) == 1
    _one_error_line(capsys, "nan.npy", "row 450", "NaN")
    assert not (tmp / "idx").exists()
    (tmp / "empty").mkdir()
    assert main(["build", str(tmp / "nan.npy"), "--out", str(tmp / "empty"), "--batch", "128"]) == 1
    assert (tmp / "empty").is_dir() and not list((tmp / "empty").iterdir())


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["build", "{tmp}/missing.npy", "--out", "{tmp}/o"], ["missing.npy", "No such file"]),
        (["build", "{tmp}/x.txt", "--out", "{tmp}/o"], ["x.txt", "unknown file type"]),
        (["build", "{tmp}/bad.fvecs", "--out", "{tmp}/o"], ["bad.fvecs", "not a whole number"]),
        (["build", "{tmp}/bad.npy", "--out", "{tmp}/o"], ["bad.npy", "not a readable .npy"]),
        (["build", "{tmp}/ints1d.npy", "--out", "{tmp}/o"], ["ints1d.npy", "(n, d)"]),
        (["build", "{tmp}/x.npy", "--out", "{tmp}/o", "--bits", "9"], ["bits"]),
        (["build", "{tmp}/x.npy", "--out", "{tmp}/idx"], ["idx", "not empty", "give another --out"]),
        (["search", "{tmp}/nothing", "--queries", "{tmp}/q.npy"], ["nothing"]),
        (["search", "{tmp}/idx", "--queries", "{tmp}/q.npy", "-k", "601"], ["k=601"]),
        (["search", "{tmp}/idx", "--queries", "{tmp}/q16.npy"], ["shape"]),
        (["search", "{tmp}/idx", "--queries", "{tmp}/q.npy", "--truth", "{tmp}/x.fvecs"], ["x.fvecs", "ground truth"]),
        (["info", "{tmp}/x.npy"], ["x.npy"]),
        (["verify", "{tmp}/nothing"], ["nothing"]),
        (["bench", "no-such-dataset"], ["no-such-dataset"]),
    ],
)
def test_failures_exit_1_with_one_line(files, capsys, argv, needles):
    tmp, _, _ = files
    (tmp / "x.txt").write_text("1 2 3")
    (tmp / "bad.fvecs").write_bytes((tmp / "x.fvecs").read_bytes()[:-3])
    (tmp / "bad.npy").write_bytes(b"not numpy")
    np.save(tmp / "ints1d.npy", np.arange(5))
    np.save(tmp / "q16.npy", np.ones((3, 16), np.float32))
    assert main(["build", str(tmp / "x.npy"), "--out", str(tmp / "idx"), "--quiet"]) == 0
    capsys.readouterr()
    assert main([a.format(tmp=tmp) for a in argv]) == 1
    _one_error_line(capsys, *needles)
    assert not (tmp / "o").exists()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["build", "x.npy"],  # --out is required
        ["build", "x.npy", "--out", "o", "--metric", "euclidean"],
        ["build", "x.npy", "--out", "o", "--batch", "0"],
        ["search", "idx", "--queries", "q.npy", "-k", "0"],
        ["search", "idx", "--queries", "q.npy", "--out", "r.txt"],
        ["search", "idx"],  # --queries is required
        ["bench", "d.hdf5", "--bits"],
    ],
)
def test_usage_errors_exit_2(tmp_path, capsys, argv):
    assert main(argv) == 2
    assert "usage: tqindex" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_version_and_help_exit_0(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tqindex {__version__}"
    assert main(["--help"]) == 0
    help_text = capsys.readouterr().out
    assert all(command in help_text for command in ("build", "search", "info", "verify", "bench", "Exit status"))


def test_bench_prints_a_table_with_faiss_rows(capsys):
    pytest.importorskip("faiss")
    assert main(["-q", "bench", "synthetic-gaussian-32-angular-n2000-q50", "--bits", "2", "4", "--faiss"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    table = {(cells[0].strip(), float(cells[1])): cells for cells in rows[1:]}
    assert set(table) == {("tqindex", 2), ("tqindex", 4), ("faiss RR,SQtqmse2", 2), ("faiss RR,SQtqmse4", 4)}
    recall = {key: float(cells[4]) for key, cells in table.items()}
    assert 0.3 < recall[("tqindex", 2)] < recall[("tqindex", 4)] <= 1.0
    assert int(table[("tqindex", 4)][2]) == 32 * 4 // 8 + 4  # codes + one float32 factor


def test_bench_runs_euclidean_data_with_l2(tmp_path, capsys):
    rng = np.random.default_rng(5)
    x, q = (rng.standard_normal((300, 16)) + 2).astype(np.float32), (rng.standard_normal((10, 16)) + 2).astype(np.float32)
    write_hdf5(tmp_path / "e.hdf5", x, q, distance="euclidean", k=10, progress=False)
    assert main(["-q", "bench", str(tmp_path / "e.hdf5"), "--bits", "8"]) == 0
    out = capsys.readouterr().out
    assert "distance euclidean" in out and float(out.split("| tqindex | 8 |")[1].split("|")[2]) >= 0.9  # recall


def test_bench_skips_faiss_tqmse_on_raw_vectors(capsys):
    pytest.importorskip("faiss")
    assert main(["-q", "bench", "synthetic-gaussian-16-ip-raw-n500-q10", "--bits", "3", "--faiss"]) == 0
    out = capsys.readouterr().out
    assert "| tqindex | 3 |" in out and "| faiss" not in out and "not unit length" in out


def test_installed_entry_point_exit_codes(files):
    tmp, _, _ = files
    script = Path(sys.executable).parent / "tqindex"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "tqindex.cli"]
    built = subprocess.run(command + ["build", str(tmp / "x.npy"), "--out", str(tmp / "idx")], capture_output=True, text=True)
    assert built.returncode == 0 and "600 vectors" in built.stdout, built.stderr
    failed = subprocess.run(command + ["info", str(tmp / "nowhere")], capture_output=True, text=True)
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.count("\n") == 1 and failed.stderr.startswith("tqindex: error: ") and "nowhere" in failed.stderr


def test_a_closed_output_pipe_ends_the_command_silently(files):
    """`tqindex info DIR | head -1`: the reader goes away; no error line (it printed "Broken pipe")."""
    tmp, _, _ = files
    assert main(["-q", "build", str(tmp / "x.npy"), "--out", str(tmp / "idx")]) == 0
    process = subprocess.Popen([sys.executable, "-m", "tqindex.cli", "info", str(tmp / "idx")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # before it writes
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 141 and stderr == b""


@pytest.mark.parametrize("command", ["build", "search"])
def test_float64_values_beyond_float32_are_refused_naming_the_row(files, capsys, command):
    """A plain cast would make them inf; the file's row is named, as add/search name theirs."""
    tmp, x, q = files
    big = (x if command == "build" else q).astype(np.float64)
    big[7, 3] = -1e39
    np.save(tmp / "big.npy", big)
    if command == "build":
        argv = ["build", str(tmp / "big.npy"), "--out", str(tmp / "idx"), "--batch", "4"]
    else:
        assert main(["build", str(tmp / "x.npy"), "--out", str(tmp / "idx"), "--quiet"]) == 0
        argv = ["search", str(tmp / "idx"), "--queries", str(tmp / "big.npy")]
    capsys.readouterr()
    assert main(argv) == 1
    _one_error_line(capsys, "big.npy", "beyond the float32 range in row 7")
    assert command == "search" or not (tmp / "idx").exists()
