"""The study script's scratch folders: one a killed run left is cleaned, anything else at that
path (the user's) is refused and left as it was."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from ar_vs_diffusion import STUDY_MARKER, fresh_tmp  # noqa: E402


def test_a_scratch_folder_of_a_killed_run_is_cleaned_and_a_foreign_one_is_refused(tmp_path):
    debris = fresh_tmp(tmp_path / ".data.tmp")
    (debris / "half-written.txt").write_text("x")
    again = fresh_tmp(tmp_path / ".data.tmp")  # a killed run's debris: cleaned
    assert sorted(p.name for p in again.iterdir()) == [STUDY_MARKER]

    theirs = tmp_path / ".init.tmp"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not made by this study"):
        fresh_tmp(theirs)
    assert (theirs / "notes.txt").read_text() == "mine"

    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / STUDY_MARKER).write_text("")
    (tmp_path / ".tokenizer.tmp").symlink_to(target)
    with pytest.raises(SystemExit):
        fresh_tmp(tmp_path / ".tokenizer.tmp")
    assert target.is_dir() and (target / STUDY_MARKER).exists()
