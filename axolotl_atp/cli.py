"""Command-line entry points: `axolotl atp-merge CONFIG` and `axolotl-atp merge CONFIG`.

Kept import-light: axolotl imports this module to render `axolotl --help`.
"""

from __future__ import annotations

import click

from axolotl_atp.export.gguf_export import DEFAULT_TYPE, gguf_command
from axolotl_atp.export.gguf_layout import OUT_TYPES


@click.command(name="atp-merge")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option("--output-dir", default=None, help="Where to write the pruned model (default: OUTPUT_DIR/atp-merged).")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty output folder.")
@click.option(
    "--base-weights",
    type=click.Choice(["auto", "original", "nf4"]),
    default="auto",
    help="QLoRA runs: merge into the original weights or into NF4-dequantized ones (auto: the documented default).",
)
@click.option("--no-verify", is_flag=True, help="Skip the logit check of the export against the masked model.")
@click.option(
    "--format",
    "export_format",
    type=click.Choice(["hf", "gguf"]),
    default="hf",
    help="gguf: also write OUTPUT_DIR/model.gguf for llama.cpp / ollama, checked in llama.cpp.",
)
@click.option("--gguf-type", type=click.Choice(OUT_TYPES), default=DEFAULT_TYPE, show_default=True)
def atp_merge(
    config: str,
    output_dir: str | None,
    overwrite: bool,
    base_weights: str,
    no_verify: bool,
    export_format: str,
    gguf_type: str,
) -> None:
    """Merge the LoRA adapter of an ATP run and write the physically pruned model."""
    from axolotl_atp.errors import ATPUserError
    from axolotl_atp.export.merge import run_merge

    try:
        run_merge(
            config,
            output_dir=output_dir,
            overwrite=overwrite,
            base_weights=base_weights,
            verify=not no_verify,
            gguf_type=gguf_type if export_format == "gguf" else None,
        )
    except ATPUserError as err:
        # A refusal or a bad input: its message says everything, so no traceback. Other errors keep theirs.
        raise click.ClickException(str(err)) from None


@click.group()
def main() -> None:
    """axolotl-atp: All-in-One Tuning and Structural Pruning for axolotl."""


main.add_command(atp_merge, name="merge")

main.add_command(gguf_command, name="gguf")

if __name__ == "__main__":
    main()
