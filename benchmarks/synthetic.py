"""Inputs for the speed and merge-cost benchmarks, built without training.

Speed and merge cost depend on shapes, not on what was learned, so these write what `axolotl train`
would leave behind, directly: a LoRA adapter (peft's file layout, random factors), a masks file from
the same exact-budget freeze on random scores, and the training config. `axolotl atp-merge` then
runs on them unchanged. `random_llama` writes a random-weight Llama checkpoint in several shards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from axolotl_atp.architectures import spec_for
from axolotl_atp.atomic_files import write_json_atomically
from axolotl_atp.decision import freeze_decision, stock_config_accepts_heads
from axolotl_atp.groups import HEADS, MLP, ModelGeometry, ParameterCounter, slice_refs
from axolotl_atp.masks_file import decision_to_json

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(config, folder: Path, model_dir: Path, rank: int = 16, seed: int = 0) -> None:
    """A peft LoRA adapter on every decoder projection, with random (small) A and B."""
    from peft import LoraConfig

    spec = spec_for(config.model_type)
    g = torch.Generator().manual_seed(seed)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shapes = {  # (out, in)
        "self_attn.q_proj": (config.num_attention_heads * head_dim, config.hidden_size),
        "self_attn.k_proj": (config.num_key_value_heads * head_dim, config.hidden_size),
        "self_attn.v_proj": (config.num_key_value_heads * head_dim, config.hidden_size),
        "self_attn.o_proj": (config.hidden_size, config.num_attention_heads * head_dim),
        "mlp.gate_proj": (config.intermediate_size, config.hidden_size),
        "mlp.up_proj": (config.intermediate_size, config.hidden_size),
        "mlp.down_proj": (config.hidden_size, config.intermediate_size),
    }
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module, (out_f, in_f) in shapes.items():
            key = f"base_model.model.{spec.layers_path}.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    lora.base_model_name_or_path = str(model_dir)
    lora.save_pretrained(str(folder))


def write_decision(
    config, scores, path: Path, ratio: float, layout: str, *, mlp_round_to: int = 8, base_model: str | None = None
) -> dict:
    """A masks file for `scores` ({structure: [layers, groups]}), through the same exact-budget freeze as ATP."""
    spec = spec_for(config.model_type)
    geo = ModelGeometry.from_config(config, spec)
    counter = ParameterCounter(geo, slice_refs(spec, geo))
    decision = freeze_decision(
        scores,
        geo,
        counter,
        ratio,
        layout,
        round_to={HEADS: 1, MLP: mlp_round_to},
        minimum={HEADS: 1, MLP: 1},
        accept_heads=stock_config_accepts_heads(geo) if layout == "uniform" else None,
    )
    data = decision_to_json(
        decision,
        model_type=config.model_type,
        prune_ratio=ratio,
        layout=layout,
        structures=[s for s in (HEADS, MLP) if s in scores],
        counter=counter,
        base_model=base_model,
    )
    write_json_atomically(data, path)
    return data


def write_random_masks(config, path: Path, ratio: float, layout: str, seed: int = 0) -> None:
    geo = ModelGeometry.from_config(config, spec_for(config.model_type))
    g = torch.Generator().manual_seed(seed)
    scores = {s: torch.randn(geo.num_layers, geo.num_groups(s), generator=g) for s in (HEADS, MLP)}
    write_decision(config, scores, path, ratio, layout)


def synthetic_run(model_dir: Path, work: Path, data: Path, ratio: float, layout: str, seed: int = 0) -> Path:
    """A run folder as `axolotl train` with ATP leaves it, and its config; returns the config path."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    run = work / "run"
    write_adapter(config, run, model_dir, seed=seed)
    write_random_masks(config, run / "atp_masks.json", ratio, layout, seed=seed)
    cfg = {
        "base_model": str(model_dir),
        "plugins": ["axolotl_atp.ATPPlugin"],
        "atp": {"prune_ratio": ratio, "layout": layout, "mlp_round_to": 8},
        "datasets": [{"path": str(data), "type": "completion"}],
        "output_dir": str(run),
        "sequence_len": 256,
        "adapter": "lora",
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_target_modules": TARGETS,
        "micro_batch_size": 1,
        "num_epochs": 1,
        "learning_rate": 1e-4,
        "optimizer": "adamw_torch",
        "bf16": False,
        "fp16": False,
    }
    path = work / "config.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def random_llama(
    folder: Path,
    tokenizer_from: Path,
    *,
    hidden: int,
    layers: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    shard_bytes: int,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> int:
    """A random-weight Llama checkpoint written shard by shard (never whole in memory); returns params."""
    from transformers import AutoConfig, LlamaConfig

    vocab = AutoConfig.from_pretrained(tokenizer_from).vocab_size
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    )
    config.dtype = dtype
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    head_dim = hidden // heads
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
        ]
    shapes.append(("model.norm.weight", (hidden,)))
    g = torch.Generator().manual_seed(seed)
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = total_bytes = 0

    def flush() -> None:
        path = folder / f"shard-{len(written)}.tmp"
        save_file(shard, path, metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    for name, shape in shapes:
        t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
        t = t.to(dtype)
        if shard and size + t.numel() * t.element_size() > shard_bytes:
            flush()
            size = 0
        shard[name] = t
        size += t.numel() * t.element_size()
        total += t.numel()
        total_bytes += t.numel() * t.element_size()
    flush()
    index: dict = {"metadata": {"total_size": total_bytes}, "weight_map": {}}
    for n, (path, names) in enumerate(written):
        fname = f"model-{n + 1:05d}-of-{len(written):05d}.safetensors"
        path.rename(folder / fname)
        index["weight_map"].update(dict.fromkeys(names, fname))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / name).is_file():
            shutil.copy2(tokenizer_from / name, folder / name)
    return total
