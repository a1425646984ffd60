import json

import numpy as np
import pytest

from shapeflow import fileio


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "a" / "out.npz"
    with pytest.raises(RuntimeError):
        with fileio.atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_atomic_writers_round_trip(tmp_path):
    fileio.save_npz(tmp_path / "x.npz", a=np.arange(5), b=np.eye(2, dtype=np.float32))
    with np.load(tmp_path / "x.npz") as z:
        np.testing.assert_array_equal(z["a"], np.arange(5))
        assert z["b"].dtype == np.float32
    fileio.write_json(tmp_path / "x.json", {"k": [1, 2]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"k": [1, 2]}
    fileio.write_text(tmp_path / "x.json", "replaced")
    assert (tmp_path / "x.json").read_text() == "replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "x.npz"]


def test_append_line(tmp_path):
    p = tmp_path / "m.jsonl"
    fileio.append_line(p, '{"a": 1}')
    fileio.append_line(p, '{"a": 2}')
    assert [json.loads(line)["a"] for line in p.read_text().splitlines()] == [1, 2]
    with pytest.raises(ValueError):
        fileio.append_line(p, "two\nlines")


def test_atomic_files_get_the_umask_mode(tmp_path):
    import os

    fileio.write_text(tmp_path / "f.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~mask
