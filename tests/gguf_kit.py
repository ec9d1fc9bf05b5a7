"""Tiny per-layer HF exports for the GGUF tests, written by the export's own slicing and config code
from a random tiny model and chosen kept widths (no training: the GGUF writer reads only the folder)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.kit import build_tiny_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def per_layer_export(
    base_dir: Path, out: Path, kv_heads: list[int], mlp: list[int], seed: int = 0, tied_base: bool = False
) -> Path:
    """Slice `base_dir` (an HF folder) to the given kept KV heads / MLP channels per layer (random choice of
    which), and write it as `atp-merge` writes a per_layer export: module-named weights, per-layer config."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from axolotl_atp.architectures import spec_for
    from axolotl_atp.decision import Decision
    from axolotl_atp.export.pruned import write_per_layer_config
    from axolotl_atp.export.slicing import slice_layer
    from axolotl_atp.groups import HEADS, MLP, ModelGeometry, slice_refs

    config = AutoConfig.from_pretrained(base_dir)
    spec = spec_for(config.model_type)
    geo = ModelGeometry.from_config(config, spec)
    rng = random.Random(seed)
    kept = {
        HEADS: [sorted(rng.sample(range(geo.num_kv_heads), k)) for k in kv_heads],
        MLP: [sorted(rng.sample(range(geo.intermediate_size), m)) for m in mlp],
    }
    decision = Decision(kept=kept, geo=geo)
    refs = slice_refs(spec, geo)
    state: dict[str, Any] = {}
    for path in sorted(base_dir.glob("*.safetensors")):
        state.update(load_file(path))
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {k: v for k, v in state.items() if not k.startswith("model.layers.")}
    for layer in range(geo.num_layers):
        prefix = f"model.layers.{layer}."
        tensors = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        sliced = slice_layer(tensors, refs, {s: decision.kept[s][layer] for s in decision.kept})
        written.update({prefix + k: v.contiguous() for k, v in sliced.items()})
    save_file(written, out / "model.safetensors")
    write_per_layer_config(config, decision, geo, spec, out)
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out / name)
    return out


def tiny_export(root: Path, family: str, kv_heads: list[int], mlp: list[int], **overrides: Any) -> Path:
    """A tiny random model of `family` (3 layers, 4 KV groups of 2 query heads) sliced per layer."""
    dims = dict(num_hidden_layers=len(kv_heads), num_attention_heads=8, num_key_value_heads=4, head_dim=16)
    base = build_tiny_model(root / "base", family, **{**dims, **overrides})
    sharpen(base)
    (base / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return per_layer_export(base, root / "export", kv_heads, mlp)


def sharpen(model_dir: Path, factor: float = 3.0) -> None:
    """Scale the random matrices up, so next-token distributions are peaked rather than near uniform and a
    wrong rotary pairing moves probabilities by far more than the tolerance."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    state = load_file(path)
    save_file({k: v * factor if v.dim() == 2 else v for k, v in state.items()}, path, metadata={"format": "pt"})


def require_llama_cpp() -> None:
    from axolotl_atp.export.llama_cpp import LlamaCppUnavailableError, find_llama_cpp

    try:
        find_llama_cpp()
    except LlamaCppUnavailableError as err:
        pytest.skip(f"llama.cpp is not installed: {err}")
