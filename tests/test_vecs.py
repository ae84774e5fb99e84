"""TEXMEX .fvecs / .ivecs / .bvecs: byte layout, round trips, refusal of corrupt files."""

import numpy as np
import pytest

from tqindex.datasets import read_vecs, write_vecs


def _texmex_bytes(rows, value_dtype) -> bytes:
    """The format written by hand: per row, int32 dim then the values."""
    return b"".join(np.int32(len(r)).tobytes() + np.asarray(r, dtype=value_dtype).tobytes() for r in rows)


@pytest.mark.parametrize(
    "suffix, dtype, values",
    [
        (".fvecs", "<f4", lambda rng: rng.standard_normal((37, 5))),
        (".ivecs", "<i4", lambda rng: rng.integers(-(2**31), 2**31 - 1, (37, 5))),
        (".bvecs", "u1", lambda rng: rng.integers(0, 256, (37, 5))),
    ],
)
@pytest.mark.parametrize("mmap", [True, False])
def test_write_matches_the_texmex_layout_and_reads_back(tmp_path, rng, suffix, dtype, values, mmap):
    array = values(rng).astype(dtype)
    path = write_vecs(tmp_path / f"a{suffix}", array)
    assert path.read_bytes() == _texmex_bytes(array, dtype)
    back = read_vecs(path, mmap=mmap)
    assert back.shape == (37, 5) and back.dtype == np.dtype(dtype)
    assert np.array_equal(back, array)
    if not mmap:
        assert back.flags["C_CONTIGUOUS"] and back.flags["WRITEABLE"]
    else:
        assert not back.flags["WRITEABLE"]  # a read-only view of the file


def test_reads_a_hand_written_file_and_float64_input_is_stored_as_float32(tmp_path):
    (tmp_path / "h.fvecs").write_bytes(_texmex_bytes([[1.5, -2.0, 3.25], [0.0, 4.0, -1.0]], "<f4"))
    assert read_vecs(tmp_path / "h.fvecs").tolist() == [[1.5, -2.0, 3.25], [0.0, 4.0, -1.0]]
    write_vecs(tmp_path / "d.fvecs", np.array([[0.1, 0.2]], dtype=np.float64))
    assert (tmp_path / "d.fvecs").stat().st_size == 4 + 2 * 4
    assert read_vecs(tmp_path / "d.fvecs")[0, 0] == np.float32(0.1)


def test_empty_file_has_no_vectors(tmp_path):
    (tmp_path / "e.fvecs").write_bytes(b"")
    assert read_vecs(tmp_path / "e.fvecs").shape == (0, 0)


@pytest.mark.parametrize(
    "content, message",
    [
        (_texmex_bytes([[1, 2, 3], [4, 5, 6]], "<f4")[:-1], "not a whole number of 16-byte records"),
        (b"\x03\x00", "too short"),
        (_texmex_bytes([[1, 2, 3], [4, 5, 6]], "<f4") + _texmex_bytes([[1.0] * 3], "<f4")[:4], "not a whole number"),
        (_texmex_bytes([[1, 2], [3, 4, 5], [6]], "<f4"), "record 1 has dimension 3, but the first has 2"),
        (np.int32(0).tobytes() * 4, "dimension is 0"),
        (np.int32(-5).tobytes() * 4, "dimension is -5"),
    ],
    ids=["truncated", "shorter-than-a-dim", "trailing-bytes", "inconsistent-dims", "zero-dim", "negative-dim"],
)
def test_corrupt_files_are_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.fvecs"
    path.write_bytes(content)
    for mmap in (True, False):
        with pytest.raises(ValueError, match=message) as error:
            read_vecs(path, mmap=mmap)
        assert str(path) in str(error.value)


def test_inconsistent_dims_are_found_past_the_first_records(tmp_path):
    rows = np.ones((1000, 4), dtype=np.float32)
    data = bytearray(_texmex_bytes(rows, "<f4"))
    data[777 * 20 : 777 * 20 + 4] = np.int32(5).tobytes()  # same size, one record's dim wrong
    (tmp_path / "x.fvecs").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="record 777 has dimension 5"):
        read_vecs(tmp_path / "x.fvecs")


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="suffix picks the format"):
        read_vecs(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError):
        read_vecs(tmp_path / "missing.fvecs")
    with pytest.raises(ValueError, match="outside"):
        write_vecs(tmp_path / "b.bvecs", np.array([[0, 256]]))
    with pytest.raises(ValueError, match="outside"):
        write_vecs(tmp_path / "b.bvecs", np.array([[-1, 3]]))
    with pytest.raises(ValueError, match="holds integers"):
        write_vecs(tmp_path / "i.ivecs", np.array([[0.5]]))
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        write_vecs(tmp_path / "v.fvecs", np.zeros(3))
    assert not list(tmp_path.iterdir())  # nothing half-written
