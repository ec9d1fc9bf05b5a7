"""Group lasso on the LoRA slices of pruned groups.

The slice of a group is joint across the coupled matrices: for MLP channel j, row j of the gate and
up `lora_B` and column j of the down `lora_A`; for an attention group, its rows of the q/k/v
`lora_B` and its columns of the o_proj `lora_A`. Once these slices are zero, the LoRA-aware forward,
the masked forward and the physically pruned model compute the same function.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from axolotl_atp.groups import Masks, ModelGeometry, SliceRef
from axolotl_atp.peft_unwrap import unwrap_base_model


@dataclass(frozen=True)
class LoraSlice:
    """The rows (dim 0 of `lora_B`) or columns (dim 1 of `lora_A`) of one LoRA matrix in one layer."""

    layer: int
    structure: str
    weight: nn.Parameter
    dim: int
    group_index: torch.Tensor


def lora_weights(module: nn.Module, side: str) -> list[nn.Parameter]:
    """The LoRA matrices of a PEFT layer whose slices belong to groups (none for a plain Linear)."""
    factors = getattr(module, "lora_B" if side == "out" else "lora_A", None)
    if not isinstance(factors, nn.ModuleDict):
        return []
    return [factors[name].weight for name in factors]


def ramp(progress: float) -> float:
    """Threshold growth from 0 (start) to 1 (end): (e^p - 1) / (e - 1), slow first, fast at the end."""
    p = min(max(progress, 0.0), 1.0)
    return (math.exp(p) - 1.0) / (math.e - 1.0)


class GroupLasso:
    """Norms, penalty and proximal step over the LoRA slices of every group of a model."""

    def __init__(self, model: nn.Module, refs: dict[str, list[SliceRef]], geo: ModelGeometry, layers_path: str):
        self.geo = geo
        self.slices: list[LoraSlice] = []
        layers = unwrap_base_model(model).get_submodule(layers_path)
        for layer_idx, layer in enumerate(layers):
            for structure, structure_refs in refs.items():
                for ref in structure_refs:
                    for weight in lora_weights(layer.get_submodule(ref.module), ref.side):
                        dim = 0 if ref.side == "out" else 1
                        index = ref.group_index.to(weight.device)
                        self.slices.append(LoraSlice(layer_idx, structure, weight, dim, index))

    def _squared_norms(self, structures: list[str]) -> Masks:
        """Squared joint norm of every group: {structure: [layers, groups]} (differentiable)."""
        device = self.slices[0].weight.device if self.slices else torch.device("cpu")
        rows: dict[str, list[torch.Tensor]] = {
            s: [torch.zeros(self.geo.num_groups(s), device=device) for _ in range(self.geo.num_layers)]
            for s in structures
        }
        for sl in self.slices:
            if sl.structure in rows:
                per_row = sl.weight.float().pow(2).sum(dim=1 - sl.dim)
                grouped = torch.zeros(self.geo.num_groups(sl.structure), device=per_row.device)
                grouped = grouped.index_add(0, sl.group_index, per_row)
                rows[sl.structure][sl.layer] = rows[sl.structure][sl.layer] + grouped.to(device)
        return {s: torch.stack(r) for s, r in rows.items()}

    @torch.no_grad()
    def pruned_norm(self, masks: Masks) -> float:
        """Sum of the joint L2 norms of the pruned groups' slices (0 when training is mergeable)."""
        sq = self._squared_norms(list(masks))
        return float(sum((sq[s].sqrt() * (masks[s].to(sq[s].device) < 0.5)).sum() for s in masks))

    def penalty(self, masks: Masks) -> torch.Tensor:
        """Paper-era group-lasso term: mean over (layer, structure) of the pruned groups' norm sums."""
        sq = self._squared_norms(list(masks))
        total = sum(((sq[s] + 1e-12).sqrt() * (masks[s].to(sq[s].device) < 0.5)).sum() for s in masks)
        return total / max(1, self.geo.num_layers * len(masks))

    @torch.no_grad()
    def prox(self, masks: Masks, threshold: float) -> None:
        """Block soft-threshold: w_g <- w_g * max(0, 1 - threshold/||w_g||) on pruned groups only."""
        if threshold <= 0 or not self.slices:
            return
        sq = self._squared_norms(list(masks))
        factors = {}
        for s, mask in masks.items():
            norm = sq[s].sqrt()
            shrink = (1.0 - threshold / norm.clamp_min(1e-20)).clamp_min(0.0)
            factors[s] = torch.where(mask.to(norm.device) < 0.5, shrink, torch.ones_like(shrink))
        for sl in self.slices:
            if sl.structure not in factors:
                continue
            f = factors[sl.structure][sl.layer].to(sl.weight.device)[sl.group_index].to(sl.weight.dtype)
            sl.weight.mul_(f.unsqueeze(1) if sl.dim == 0 else f.unsqueeze(0))


# ----- the paper-era `group_lasso: loss` mode ------------------------------------------------------
def add_group_lasso_to_loss(trainer: Any, callback: Any) -> None:
    """Wrap `trainer.compute_loss` (composes with other plugins' trainer classes, unlike a subclass)."""
    compute_loss = trainer.compute_loss

    @functools.wraps(compute_loss)
    def with_group_lasso(model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None):
        result = compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        controller = callback.controller
        if controller is None or not model.training:
            return result
        penalty = controller.penalty()
        # compat(transformers 5.16): the HF Trainer divides the returned loss by the accumulation steps only when the model does not
        # normalise it over the whole accumulated batch itself (nor a `compute_loss_func`, as distillation's,
        # does); otherwise the term must be divided here, once per micro-batch.
        trainer_divides = (
            not getattr(trainer, "model_accepts_loss_kwargs", False) or num_items_in_batch is None
        ) and getattr(trainer, "compute_loss_func", None) is None
        if not trainer_divides:
            penalty = penalty / trainer.current_gradient_accumulation_steps
        controller.metrics["atp/group_lasso_penalty"] = float(penalty.detach())
        if return_outputs:
            loss, outputs = result
            return loss + penalty.to(loss.device), outputs
        return result + penalty.to(result.device)

    trainer.compute_loss = with_group_lasso
