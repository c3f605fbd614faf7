"""Atomic writes: complete or absent, normal permissions, no temporary files left behind."""

from __future__ import annotations

import os
import stat

import pytest

from pipeline.core.io import atomic_write_bytes, atomic_write_json


def test_atomic_write_bytes_replaces_whole_files_with_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "a.png"
    assert atomic_write_bytes(target, b"first") == target
    atomic_write_bytes(target, bytes(range(256)) * 4000)  # larger than one write may take
    assert target.read_bytes() == bytes(range(256)) * 4000
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["a.png"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "r.json"
    atomic_write_json(target, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_bytes(target, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        atomic_write_json(target, {"bad": float("nan")})
    assert target.read_text() == '{\n  "ok": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
