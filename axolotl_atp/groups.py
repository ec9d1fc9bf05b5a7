"""Pruning groups of a decoder, derived from the model config, and the parameter count they imply.

A *group* is what can be removed exactly: an attention group (one KV head with the query heads
that share it; for multi-head attention simply one head) or one MLP intermediate channel. Every
prunable matrix row or column belongs to one group; `SliceRef.group_index` records which.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from axolotl_atp.architectures import ArchitectureSpec

# The kinds of groups ATP prunes, as the `atp.structures` key spells them.
Structure = Literal["attention_heads", "mlp_channels"]
STRUCTURES: tuple[Structure, ...] = get_args(Structure)
HEADS, MLP = STRUCTURES

Masks = dict[str, torch.Tensor]  # structure -> [num_layers, num_groups], 1 = keep


@dataclass(frozen=True)
class ModelGeometry:
    """The shapes that decide the pruning groups, read from a transformers config."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @classmethod
    def from_config(cls, config: Any, spec: ArchitectureSpec) -> ModelGeometry:
        """Read from the decoder's config (`spec.text_config_of`: the nested text config of a multimodal model)."""
        config = spec.text_config_of(config)
        num_heads = int(config.num_attention_heads)
        num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv_heads})"
            )
        return cls(
            num_layers=int(config.num_hidden_layers),
            hidden_size=int(config.hidden_size),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(head_dim),
            intermediate_size=int(config.intermediate_size),
            qkv_bias=spec.has_bias(spec.qkv_bias, config),
            o_bias=spec.has_bias(spec.o_bias, config),
            mlp_bias=spec.has_bias(spec.mlp_bias, config),
        )

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def num_groups(self, structure: str) -> int:
        return self.num_kv_heads if structure == HEADS else self.intermediate_size


def kept_or_all(kept: Mapping[str, list[list[int]]], structure: str, geo: ModelGeometry) -> list[list[int]]:
    """The kept group indices per layer of `structure`. A structure absent from `kept` is not pruned:
    every one of its groups is kept (in a decision, a masks file, an export and the parameter count)."""
    if structure in kept:
        return kept[structure]
    return [list(range(geo.num_groups(structure))) for _ in range(geo.num_layers)]


def kept_indices(masks: Masks) -> dict[str, list[list[int]]]:
    """Hard masks (1 = kept) as kept group indices per structure and layer."""
    return {s: [torch.nonzero(row >= 0.5).flatten().tolist() for row in mask] for s, mask in masks.items()}


@dataclass(frozen=True)
class SliceRef:
    """Rows (`side="out"`) or columns (`side="in"`) of one Linear module that belong to a structure.

    `group_index[i]` is the group of row/column i of the module's weight.
    """

    module: str
    side: Literal["out", "in"]
    group_index: torch.Tensor
    has_bias: bool

    def rows_per_group(self, num_groups: int) -> int:
        return int(self.group_index.numel()) // num_groups


def slice_refs(spec: ArchitectureSpec, geo: ModelGeometry) -> dict[str, list[SliceRef]]:
    """Where each structure's groups live, identical for every decoder layer."""
    q_index = torch.arange(geo.num_heads * geo.head_dim) // (geo.group_size * geo.head_dim)
    kv_index = torch.arange(geo.num_kv_heads * geo.head_dim) // geo.head_dim
    if spec.qkv:
        attn_out = [SliceRef(spec.qkv, "out", torch.cat([q_index, kv_index, kv_index]), geo.qkv_bias)]
    else:
        attn_out = [
            SliceRef(spec.q, "out", q_index, geo.qkv_bias),
            SliceRef(spec.k, "out", kv_index, geo.qkv_bias),
            SliceRef(spec.v, "out", kv_index, geo.qkv_bias),
        ]
    channels = torch.arange(geo.intermediate_size)
    if spec.gate_up:
        mlp_out = [SliceRef(spec.gate_up, "out", torch.cat([channels, channels]), geo.mlp_bias)]
    else:
        mlp_out = [SliceRef(spec.gate, "out", channels, geo.mlp_bias), SliceRef(spec.up, "out", channels, geo.mlp_bias)]
    return {
        HEADS: [*attn_out, SliceRef(spec.o, "in", q_index, geo.o_bias)],
        MLP: [*mlp_out, SliceRef(spec.down, "in", channels, geo.mlp_bias)],
    }


class ParameterCounter:
    """Parameters of the prunable decoder linears as a (differentiable) function of the masks."""

    def __init__(self, geo: ModelGeometry, refs: dict[str, list[SliceRef]]):
        self.geo = geo
        self.cost_per_group: dict[str, int] = {}
        for structure, structure_refs in refs.items():
            n = geo.num_groups(structure)
            cost = 0
            for ref in structure_refs:
                rows = ref.rows_per_group(n)
                cost += rows * geo.hidden_size
                if ref.side == "out" and ref.has_bias:
                    cost += rows
            self.cost_per_group[structure] = cost
        # Biases of o_proj/down_proj have the hidden width: prunable modules, unprunable entries.
        self.fixed_per_layer = geo.hidden_size * (int(geo.o_bias) + int(geo.mlp_bias))
        per_layer = self.fixed_per_layer + sum(self.cost_per_group[s] * geo.num_groups(s) for s in STRUCTURES)
        self.prunable_total = geo.num_layers * per_layer

    def structure_total(self, structure: str) -> int:
        """Prunable parameters of all groups of `structure` (every layer, nothing removed)."""
        return self.geo.num_layers * self.geo.num_groups(structure) * self.cost_per_group[structure]

    def remaining(self, masks: Masks) -> torch.Tensor:
        """Remaining prunable parameters, differentiable in the (soft or hard) masks.

        A structure missing from `masks` is fully kept, as in `kept_or_all`: its mask is all ones."""
        total = torch.tensor(float(self.geo.num_layers * self.fixed_per_layer))
        for structure in STRUCTURES:
            if structure in masks:
                kept = masks[structure].sum()
                total = total.to(kept.device) + kept * self.cost_per_group[structure]
            else:
                total = total + self.structure_total(structure)
        return total

    def remaining_from_kept(self, kept: Mapping[str, list[list[int]]]) -> int:
        """Remaining prunable parameters for kept group indices per structure and layer."""
        total = self.geo.num_layers * self.fixed_per_layer
        for structure in STRUCTURES:
            total += sum(map(len, kept_or_all(kept, structure, self.geo))) * self.cost_per_group[structure]
        return total

    def remaining_ratio(self, masks: Masks) -> torch.Tensor:
        return self.remaining(masks) / self.prunable_total
