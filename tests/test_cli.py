"""`axolotl atp-merge` prints a user's error as one message, without a traceback, and exits non-zero."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from axolotl_atp.architectures import UnsupportedArchitectureError
from axolotl_atp.cli import atp_merge, main
from axolotl_atp.errors import MergeError
from axolotl_atp.export.sources import CheckpointError
from axolotl_atp.masks_file import MasksFileError

USER_ERRORS = [
    MasksFileError("run/atp_masks.json: layers[0].mlp has an index outside 0..95. Fix: re-run training."),
    CheckpointError("run has no LoRA adapter (adapter_config.json and adapter_model.safetensors). Fix: train."),
    MergeError("out exists and is not empty. Fix: pass --overwrite to replace it, or --output-dir."),
    MergeError("the disk under out filled up while writing the export. Fix: free space."),
    UnsupportedArchitectureError("model_type = 'gpt2' is not supported by axolotl-atp. Fix: use another model."),
]


def invoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException, command=atp_merge):
    from axolotl_atp.export import merge

    def failing_merge(*args, **kwargs):
        raise error

    monkeypatch.setattr(merge, "run_merge", failing_merge)
    config = tmp_path / "cfg.yml"
    config.write_text("base_model: x\n")
    args = [str(config)] if command is atp_merge else ["merge", str(config)]
    return CliRunner().invoke(command, args)


@pytest.mark.parametrize("error", USER_ERRORS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("command", [atp_merge, main], ids=["axolotl atp-merge", "axolotl-atp merge"])
def test_user_errors_are_one_message_without_traceback(tmp_path, monkeypatch, error, command):
    result = invoke(tmp_path, monkeypatch, error, command)
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {error}"
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # handled, not propagated


def test_unexpected_errors_keep_their_traceback(tmp_path, monkeypatch):
    result = invoke(tmp_path, monkeypatch, RuntimeError("a bug"))
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)  # propagates: Python prints the traceback
