"""Command-line entry points: `axolotl atp-merge CONFIG` and `axolotl-atp merge CONFIG`.

Kept import-light: axolotl imports this module to render `axolotl --help`.
"""

from __future__ import annotations

import click


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
def atp_merge(config: str, output_dir: str | None, overwrite: bool, base_weights: str, no_verify: bool) -> None:
    """Merge the LoRA adapter of an ATP run and write the physically pruned model."""
    from axolotl_atp.errors import ATPUserError
    from axolotl_atp.export.merge import run_merge

    try:
        run_merge(config, output_dir=output_dir, overwrite=overwrite, base_weights=base_weights, verify=not no_verify)
    except ATPUserError as err:
        # A refusal or a bad input: its message says everything, so no traceback. Other errors keep theirs.
        raise click.ClickException(str(err)) from None


@click.group()
def main() -> None:
    """axolotl-atp: All-in-One Tuning and Structural Pruning for axolotl."""


main.add_command(atp_merge, name="merge")

if __name__ == "__main__":
    main()
