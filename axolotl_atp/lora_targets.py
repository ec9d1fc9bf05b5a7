"""LoRA targets of a multimodal model must stay inside its language model.

ATP prunes and merges the decoder layers only; the parts a spec keeps whole (a vision tower, a
projector) are copied into the export as they are. A plain list of names such as `q_proj`, or
`lora_target_linear`, would also put LoRA on the vision tower's Linear modules, so such a config is
refused before the weights load, with the regex that targets the decoder layers only.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from axolotl_atp.architectures import ArchitectureSpec


def decoder_lora_regex(spec: ArchitectureSpec) -> str:
    """A `lora_target_modules` regex matching the spec's prunable Linear modules of every decoder layer."""
    modules = (*spec.attention_out_modules(), spec.o, *spec.mlp_out_modules(), spec.down)
    return re.escape(spec.layers_path) + r"\.\d+\.(" + "|".join(re.escape(m) for m in modules) + ")"


def kept_whole_linears(model_config: Any, spec: ArchitectureSpec) -> list[str]:
    """Names of the Linear modules under `spec.keep_whole`, from a model built on the meta device (no weights)."""
    if not spec.keep_whole:
        return []
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(name == p or name.startswith(p + ".") for p in spec.keep_whole)
    ]


def check_lora_targets(cfg: Any, model_config: Any, spec: ArchitectureSpec) -> None:
    """Refuse LoRA targets (`lora_target_modules`, `lora_target_linear`) that reach a part kept whole."""
    names = kept_whole_linears(model_config, spec)
    if not names:
        return
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = cfg.get("lora_target_modules")
    linear = bool(cfg.get("lora_target_linear"))
    effective = targets
    if linear:  # axolotl adds the last name component of every Linear module
        listed = [] if targets is None else [targets] if isinstance(targets, str) else list(targets)
        effective = listed + sorted({n.split(".")[-1] for n in names})
    if not effective:
        return
    peft_like = SimpleNamespace(
        target_modules=effective,
        exclude_modules=cfg.get("lora_exclude_modules"),
        target_parameters=None,
        modules_to_save=None,
        layers_to_transform=None,
        layers_pattern=None,
    )
    hits = [n for n in names if check_target_module_exists(peft_like, n)]
    if not hits:
        return
    setting = f"lora_target_modules = {targets!r}" + (" with lora_target_linear = true" if linear else "")
    raise ValueError(
        f"{setting} puts LoRA on {len(hits)} modules outside the language model of this "
        f"{model_config.model_type!r} model (e.g. {hits[0]}); axolotl-atp keeps {', '.join(spec.keep_whole)} "
        "whole and prunes and tunes only the decoder layers. Fix: set `lora_target_linear: false` and "
        f"`lora_target_modules: '{decoder_lora_regex(spec)}'` (a regex matching the decoder layers only)."
    )
