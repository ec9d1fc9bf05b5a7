"""The group lasso on the LoRA slices of pruned groups (`training/group_lasso.py`)."""

from __future__ import annotations

import itertools

import torch

from axolotl_atp.decision import Decision
from axolotl_atp.groups import slice_refs
from axolotl_atp.training.group_lasso import GroupLasso
from tests.tiny_models import geometry, lora_model, random_kept


def test_prox_zeroes_pruned_and_keeps_kept_slices():
    peft_model = lora_model("llama")
    spec, geo = geometry(peft_model.get_base_model())
    masks = Decision(kept=random_kept(geo, 4, uniform=False), geo=geo).masks()
    lasso = GroupLasso(peft_model, slice_refs(spec, geo), geo, spec.layers_path)
    before = [sl.weight.detach().clone() for sl in lasso.slices]
    norms = [lasso.pruned_norm(masks)]
    for _ in range(200):
        lasso.prox(masks, 0.05)
        norms.append(lasso.pruned_norm(masks))
    assert norms[-1] == 0.0
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(norms))
    for sl, old in zip(lasso.slices, before, strict=True):
        kept = masks[sl.structure][sl.layer][sl.group_index] >= 0.5
        new = sl.weight.detach()
        if sl.dim == 0:
            assert torch.equal(new[kept], old[kept]) and (new[~kept] == 0).all()
        else:
            assert torch.equal(new[:, kept], old[:, kept]) and (new[:, ~kept] == 0).all()
