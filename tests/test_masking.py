"""The mask hooks (`masking.py`): LoRA-aware, full and physically removed agree."""

from __future__ import annotations

import copy

import pytest
import torch

from axolotl_atp.decision import Decision
from axolotl_atp.groups import slice_refs
from axolotl_atp.masking import MaskedModel, MaskMode
from axolotl_atp.training.group_lasso import GroupLasso
from tests.tiny_models import FAMILIES, geometry, lora_model, physically_pruned, random_kept


@pytest.mark.parametrize("family", FAMILIES)
def test_gate_equivalence_lora_aware_masked_and_removed(family):
    """With hard masks and zeroed pruned LoRA slices: LoRA-aware == masked == physically removed."""
    peft_model = lora_model(family)
    spec, geo = geometry(peft_model.get_base_model())
    kept = random_kept(geo, seed=2, uniform=True)
    masks = Decision(kept=kept, geo=geo).masks()
    lasso = GroupLasso(peft_model, slice_refs(spec, geo), geo, spec.layers_path)
    assert lasso.pruned_norm(masks) > 0
    lasso.prox(masks, float("inf"))
    assert lasso.pruned_norm(masks) == 0.0
    ids = torch.randint(0, 64, (2, 12))
    masked = MaskedModel(peft_model, spec, geo)
    with torch.no_grad():
        masked.set_masks(masks, MaskMode.LORA_AWARE)
        lora_aware = peft_model(input_ids=ids).logits
        masked.set_masks(masks, MaskMode.FULL)
        full = peft_model(input_ids=ids).logits
        masked.set_masks(masks, MaskMode.OFF)
        unmasked = peft_model(input_ids=ids).logits
        masked.remove()
        merged = copy.deepcopy(peft_model).merge_and_unload()
        removed = physically_pruned(merged, kept, spec, geo)(input_ids=ids).logits
    tol = 1e-4
    assert (lora_aware - full).abs().max() < tol
    assert (full - removed).abs().max() < tol
    assert (unmasked - full).abs().max() > 1e-2  # the masks really change the function


def test_lora_aware_masks_base_not_lora():
    """Before the prox, LoRA-aware differs from full masking: the LoRA path of pruned groups still flows."""
    peft_model = lora_model("llama")
    spec, geo = geometry(peft_model.get_base_model())
    masks = Decision(kept=random_kept(geo, 3, uniform=False), geo=geo).masks()
    masked = MaskedModel(peft_model, spec, geo)
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        masked.set_masks(masks, MaskMode.LORA_AWARE)
        a = peft_model(input_ids=ids).logits
        masked.set_masks(masks, MaskMode.FULL)
        b = peft_model(input_ids=ids).logits
    assert (a - b).abs().max() > 1e-3
