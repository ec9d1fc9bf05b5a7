"""Tiny in-memory models of every supported family for the unit tests: their geometry, random decisions,
LoRA-wrapped copies and the physically pruned reference a decision describes."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from axolotl_atp.architectures import spec_for
from axolotl_atp.export.slicing import slice_layer
from axolotl_atp.groups import HEADS, MLP, ModelGeometry, slice_refs
from tests.kit import GEMMA3_LORA_TARGETS, tiny_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"]


FAMILIES = ["llama", "llama_mha", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "gemma3"]


def tiny(family: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, 64, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.eval()


def geometry(model):
    spec = spec_for(model.config.model_type)
    return spec, ModelGeometry.from_config(model.config, spec)


def random_kept(geo: ModelGeometry, seed: int, uniform: bool) -> dict[str, list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    kept = {}
    for s in (HEADS, MLP):
        n = geo.num_groups(s)
        k_uniform = int(torch.randint(1, n + 1, (1,), generator=g))
        layers = []
        for _ in range(geo.num_layers):
            k = k_uniform if uniform else int(torch.randint(1, n + 1, (1,), generator=g))
            layers.append(sorted(torch.randperm(n, generator=g)[:k].tolist()))
        kept[s] = layers
    return kept


def physically_pruned(model, kept, spec, geo):
    """A stock model of the same family with the kept widths (uniform counts), weights sliced."""
    refs = slice_refs(spec, geo)
    cfg = copy.deepcopy(model.config)
    text = cfg.get_text_config()  # transformers' own accessor, independent of the spec's
    kv = len(kept[HEADS][0])
    text.num_key_value_heads = kv
    text.num_attention_heads = kv * geo.group_size
    text.head_dim = geo.head_dim
    text.intermediate_size = len(kept[MLP][0])
    small = AutoModelForCausalLM.from_config(cfg).eval()
    state = model.state_dict()
    new_state = {}
    prefix = f"{spec.layers_path}."
    for layer in range(geo.num_layers):
        lp = f"{prefix}{layer}."
        tensors = {k[len(lp) :]: v for k, v in state.items() if k.startswith(lp)}
        sliced = slice_layer(tensors, refs, {s: kept[s][layer] for s in kept})
        new_state.update({lp + k: v for k, v in sliced.items()})
    new_state.update({k: v for k, v in state.items() if not k.startswith(prefix)})
    small.load_state_dict(new_state)
    return small


def lora_model(family: str, seed: int = 0):
    model = tiny(family, seed)
    targets = GEMMA3_LORA_TARGETS if family == "gemma3" else TARGETS  # not the vision tower
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    return peft_model.eval()
