"""atomic_dir: output appears whole or not at all; an existing folder is kept unless force."""

from __future__ import annotations

import pytest

from caprese.atomic_output import atomic_dir
from caprese.errors import CapreseError


def test_success_renames_into_place(tmp_path):
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("x")
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "out" / "a.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"12")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_existing_needs_force(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("old")
    with pytest.raises(CapreseError, match="already exists"):
        with atomic_dir(tmp_path / "out"):
            pass
    assert (tmp_path / "out" / "old").exists()
    with atomic_dir(tmp_path / "out", force=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new"]


def test_force_replaces_a_plain_file(tmp_path):
    (tmp_path / "out").write_text("a file in the way")
    with atomic_dir(tmp_path / "out", force=True) as tmp:
        (tmp / "new").write_text("new")
    assert (tmp_path / "out" / "new").exists()
