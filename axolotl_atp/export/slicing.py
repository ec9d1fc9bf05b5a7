"""Physical removal of pruned groups from one decoder layer's tensors."""

from __future__ import annotations

import torch

from axolotl_atp.groups import SliceRef


def kept_positions(ref: SliceRef, kept_groups: list[int]) -> torch.Tensor:
    """Row/column indices of `ref`'s matrix that belong to kept groups, in original order."""
    keep = torch.zeros(int(ref.group_index.max()) + 1, dtype=torch.bool)
    keep[torch.tensor(kept_groups, dtype=torch.long)] = True
    return torch.nonzero(keep[ref.group_index]).flatten()


def slice_layer(
    tensors: dict[str, torch.Tensor], refs: dict[str, list[SliceRef]], kept: dict[str, list[int]]
) -> dict[str, torch.Tensor]:
    """Drop pruned rows/columns from a layer's tensors (keys relative to the layer, e.g. `mlp.up_proj.weight`)."""
    out = dict(tensors)
    for structure, structure_refs in refs.items():
        if structure not in kept:
            continue
        for ref in structure_refs:
            idx = kept_positions(ref, kept[structure])
            weight_key = f"{ref.module}.weight"
            if ref.side == "out":
                out[weight_key] = out[weight_key].index_select(0, idx)
                if f"{ref.module}.bias" in out:
                    out[f"{ref.module}.bias"] = out[f"{ref.module}.bias"].index_select(0, idx)
            else:
                out[weight_key] = out[weight_key].index_select(1, idx)
    return out
