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


def test_check_writable_folder_accepts_new_nested_folders_and_names_a_file_in_the_way(tmp_path: Path):
    from cifarlab.errors import CifarlabError
    from cifarlab.io import check_writable_folder

    check_writable_folder(tmp_path, what="run folder")  # exists
    check_writable_folder(tmp_path / "a" / "b" / "c", what="run folder")  # would be made
    assert not (tmp_path / "a").exists()  # checking makes nothing
    blocker = tmp_path / "results"
    blocker.write_text("")
    with pytest.raises(CifarlabError, match=f"cannot write the run folder {blocker / 'x'}: {blocker} is a file"):
        check_writable_folder(blocker / "x", what="run folder")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=stat.S_IRUSR | stat.S_IXUSR)
        with pytest.raises(CifarlabError, match=f"no permission to write in {locked}"):
            check_writable_folder(locked / "run", what="run folder")
