"""ATP's state in a checkpoint (`training/checkpoint_state.py`)."""

from __future__ import annotations

import pytest


def test_atp_state_write_error_names_the_file_and_fix(tmp_path, monkeypatch):
    """The full-disk path without a real small disk: an ENOSPC from the writer."""
    import errno

    from axolotl_atp.training import checkpoint_state as state_module

    def no_space(obj, path):
        open(path, "wb").close()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_module.torch, "save", no_space)
    with pytest.raises(state_module.ATPStateError, match=r"No space left on device.*The disk is full\. Fix"):
        state_module.save_state({"x": 1}, tmp_path / "checkpoint-1")
    assert list((tmp_path / "checkpoint-1").iterdir()) == []


def test_checkpoint_folders_are_named_and_parsed_in_one_place(tmp_path):
    from axolotl_atp.training.checkpoint_state import checkpoint_dir, checkpoint_step, checkpoints

    assert checkpoint_dir(tmp_path, 12) == tmp_path / "checkpoint-12"
    assert checkpoint_step(tmp_path / "checkpoint-12") == 12
    assert checkpoint_step(tmp_path / "checkpoint-final") is None
    assert checkpoint_step(tmp_path / "my-checkpoint-3") is None
    for name in ("checkpoint-10", "checkpoint-9", "checkpoint-x", "other-2"):
        (tmp_path / name).mkdir()
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10"]
