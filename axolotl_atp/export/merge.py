"""`axolotl atp-merge CONFIG`: merged, physically pruned model, verified, with its report.

Order: validate everything (config, adapter, masks, output folder) before reading weights; write
into a temporary sibling folder; verify; then rename into place, so an interrupted merge leaves
no half-written model and never touches the adapter or checkpoints.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from axolotl_atp.args import ATPConfig, plugin_listed
from axolotl_atp.log import get_logger

LOG = get_logger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    # multimodal models (e.g. Gemma 3): the processor, whose image part the export keeps
    "processor_config.json",
    "preprocessor_config.json",
)
# The check compares float32 logits; 16-bit exports also carry the rounding of the merged weights.
TOLERANCE_FP32 = 1e-3
# fp32 rounding (summation order differs once rows are removed) grows with the hidden states' magnitude:
# heavily pruned models can carry "massive activations" in the tens of thousands.
TOLERANCE_FP32_PER_ACTIVATION = 1e-5
TOLERANCE_16BIT_RELATIVE = 0.05


class MergeError(RuntimeError):
    """A merge that cannot go ahead; the message names the file or key and the fix."""


def load_merge_config(config_path: str) -> Any:
    """The training YAML through axolotl's loader, with the overrides axolotl's own merge uses."""
    import yaml

    raw = yaml.safe_load(Path(config_path).read_text()) or {}
    if not plugin_listed(raw):
        raise MergeError(
            f"{config_path} does not list the ATP plugin. Fix: use the config the ATP run was trained with "
            "(`plugins: [axolotl_atp.ATPPlugin]` and an `atp:` block); for a plain LoRA run use `axolotl merge-lora`."
        )
    from axolotl.cli.config import load_cfg

    return load_cfg(
        config_path,
        merge_lora=True,
        load_in_8bit=False,
        load_in_4bit=False,
        quantize_moe_experts=False,
        deepspeed=None,
        fsdp=None,
        fsdp_config=None,
    )


def resolve_base_model(cfg: Any) -> Path:
    path = Path(str(cfg.base_model))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    return Path(snapshot_download(str(cfg.base_model), revision=cfg.revision_of_model, allow_patterns=patterns))


def check_output_dir(out: Path, protected: list[Path], overwrite: bool) -> None:
    resolved = out.resolve()
    for path in protected:
        p = path.resolve()
        if resolved == p or p.is_relative_to(resolved):
            raise MergeError(
                f"--output-dir {out} would replace {path}, which holds the run's adapter or checkpoints. Fix: "
                "choose another folder (the default is OUTPUT_DIR/atp-merged)."
            )
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise MergeError(f"{out} exists and is not empty. Fix: pass --overwrite to replace it, or --output-dir.")


def disk_full(err: BaseException) -> bool:
    """ENOSPC from Python I/O, or as safetensors' Rust writer reports it."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    return "No space left on device" in str(err) or "StorageFull" in str(err)


def export_bytes_estimate(base: Any, removed_params: int) -> int:
    """The export's size: the base checkpoint's tensor bytes less the removed weights (same dtypes)."""
    from safetensors import safe_open

    total, element = 0, 4
    for path in sorted(set(base.files.values())):
        total += path.stat().st_size
        with safe_open(path, "pt") as f:
            for key in f.keys():  # noqa: SIM118
                if key.endswith("down_proj.weight"):
                    element = {"F32": 4, "F16": 2, "BF16": 2}.get(f.get_slice(key).get_dtype(), 4)
    return max(0, total - removed_params * element)


def check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise MergeError(
            f"{folder} has {free / 2**30:.2f} GiB free but the export needs about {needed / 2**30:.2f} GiB. Nothing "
            "was written. Fix: free space, or pass --output-dir on a disk with room."
        )


def copy_tokenizer(sources: list[Path], out: Path) -> Path:
    for source in sources:
        if (source / "tokenizer_config.json").is_file() or (source / "tokenizer.json").is_file():
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copy2(source / name, out / name)
            return source
    raise MergeError(f"no tokenizer files in {', '.join(map(str, sources))}. Fix: set `tokenizer_config`.")


def choose_base_weights(choice: str, adapter: str | None) -> str:
    """`auto`: NF4-dequantized weights for QLoRA runs (what the adapters were trained against; see
    the README for the measurement), the original weights for LoRA runs."""
    if choice != "auto":
        return choice
    return "nf4" if adapter == "qlora" else "original"


def run_merge(
    config_path: str,
    output_dir: str | None = None,
    overwrite: bool = False,
    base_weights: str = "auto",
    verify: bool = True,
    gguf_type: str | None = None,
) -> Path:
    """Merge, prune, write and verify; return the output folder. `gguf_type`: also write FOLDER/model.gguf."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from axolotl_atp.architectures import spec_for
    from axolotl_atp.export.sources import BaseCheckpoint, LoraAdapter
    from axolotl_atp.export.pruned import uniform_config, widths, write_per_layer_config, write_pruned_weights
    from axolotl_atp.export.report import plot_widths, write_report
    from axolotl_atp.export.verify import compare_logits, reference_model, sample_texts, tokenize_batches
    from axolotl_atp.masks_file import read_masks
    from axolotl_atp.groups import ModelGeometry, ParameterCounter, slice_refs

    started = time.time()
    cfg = load_merge_config(config_path)
    atp_cfg = ATPConfig(**dict(cfg.atp))
    run_dir = Path(cfg.output_dir)
    adapter_dir = Path(cfg.lora_model_dir or cfg.output_dir)
    out = Path(output_dir) if output_dir else run_dir / "atp-merged"
    check_output_dir(out, [run_dir, adapter_dir], overwrite)
    adapter = LoraAdapter(adapter_dir)
    base_dir = resolve_base_model(cfg)
    base_config = AutoConfig.from_pretrained(base_dir)
    spec = spec_for(base_config.model_type)
    if gguf_type is not None:  # refuse families llama.cpp cannot run per layer before any work
        from axolotl_atp.export.gguf_layout import check_supported

        check_supported(base_config.to_dict(), tokenizer_dir=base_dir)
    geo = ModelGeometry.from_config(base_config, spec)
    decision, masks_data = read_masks(run_dir / atp_cfg.masks_file, geo, base_config.model_type)
    layout = masks_data.get("layout", atp_cfg.layout)
    weights_choice = choose_base_weights(base_weights, cfg.adapter)
    nf4_dtype = (cfg.torch_dtype or torch.float32) if weights_choice == "nf4" else None
    if isinstance(nf4_dtype, str):
        nf4_dtype = getattr(torch, nf4_dtype)
    config_out = uniform_config(base_config, decision, geo, spec) if layout == "uniform" else None

    out.parent.mkdir(parents=True, exist_ok=True)
    base = BaseCheckpoint(base_dir)
    counter = ParameterCounter(geo, slice_refs(spec, geo))
    removed = counter.prunable_total - counter.remaining_from_counts(decision.counts())
    check_free_space(out.parent, export_bytes_estimate(base, removed))
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        LOG.info(
            "axolotl-atp: merging %s + %s into %s (%s layout, %s base weights)",
            base_dir,
            adapter_dir,
            out,
            layout,
            weights_choice,
        )
        stats = write_pruned_weights(
            base, adapter, tmp, spec, geo, decision, nf4_dtype, module_names=layout != "uniform"
        )
        merge_seconds = time.time() - started
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if config_out is not None:
            config_out.save_pretrained(tmp)
        else:
            write_per_layer_config(base_config, decision, geo, spec, tmp)
        if (base_dir / "generation_config.json").is_file():
            shutil.copy2(base_dir / "generation_config.json", tmp / "generation_config.json")
        tokenizer_source = copy_tokenizer([run_dir, Path(str(cfg.tokenizer_config or base_dir)), base_dir], tmp)
        if stats.pruned_lora_norm > 1e-6:
            LOG.warning(
                "axolotl-atp: the LoRA slices of pruned groups have norm %.4g, not 0 (group_lasso %s): the export "
                "drops them, so it differs from the LoRA-aware training forward. The prox mode drives them to 0.",
                stats.pruned_lora_norm,
                atp_cfg.group_lasso,
            )

        max_diff: float | None = None
        tolerance: float | None = None
        if verify:
            tokenizer = AutoTokenizer.from_pretrained(tmp, trust_remote_code=layout != "uniform")
            batches = tokenize_batches(tokenizer, sample_texts(cfg.datasets))
            reference, _ = reference_model(base_dir, adapter_dir, spec, geo, decision, nf4_dtype)
            exported = AutoModelForCausalLM.from_pretrained(
                tmp, dtype=torch.float32, trust_remote_code=layout != "uniform"
            ).eval()
            if exported.num_parameters() != stats.params_after:
                raise MergeError(
                    f"the exported model has {exported.num_parameters()} parameters but {stats.params_after} were "
                    "written: the config does not describe the weights."
                )
            max_diff, scale, activations = compare_logits(reference, exported, batches)
            if stats.dtype == torch.float32:
                tolerance = max(TOLERANCE_FP32, TOLERANCE_FP32_PER_ACTIVATION * activations)
            else:
                tolerance = TOLERANCE_16BIT_RELATIVE * max(scale, 1.0)
            del reference, exported
            if max_diff > tolerance:
                raise MergeError(
                    f"the exported model's logits differ from the merged, masked model's by {max_diff:.3g} (tolerance "
                    f"{tolerance:.3g}). The export is not written. Please report this with the config and masks file."
                )
            LOG.info("axolotl-atp: export verified: max |logit difference| %.3g (tolerance %.3g)", max_diff, tolerance)

        kv, mlp = widths(decision, geo)
        prunable_after = counter.remaining_from_counts(decision.counts())
        report = {
            "base_model": str(cfg.base_model),
            "adapter": str(adapter_dir),
            "datasets": [str(d.get("path")) for d in cfg.datasets or []],
            "qlora": cfg.adapter == "qlora",
            "layout": layout,
            "prune_ratio": masks_data.get("prune_ratio"),
            "base_weights": weights_choice,
            "params_before": stats.params_before,
            "params_after": stats.params_after,
            "prunable_params_before": counter.prunable_total,
            "prunable_params_after": prunable_after,
            "achieved_prune_ratio": 1 - prunable_after / counter.prunable_total,
            "achieved_total_ratio": 1 - stats.params_after / stats.params_before,
            "max_abs_logit_diff": max_diff,
            "logit_tolerance": tolerance,
            "pruned_lora_slice_norm": stats.pruned_lora_norm,
            "bytes_written": stats.bytes_written,
            "merge_seconds": round(merge_seconds, 2),
            "merge_peak_rss_mb": round(peak_rss_mb, 1),
            "tokenizer_from": str(tokenizer_source),
            "layers": [
                {"kv_heads": k, "query_heads": k * geo.group_size, "mlp_channels": m}
                for k, m in zip(kv, mlp, strict=True)
            ],
        }
        if gguf_type is not None:
            from axolotl_atp.export.gguf_export import gguf_step

            report["gguf"] = gguf_step(tmp, gguf_type, sample_texts(cfg.datasets), layout != "uniform", verify)
        write_report(tmp, report)
        plot_widths(kv, mlp, geo, tmp / "atp_widths.png")
        shutil.copy2(run_dir / atp_cfg.masks_file, tmp / "atp_masks.json")

        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(err):
            raise MergeError(
                f"the disk under {out.parent} filled up while writing the export ({err}). The partial export was "
                f"removed{' and ' + str(out) + ' is unchanged' if out.exists() else ''}. Fix: free space, or pass "
                "--output-dir on a disk with room."
            ) from err
        raise
    LOG.info(
        "axolotl-atp: wrote %s: %d -> %d parameters (%.1f%% of all removed), merge %.1f s, peak RSS %.0f MB",
        out,
        stats.params_before,
        stats.params_after,
        100 * report["achieved_total_ratio"],
        merge_seconds,
        peak_rss_mb,
    )
    return out
