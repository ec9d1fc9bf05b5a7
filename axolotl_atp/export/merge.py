"""`axolotl atp-merge CONFIG`: merged, physically pruned model, verified, with its report.

The stages, in `run_merge`'s order: plan (validate config, adapter, masks and output folder before
any weight is read), write (into a temporary sibling folder), verify, report, swap into place. An
interrupted merge leaves no half-written model and never touches the adapter or checkpoints.
"""

from __future__ import annotations

import resource
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from axolotl_atp.architectures import ArchitectureSpec, spec_for
from axolotl_atp.args import ATPConfig, plugin_listed
from axolotl_atp.atomic_files import is_disk_full, replace_folder, temporary_sibling
from axolotl_atp.decision import Decision
from axolotl_atp.errors import MergeError
from axolotl_atp.export.pruned import (
    ExportStats,
    uniform_config,
    widths,
    write_per_layer_config,
    write_pruned_weights,
)
from axolotl_atp.export.report import build_report, plot_widths, write_report
from axolotl_atp.export.sources import BaseCheckpoint, LoraAdapter
from axolotl_atp.export.verify import LogitCheck, verify_export
from axolotl_atp.groups import ModelGeometry, ParameterCounter, slice_refs
from axolotl_atp.log import get_logger
from axolotl_atp.masks_file import read_masks

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


@dataclass
class MergePlan:
    """What one merge reads and writes, every input checked before any weight is read."""

    cfg: Any
    atp_cfg: ATPConfig
    run_dir: Path
    adapter_dir: Path
    out: Path
    base_dir: Path
    base_config: Any
    spec: ArchitectureSpec
    geo: ModelGeometry
    decision: Decision
    masks_data: dict[str, Any]
    layout: str
    base_weights: str
    nf4_dtype: torch.dtype | None
    stock_config: Any  # the uniform layout's config; None for per_layer
    adapter: LoraAdapter
    base: BaseCheckpoint
    counter: ParameterCounter

    @property
    def remote_code(self) -> bool:
        """Whether the export carries its own modeling code (the per_layer layout)."""
        return self.layout != "uniform"

    @property
    def removed_params(self) -> int:
        return self.counter.prunable_total - self.counter.remaining_from_kept(self.decision.kept)


@dataclass
class WrittenExport:
    """What the write stage measured."""

    stats: ExportStats
    merge_seconds: float
    peak_rss_mb: float
    tokenizer_source: Path


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


def plan_merge(config_path: str, output_dir: str | None, overwrite: bool, base_weights: str) -> MergePlan:
    """Read and check the config, output folder, adapter and masks file; nothing is written."""
    from transformers import AutoConfig

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
    geo = ModelGeometry.from_config(base_config, spec)
    decision, masks_data = read_masks(run_dir / atp_cfg.masks_file, geo, base_config.model_type)
    layout = masks_data.get("layout", atp_cfg.layout)
    weights_choice = choose_base_weights(base_weights, cfg.adapter)
    nf4_dtype = (cfg.torch_dtype or torch.float32) if weights_choice == "nf4" else None
    if isinstance(nf4_dtype, str):
        nf4_dtype = getattr(torch, nf4_dtype)
    stock_config = uniform_config(base_config, decision, geo, spec) if layout == "uniform" else None
    out.parent.mkdir(parents=True, exist_ok=True)
    return MergePlan(
        cfg=cfg,
        atp_cfg=atp_cfg,
        run_dir=run_dir,
        adapter_dir=adapter_dir,
        out=out,
        base_dir=base_dir,
        base_config=base_config,
        spec=spec,
        geo=geo,
        decision=decision,
        masks_data=masks_data,
        layout=layout,
        base_weights=weights_choice,
        nf4_dtype=nf4_dtype,
        stock_config=stock_config,
        adapter=adapter,
        base=BaseCheckpoint(base_dir),
        counter=ParameterCounter(geo, slice_refs(spec, geo)),
    )


def write_export(plan: MergePlan, folder: Path, started: float) -> WrittenExport:
    """The merged, pruned weights, the config (with the remote code of per_layer), the generation config
    and the tokenizer, into `folder`."""
    LOG.info(
        "axolotl-atp: merging %s + %s into %s (%s layout, %s base weights)",
        plan.base_dir,
        plan.adapter_dir,
        plan.out,
        plan.layout,
        plan.base_weights,
    )
    stats = write_pruned_weights(
        plan.base,
        plan.adapter,
        folder,
        plan.spec,
        plan.geo,
        plan.decision,
        plan.nf4_dtype,
        module_names=plan.remote_code,
    )
    merge_seconds = time.time() - started
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if plan.stock_config is not None:
        plan.stock_config.save_pretrained(folder)
    else:
        write_per_layer_config(plan.base_config, plan.decision, plan.geo, plan.spec, folder)
    if (plan.base_dir / "generation_config.json").is_file():
        shutil.copy2(plan.base_dir / "generation_config.json", folder / "generation_config.json")
    tokenizer_sources = [plan.run_dir, Path(str(plan.cfg.tokenizer_config or plan.base_dir)), plan.base_dir]
    tokenizer_source = copy_tokenizer(tokenizer_sources, folder)
    if stats.pruned_lora_norm > 1e-6:
        LOG.warning(
            "axolotl-atp: the LoRA slices of pruned groups have norm %.4g, not 0 (group_lasso %s): the export "
            "drops them, so it differs from the LoRA-aware training forward. The prox mode drives them to 0.",
            stats.pruned_lora_norm,
            plan.atp_cfg.group_lasso,
        )
    return WrittenExport(stats, merge_seconds, peak_rss_mb, tokenizer_source)


def write_gguf_from(plan: MergePlan, folder: Path, gguf_type: str, verify: bool) -> dict:
    """FOLDER/model.gguf for llama.cpp and ollama, checked in llama.cpp against the export: the report's entry."""
    from axolotl_atp.export.gguf_export import gguf_step
    from axolotl_atp.export.verify import sample_texts

    return gguf_step(folder, gguf_type, sample_texts(plan.cfg.datasets), plan.remote_code, verify)


def write_report_files(
    plan: MergePlan, folder: Path, written: WrittenExport, check: LogitCheck | None, formats: dict | None = None
) -> dict:
    """`atp_report.json`, the model card, the widths plot and a copy of the masks file; return the report."""
    report = {**build_report(plan, written, check), **(formats or {})}
    write_report(folder, report)
    plot_widths(*widths(plan.decision, plan.geo), plan.geo, folder / "atp_widths.png")
    shutil.copy2(plan.run_dir / plan.atp_cfg.masks_file, folder / "atp_masks.json")
    return report


@contextmanager
def removed_on_failure(folder: Path, out: Path) -> Iterator[None]:
    """Remove the partial export in `folder` on any failure; a full disk becomes a `MergeError`."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    try:
        yield
    except BaseException as err:
        shutil.rmtree(folder, ignore_errors=True)
        if is_disk_full(err):
            raise MergeError(
                f"the disk under {out.parent} filled up while writing the export ({err}). The partial export was "
                f"removed{' and ' + str(out) + ' is unchanged' if out.exists() else ''}. Fix: free space, or pass "
                "--output-dir on a disk with room."
            ) from err
        raise


def run_merge(
    config_path: str,
    output_dir: str | None = None,
    overwrite: bool = False,
    base_weights: str = "auto",
    verify: bool = True,
    gguf_type: str | None = None,
) -> Path:
    """Merge, prune, write and verify; return the output folder. `gguf_type`: also write FOLDER/model.gguf."""
    started = time.time()
    # 1. plan: every input checked, and room for the export, before any weight is read
    plan = plan_merge(config_path, output_dir, overwrite, base_weights)
    if gguf_type is not None:  # refuse what llama.cpp cannot run per layer before any work
        from axolotl_atp.export.gguf_layout import check_supported

        check_supported(plan.base_config.to_dict(), tokenizer_dir=plan.base_dir)
    check_free_space(plan.out.parent, export_bytes_estimate(plan.base, plan.removed_params))
    folder = temporary_sibling(plan.out)
    with removed_on_failure(folder, plan.out):
        # 2. write the Hugging Face export into the temporary folder
        written = write_export(plan, folder, started)
        # 3. verify its logits against the merged, masked model
        check = verify_export(plan, folder, written.stats) if verify else None
        # 4. other formats, written from the verified export in `folder` and checked in their own engine
        formats = {"gguf": write_gguf_from(plan, folder, gguf_type, verify)} if gguf_type else {}
        # 5. report
        report = write_report_files(plan, folder, written, check, formats)
        # 6. swap into place
        replace_folder(folder, plan.out)
    LOG.info(
        "axolotl-atp: wrote %s: %d -> %d parameters (%.1f%% of all removed), merge %.1f s, peak RSS %.0f MB",
        plan.out,
        written.stats.params_before,
        written.stats.params_after,
        100 * report["achieved_total_ratio"],
        written.merge_seconds,
        written.peak_rss_mb,
    )
    return plan.out
