"""The GGUF step of `axolotl atp-merge --format gguf`, and `axolotl-atp gguf FOLDER` for any export folder.

It converts the already written and verified HF export folder, so it depends on nothing inside the merge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from axolotl_atp.export.gguf_layout import OUT_TYPES, GGUFExportError

GGUF_NAME = "model.gguf"
DEFAULT_TYPE = "f16"


def gguf_step(
    folder: Path, out_type: str, texts: list[str], trust_remote_code: bool, verify: bool, out_file: Path | None = None
) -> dict[str, Any]:
    """Write `folder` as GGUF (default: FOLDER/model.gguf), check it in llama.cpp, return the report's `gguf` entry.

    A failed check raises GGUFExportError; a check that cannot run (no llama.cpp, or `verify` off) is
    recorded as skipped, with the reason, and logged as a warning: it never reads as a success.
    """
    from axolotl_atp.export.gguf_layout import read_config, sliding_window_note
    from axolotl_atp.export.gguf_verify import GGUFCheck, verify_gguf
    from axolotl_atp.export.gguf_writer import write_gguf
    from axolotl_atp.log import get_logger

    log = get_logger(__name__)

    target = out_file or folder / GGUF_NAME
    summary = write_gguf(folder, target, out_type)
    log.info(
        "axolotl-atp: wrote %s (llama.cpp architecture %s, %s, %.1f MB)",
        target,
        summary.arch,
        out_type,
        summary.bytes_written / 1e6,
    )
    note = sliding_window_note(read_config(folder))
    if note:
        log.warning("axolotl-atp: GGUF: %s", note)
    if summary.padded_mlp_layers:
        log.info("axolotl-atp: GGUF layers %s keep one zero MLP channel (llama.cpp's deci)", summary.padded_mlp_layers)
    if verify:
        check = verify_gguf(folder, target, texts, out_type, trust_remote_code)
    else:
        check = GGUFCheck(status="skipped", reason="--no-verify was given")
    if check.status == "skipped":
        log.warning(
            "axolotl-atp: the GGUF check in llama.cpp was SKIPPED (%s): the GGUF file is unverified.", check.reason
        )
    elif check.status == "failed":
        target.unlink(missing_ok=True)
        raise GGUFExportError(
            f"the GGUF file differs from the HF export in llama.cpp: {check.reason}. It was removed. Please report "
            "this with the config and masks file; the HF export alone can be written without --format gguf."
        )
    else:
        log.info(
            "axolotl-atp: GGUF verified in llama.cpp %s: max |probability difference| %.3g over %d positions "
            "(tolerance %g); llama.cpp's tokenizer matches",
            check.llama_cpp_release,
            check.max_abs_prob_diff,
            check.positions,
            check.tolerance,
        )
    return {
        "file": target.name if target.parent == folder else str(target),
        "type": out_type,
        "llama_cpp_arch": summary.arch,
        "bytes": summary.bytes_written,
        "padded_mlp_layers": summary.padded_mlp_layers,
        "f16_fallback_tensors": summary.f16_fallback_tensors,
        "max_abs_prob_diff": check.max_abs_prob_diff,
        "verification": check.as_dict(),
    }


@click.command(name="gguf")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Default: FOLDER/model.gguf"
)
@click.option("--gguf-type", type=click.Choice(OUT_TYPES), default=DEFAULT_TYPE, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing GGUF file.")
@click.option("--no-verify", is_flag=True, help="Skip the probability check in llama.cpp.")
def gguf_command(folder: Path, output: Path | None, gguf_type: str, overwrite: bool, no_verify: bool) -> None:
    """Write an `atp-merge` export folder (or a stock Llama/Mistral/Qwen2/Phi-3/Qwen3 folder) as one GGUF file."""
    from axolotl_atp.export.gguf_layout import is_per_layer_export, read_config
    from axolotl_atp.export.verify import FALLBACK_TEXTS

    target = output or folder / GGUF_NAME
    if target.exists() and not overwrite:
        raise click.ClickException(f"{target} exists. Fix: pass --overwrite to replace it, or --output.")
    remote = is_per_layer_export(read_config(folder))
    try:
        entry = gguf_step(folder, gguf_type, FALLBACK_TEXTS, remote, not no_verify, out_file=target)
    except GGUFExportError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"{target}: {entry['llama_cpp_arch']}, check {entry['verification']['status']}")
