"""The run's files: one atomic write for all of them."""

import os

import pytest

from lorasb_ds.files import atomic_write, atomic_write_text, read_marker, write_marker


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "run_summary.json"
    atomic_write_text("old\n", str(path))

    def half_then_crash(tmp):
        with open(tmp, "w") as f:
            f.write("ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(str(path), half_then_crash)
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["run_summary.json"]


def test_marker_round_trip(tmp_path):
    write_marker(str(tmp_path), {"step": 40, "epoch": 1, "init_file": "/x/lorasb_init.safetensors"})
    assert read_marker(str(tmp_path)) == {"step": 40, "epoch": 1, "init_file": "/x/lorasb_init.safetensors"}
    assert os.listdir(tmp_path) == ["COMPLETE"]
