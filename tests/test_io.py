"""Atomic writers: the CSV writer's cells and header, the files' mode."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cifarlab.io import write_csv, write_text


def test_write_csv_leaves_none_and_missing_cells_empty(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "sub" / "rows.csv", [{"a": 1.5, "b": None}, {"a": 2}], ["a", "b"])
    assert path.read_text() == "a,b\n1.5,\n2,\n"
    assert [p.name for p in path.parent.iterdir()] == ["rows.csv"]  # no temporary file left behind


def test_write_csv_refuses_a_key_outside_the_columns(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_csv(tmp_path / "rows.csv", [{"a": 1, "c": 2}], ["a", "b"])
    assert not (tmp_path / "rows.csv").exists()


def test_written_files_get_the_ordinary_mode_not_mkstemps_private_one(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        written = write_text(tmp_path / "report.md", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(written.stat().st_mode) == 0o644
