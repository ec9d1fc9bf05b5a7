"""ATP's state in a training checkpoint (`checkpoint-N/atp_state.pt`), written atomically, read strictly."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "atp_state.pt"


class ATPStateError(RuntimeError):
    """A checkpoint's ATP state is missing or unreadable."""


def save_state(state: dict[str, Any], checkpoint: Path) -> None:
    """Write through a temporary file and a rename: a crash mid-save leaves no half-written state."""
    checkpoint.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint / f".{STATE_FILE}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, checkpoint / STATE_FILE)


def load_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / STATE_FILE
    if not path.is_file():
        raise ATPStateError(
            f"{checkpoint} has no {STATE_FILE}: the checkpoint was written without ATP state (or its save was "
            "interrupted). Resuming would restart the pruning-decision generator and change the decision. Fix: "
            "resume from an earlier checkpoint that has the file, or start the run again."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or corrupt file surfaces as many error types
        raise ATPStateError(
            f"{path} is corrupt ({type(err).__name__}: {err}). Fix: resume from an earlier checkpoint."
        ) from err
