"""Whole-or-nothing writes (`atomic_files.py`): a failed write leaves the old file and no temporary one."""

from __future__ import annotations

import errno

import pytest

from axolotl_atp.atomic_files import (
    AtomicWriteError,
    is_disk_full,
    replace_folder,
    write_file_atomically,
    write_json_atomically,
)


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    target = tmp_path / "state.json"
    write_json_atomically({"step": 1}, target)

    def half_then_full(tmp):
        tmp.write_text('{"step": 2, "half')
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(AtomicWriteError, match=r"could not write .*state.json") as caught:
        write_file_atomically(target, half_then_full)
    assert caught.value.disk_full and caught.value.free_bytes is not None
    assert target.read_text() == '{\n "step": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_an_interruption_is_not_wrapped_and_leaves_nothing(tmp_path):
    def interrupted(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_file_atomically(tmp_path / "a.json", interrupted)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_detection():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(RuntimeError("safetensors: StorageFull"))
    assert is_disk_full(RuntimeError("PytorchStreamWriter failed writing file"), free=1000)
    assert not is_disk_full(RuntimeError("PytorchStreamWriter failed writing file"), free=2**30)
    assert not is_disk_full(ValueError("bad value"))


def test_replace_folder_swaps_a_finished_folder_into_place(tmp_path):
    final, finished = tmp_path / "export", tmp_path / ".export.tmp"
    final.mkdir()
    (final / "old.txt").write_text("old")
    finished.mkdir()
    (finished / "new.txt").write_text("new")
    replace_folder(finished, final)
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    replace_folder(tmp_path / "export", tmp_path / "moved")  # no existing target
    assert (tmp_path / "moved" / "new.txt").read_text() == "new"
