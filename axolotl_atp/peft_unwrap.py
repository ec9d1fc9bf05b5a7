"""Reaching through PEFT's wrappers: the base model, a LoRA layer's base Linear, and the base parameter count."""

from __future__ import annotations

from torch import nn


def unwrap_base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def base_layer_of(module: nn.Module) -> nn.Module:
    """The frozen Linear under a PEFT LoRA layer, or the module itself when it carries no LoRA."""
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) else module


def count_parameters(model: nn.Module) -> int:
    """Parameters of the base model, LoRA excluded, 4-bit weights counted at their unpacked size."""
    seen: set[int] = set()
    total = 0
    for name, module in unwrap_base_model(model).named_modules():
        if "lora_" in name:
            continue
        for param in module.parameters(recurse=False):
            if id(param) in seen:  # tied embeddings
                continue
            seen.add(id(param))
            packed = type(param).__name__ == "Params4bit"
            total += module.in_features * module.out_features if packed else param.numel()
    return total
