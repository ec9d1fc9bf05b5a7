"""Merge LoRA into the base and remove the pruned groups, one decoder layer at a time.

Nothing here builds a model: tensors stream from the base shards, through the merge and the
slicing, into the output shards, so a merge holds about one layer (plus one output shard) at a time.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from axolotl_atp.architectures import ArchitectureSpec
from axolotl_atp.decision import Decision
from axolotl_atp.export.slicing import kept_positions, slice_layer
from axolotl_atp.export.sources import (
    DEFAULT_MAX_SHARD_BYTES,
    BaseCheckpoint,
    CheckpointError,
    LoraAdapter,
    ShardWriter,
    nf4_roundtrip,
)
from axolotl_atp.groups import HEADS, MLP, ModelGeometry, slice_refs

REMOTE_DIR = Path(__file__).parent / "remote"
# The line of `remote/configuration_atp.py` that the export rewrites to the base model's type.
BASE_MODEL_TYPE_LINE = 'BASE_MODEL_TYPE = "llama"'


@dataclass
class ExportStats:
    params_before: int = 0
    params_after: int = 0
    bytes_written: int = 0
    pruned_lora_norm: float = 0.0
    dtype: torch.dtype = torch.float32


def _pruned_lora_sq_norm(adapter: LoraAdapter, layer_prefix: str, refs: dict, kept: dict[str, list[int]]) -> float:
    """Squared norm of the LoRA slices that belong to pruned groups (0 after the prox)."""
    total = 0.0
    for structure, structure_refs in refs.items():
        if structure not in kept:
            continue
        for ref in structure_refs:
            factors = adapter.factors.get(layer_prefix + ref.module)
            if factors is None:
                continue
            a, b, _ = factors
            keep = torch.zeros(ref.group_index.numel(), dtype=torch.bool)
            keep[kept_positions(ref, kept[structure])] = True
            part = b[~keep] if ref.side == "out" else a[:, ~keep]
            total += float(part.float().pow(2).sum())
    return total


def write_pruned_weights(
    base: BaseCheckpoint,
    adapter: LoraAdapter,
    out: Path,
    spec: ArchitectureSpec,
    geo: ModelGeometry,
    decision: Decision,
    nf4_dtype: torch.dtype | None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    module_names: bool = False,
) -> ExportStats:
    """Write the merged, pruned safetensors into `out`; every tensor keeps its base dtype.

    Tensors are matched to modules by their module-path names (`spec.module_key`); they are written
    under the base checkpoint's own key names, or under the module names with `module_names` (the
    per_layer export: its remote modeling code gets none of transformers' key renaming on load).
    """
    refs = slice_refs(spec, geo)
    prefix = spec.layers_path + "."
    checkpoint_key = {spec.module_key(key): key for key in base.files}
    per_layer: dict[int, list[str]] = {i: [] for i in range(geo.num_layers)}
    others: list[str] = []
    for name in checkpoint_key:
        if name.startswith(prefix):
            per_layer[int(name[len(prefix) :].split(".")[0])].append(name)
        else:
            others.append(name)
    unknown = [m for m in adapter.factors if not m.startswith(prefix) and f"{m}.weight" not in checkpoint_key]
    if unknown:
        raise CheckpointError(
            f"the adapter has LoRA on modules the base model lacks: {unknown[:3]}. Fix: merge with "
            "the base model the run was trained on."
        )
    check_replacements(adapter, checkpoint_key)

    def load(names: list[str]) -> dict[str, torch.Tensor]:
        tensors = base.get([checkpoint_key[n] for n in names])
        return {n: tensors[checkpoint_key[n]] for n in names}

    def output_key(name: str) -> str:
        return name if module_names else checkpoint_key[name]

    stats = ExportStats(params_before=base.numel())
    writer = ShardWriter(out, max_shard_bytes)
    merged = set()

    def merge(key: str, tensor: torch.Tensor, quantized: bool) -> torch.Tensor:
        if key in adapter.replacements:
            return adapter.replacements[key]
        if not key.endswith(".weight") or tensor.dim() != 2:
            return tensor
        module = key[: -len(".weight")]
        weight = nf4_roundtrip(tensor, nf4_dtype) if (quantized and nf4_dtype is not None) else tensor
        delta = adapter.delta(module)
        if delta is None:
            return weight
        merged.add(module)
        return (weight.float() + delta).to(tensor.dtype)

    writer.add({output_key(name): merge(name, t, quantized=False) for name, t in load(others).items()})
    sq_norm = 0.0
    for layer in tqdm(range(geo.num_layers), desc="atp-merge: layers", unit="layer"):
        layer_prefix = f"{prefix}{layer}."
        tensors = {n[len(layer_prefix) :]: merge(n, t, quantized=True) for n, t in load(per_layer[layer]).items()}
        kept = {s: decision.kept[s][layer] for s in decision.kept}
        sq_norm += _pruned_lora_sq_norm(adapter, layer_prefix, refs, kept)
        sliced = slice_layer(tensors, refs, kept)
        stats.dtype = sliced[f"{refs[MLP][-1].module}.weight"].dtype
        writer.add({output_key(layer_prefix + k): v for k, v in sliced.items()})
    writer.close()
    missing = set(adapter.factors) - merged
    if missing:
        raise CheckpointError(
            f"LoRA factors were not merged for {sorted(missing)[:3]} (embedding LoRA is not supported)."
        )
    stats.params_after = writer.numel
    stats.bytes_written = writer.total_bytes
    stats.pruned_lora_norm = sq_norm**0.5
    return stats


def check_replacements(adapter: LoraAdapter, checkpoint_key: dict[str, str]) -> None:
    """Refuse full replacements (`modules_to_save`) of tensors the base checkpoint does not hold: the
    merge would drop them (e.g. `lm_head` of a model whose lm_head is tied to the input embeddings)."""
    missing = sorted(key for key in adapter.replacements if key not in checkpoint_key)
    if missing:
        raise CheckpointError(
            f"the adapter replaces {missing[:3]} (`lora_modules_to_save`), which the base checkpoint does not hold "
            "(a tied lm_head is stored only as the input embeddings), so the merge would drop the trained "
            f"tensor{'s' if len(missing) > 1 else ''}. Fix: train without `lora_modules_to_save` for "
            f"{', '.join(k.rsplit('.', 1)[0] for k in missing[:3])}, or merge with the base model the run was trained on."
        )


def widths(decision: Decision, geo: ModelGeometry) -> tuple[list[int], list[int]]:
    """(kept KV heads, kept MLP channels) per layer."""
    return [len(k) for k in decision.kept_groups(HEADS)], [len(k) for k in decision.kept_groups(MLP)]


def uniform_config(base_config: Any, decision: Decision, geo: ModelGeometry, spec: ArchitectureSpec) -> Any:
    """The base family's stock config with the (uniform) kept widths (in the text config of a multimodal model)."""
    kv, mlp = widths(decision, geo)
    if len(set(kv)) != 1 or len(set(mlp)) != 1:
        raise CheckpointError(
            "layout: uniform needs the same kept widths in every layer, but the masks file has "
            f"KV heads {sorted(set(kv))} and MLP widths {sorted(set(mlp))}. Fix: merge with `layout: per_layer` "
            "(the masks came from a per_layer run)."
        )
    config = copy.deepcopy(base_config)
    text = spec.text_config_of(config)
    text.num_key_value_heads = kv[0]
    text.num_attention_heads = kv[0] * geo.group_size
    text.head_dim = geo.head_dim
    text.intermediate_size = mlp[0]
    return config


def configuration_code(base_type: str) -> str:
    """`remote/configuration_atp.py` for a base model type: its one template line rewritten, checked."""
    template = (REMOTE_DIR / "configuration_atp.py").read_text()
    if template.count(BASE_MODEL_TYPE_LINE) != 1:
        raise RuntimeError(
            f"{REMOTE_DIR / 'configuration_atp.py'} must hold the line `{BASE_MODEL_TYPE_LINE}` exactly once "
            "(the export rewrites it). Fix: restore the line, or update BASE_MODEL_TYPE_LINE in export/pruned.py."
        )
    return template.replace(BASE_MODEL_TYPE_LINE, f"BASE_MODEL_TYPE = {base_type!r}")


def write_per_layer_config(
    base_config: Any, decision: Decision, geo: ModelGeometry, spec: ArchitectureSpec, out: Path
) -> None:
    """A config recording each layer's widths, plus the modeling code that reads it.

    The remote code finds the decoder layers at `atp_layers_path` and their geometry in the
    sub-config named `atp_text_config` (none: the config itself).
    """
    kv, mlp = widths(decision, geo)
    base_type = base_config.model_type
    data = base_config.to_dict()
    (data[spec.text_config] if spec.text_config else data)["head_dim"] = geo.head_dim
    data.update(
        model_type=f"atp_{base_type}",
        architectures=["ATPPrunedForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_atp.ATPPrunedConfig",
            "AutoModelForCausalLM": "modeling_atp.ATPPrunedForCausalLM",
        },
        atp_layer_num_key_value_heads=kv,
        atp_layer_intermediate_sizes=mlp,
        atp_layers_path=spec.layers_path,
        atp_text_config=spec.text_config,
    )
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (out / "configuration_atp.py").write_text(configuration_code(base_type))
    (out / "modeling_atp.py").write_text((REMOTE_DIR / "modeling_atp.py").read_text())
