"""Atomic files and folders, result tables, figures."""

from __future__ import annotations

import json
import os

import pytest

from testtime.io import (
    COMPLETE_MARKER,
    atomic_folder,
    atomic_write_text,
    format_table,
    new_figure,
    save_figure,
    write_results,
)


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / "sub" / "data.txt"
    atomic_write_text(path, "first\n")
    assert path.read_text() == "first\n"
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # as open() would create it, not mkstemp's 0600

    def broken(f):
        f.write("half")
        raise RuntimeError("crash midway")

    from testtime.io import atomic_write

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_text() == "first\n"  # never a half-written file
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.txt"]  # no temporary left behind


def test_atomic_folder_builds_once_and_never_trusts_a_half_folder(tmp_path):
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "weights.bin").write_text("ok")

    target = tmp_path / "model"
    assert atomic_folder(target, build) == target and (target / COMPLETE_MARKER).is_file()
    atomic_folder(target, build)
    assert len(calls) == 1  # complete: reused
    (target / COMPLETE_MARKER).unlink()  # a crash before the marker was written
    atomic_folder(target, build)
    assert len(calls) == 2 and (target / "weights.bin").read_text() == "ok"
    with pytest.raises(ValueError):
        atomic_folder(tmp_path / "bad", lambda folder: (_ for _ in ()).throw(ValueError("no")))
    assert not (tmp_path / "bad").exists()


def test_format_table_standard_errors():
    lines = format_table({"greedy": 0.5, "sample_T1_p1": 1.0}, 100).splitlines()
    assert lines[0] == "| decoding | accuracy (n=100) | ± s.e. |"
    assert "| greedy | 0.500 | 0.050 |" in lines  # sqrt(0.5 * 0.5 / 100)
    assert "| sample_T1_p1 | 1.000 | 0.000 |" in lines


def test_write_results_and_figures(tmp_path):
    paths = write_results(tmp_path, "test_results", "| a |", {"results": {"greedy": 0.25}, "n": 4})
    assert [p.name for p in paths] == ["test_results.md", "test_results.json"]
    assert (tmp_path / "test_results.md").read_text() == "| a |\n"
    assert json.loads((tmp_path / "test_results.json").read_text()) == {"results": {"greedy": 0.25}, "n": 4}
    fig, axes = new_figure(2, 3)
    assert len(axes) == 3
    axes[0].plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "fig.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
