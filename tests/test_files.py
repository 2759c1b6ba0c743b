"""Atomic output files: all or nothing, with the permissions an ordinary file would get."""

from __future__ import annotations

import os

import pytest

from vlm_interp.files import atomic_path, atomic_write


def test_atomic_write_uses_the_umask_and_keeps_the_old_file_on_errors(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "out.txt", "first")
        assert (path.stat().st_mode & 0o777) == 0o644
        with pytest.raises(RuntimeError):
            with atomic_path(path) as tmp:
                tmp.write_text("half")
                raise RuntimeError("interrupted")
        assert path.read_text() == "first"
        assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temporary file left behind
    finally:
        os.umask(old)
