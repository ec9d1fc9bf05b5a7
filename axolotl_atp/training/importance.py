"""The generator's starting point: a static importance of every group (`generator_init: importance`).

Wanda-sp's criterion, per group: the sum over the group's input columns j of o_proj (a KV head with its
query heads) or down_proj (an MLP channel) of `sum_i |W_ij| * ||X_j||_2`, with `||X_j||` the norm of input
column j over the calibration tokens. Scores are standardised within each layer and structure: they rank
the groups of one layer and say nothing about how much each layer or structure should lose, which is left
to the generator and the budget.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from axolotl_atp.architectures import ArchitectureSpec
from axolotl_atp.groups import Masks, ModelGeometry, SliceRef, slice_refs
from axolotl_atp.peft_unwrap import base_layer_of, unwrap_base_model


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The weight of a Linear as fp32 [out, in]; a bitsandbytes 4-bit weight is dequantized."""
    weight = linear.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, state).float().reshape(linear.out_features, linear.in_features)
    return weight.detach().float()


def _input_ref(refs: list[SliceRef]) -> SliceRef:
    return next(ref for ref in refs if ref.side == "in")


@torch.no_grad()
def wanda_sp_scores(
    model: nn.Module,
    spec: ArchitectureSpec,
    geo: ModelGeometry,
    batches: Iterable[dict[str, Any]],
    structures: list[str],
) -> Masks:
    """Standardised Wanda-sp scores `{structure: [layers, groups]}` (higher = more important).

    `model` runs as it is (call it with the masks off and the adapter still zero, or disabled); `batches` are
    model inputs (labels are dropped).
    """
    refs = {s: _input_ref(slice_refs(spec, geo)[s]) for s in structures}
    layers = unwrap_base_model(model).get_submodule(spec.layers_path)
    sq_norms: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(layers):
        for structure, ref in refs.items():

            def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], key: tuple[str, int] = (structure, i)):
                x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
                sq_norms[key] = sq_norms.get(key, 0.0) + (x * x).sum(0)

            handles.append(layer.get_submodule(ref.module).register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()

    scores: Masks = {}
    for structure, ref in refs.items():
        n = geo.num_groups(structure)
        rows = []
        for i, layer in enumerate(layers):
            weight = dense_weight(base_layer_of(layer.get_submodule(ref.module)))
            column = (weight.abs() * sq_norms[(structure, i)].sqrt().to(weight.device)).sum(0).cpu()
            rows.append(torch.zeros(n).index_add_(0, ref.group_index, column))
        raw = torch.stack(rows)
        std = raw.std(1, keepdim=True) if n > 1 else torch.ones_like(raw)
        scores[structure] = (raw - raw.mean(1, keepdim=True)) / std.clamp_min(1e-12)
    return scores
