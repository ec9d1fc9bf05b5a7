"""ATP's state in a training checkpoint (`checkpoint-N/atp_state.pt`), written atomically, read strictly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from axolotl_atp.atomic_files import AtomicWriteError, write_file_atomically

STATE_FILE = "atp_state.pt"
# The HF Trainer writes this last when it saves a checkpoint: without it the save was interrupted.
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"


class ATPStateError(RuntimeError):
    """A checkpoint's ATP state is missing or unreadable."""


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    """The HF Trainer's checkpoint folder of optimizer step `step`."""
    return output_dir / f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_step(checkpoint: Path) -> int | None:
    """The step of a `checkpoint-N` folder, or None for any other name."""
    suffix = checkpoint.name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if checkpoint.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def save_state(state: dict[str, Any], checkpoint: Path) -> None:
    """Write through a temporary file and a rename: a crash mid-save leaves no half-written state."""
    try:
        write_file_atomically(checkpoint / STATE_FILE, lambda tmp: torch.save(state, tmp))
    except AtomicWriteError as err:  # torch.save reports a full disk as a RuntimeError
        cause, free = err.cause, err.free_bytes
        where = f"; {free / 2**20:.1f} MiB free there" if free is not None else ""
        raise ATPStateError(
            f"could not write {checkpoint / STATE_FILE} ({cause}{where}).{' The disk is full.' if err.disk_full else ''} "
            "Fix: free space or set `output_dir` on a disk with room; the run can resume from its last complete "
            "checkpoint."
        ) from cause


def is_complete(checkpoint: Path) -> bool:
    """Whether a checkpoint's save finished: the trainer's state (written last) and ATP's are both there."""
    return (checkpoint / TRAINER_STATE_FILE).is_file() and (checkpoint / STATE_FILE).is_file()


def checkpoints(output_dir: Path) -> list[Path]:
    """`checkpoint-N` folders of a run, by step."""
    found = [p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def last_complete_checkpoint(output_dir: Path) -> tuple[Path | None, list[Path]]:
    """The newest complete checkpoint, and the newer ones whose save was interrupted."""
    found = checkpoints(output_dir)
    skipped: list[Path] = []
    for checkpoint in reversed(found):
        if is_complete(checkpoint):
            return checkpoint, skipped
        skipped.append(checkpoint)
    return None, skipped


def load_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / STATE_FILE
    if not path.is_file():
        raise ATPStateError(
            f"{checkpoint} has no {STATE_FILE}: the checkpoint was written without ATP state (or its save was "
            "interrupted). Resuming would restart the pruning-decision generator and change the decision. Fix: "
            f"resume from an earlier checkpoint that has the file{_earlier(checkpoint)}, or start the run again."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or corrupt file surfaces as many error types
        raise ATPStateError(
            f"{path} is corrupt ({type(err).__name__}: {err}). Fix: resume from an earlier checkpoint."
        ) from err


def _earlier(checkpoint: Path) -> str:
    step = checkpoint_step(checkpoint)
    if step is None:
        return ""
    earlier = [c for c in checkpoints(checkpoint.parent) if checkpoint_step(c) < step and is_complete(c)]
    return f" (the newest is {earlier[-1]})" if earlier else ""
