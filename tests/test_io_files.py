"""mixtral.io.files: atomic writes leave the whole new file, or the old one, never a part or a temporary."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mixtral.io import files


def _only(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_write_helpers_write_whole_files(tmp_path):
    files.write_text(tmp_path / "a.txt", "héllo\n")
    files.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    files.write_json(tmp_path / "c.json", {"x": [1, 2]})
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2]}
    assert _only(tmp_path) == ["a.txt", "b.bin", "c.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "result.json"
    files.write_json(path, {"old": True})
    with pytest.raises(RuntimeError):
        with files.atomic_open(path, "w") as f:
            f.write('{"new": ')
            raise RuntimeError("interrupted")
    assert json.loads(path.read_text()) == {"old": True}
    assert _only(tmp_path) == ["result.json"]


def test_atomic_path_keeps_the_suffix_for_tools_that_pick_a_format_by_it(tmp_path):
    with files.atomic_path(tmp_path / "arrays.npz") as tmp:
        assert tmp.suffix == ".npz" and tmp.parent == tmp_path and tmp.name.startswith(".")
        np.savez(tmp, a=np.arange(3))  # numpy would append ".npz" to a name without it
    assert np.load(tmp_path / "arrays.npz")["a"].tolist() == [0, 1, 2]
    assert _only(tmp_path) == ["arrays.npz"]


def test_atomic_directory_replaces_the_old_directory_as_a_whole(tmp_path):
    out = tmp_path / "ckpt"
    with files.atomic_directory(out) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(ValueError):
        with files.atomic_directory(out) as tmp:
            (tmp / "weights").write_text("v2, half written")
            raise ValueError("killed")
    assert _only(out) == ["weights"] and (out / "weights").read_text() == "v1"
    with files.atomic_directory(out) as tmp:
        (tmp / "weights").write_text("v2")
        (tmp / "extra").write_text("x")
    assert _only(out) == ["extra", "weights"] and (out / "weights").read_text() == "v2"
    assert _only(tmp_path) == ["ckpt"]  # no temporary or old directory left beside it


def test_atomic_directory_can_refuse_to_replace(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        with files.atomic_directory(tmp_path / "out", replace=False) as tmp:
            (tmp / "f").write_text("x")
    assert _only(tmp_path) == ["out"] and _only(tmp_path / "out") == []


def test_written_files_and_directories_get_the_umasks_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with files.atomic_open(tmp_path / "a.txt", "w") as f:
            f.write("x")
        with files.atomic_directory(tmp_path / "d") as d:
            (d / "inner").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
