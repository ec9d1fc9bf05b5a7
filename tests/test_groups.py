"""Pruning groups and the parameter count (`groups.py`) on tiny models of every family."""

from __future__ import annotations

import pytest

from axolotl_atp.decision import Decision
from axolotl_atp.groups import HEADS, MLP, ParameterCounter, slice_refs
from tests.tiny_models import FAMILIES, TARGETS, geometry, physically_pruned, random_kept, tiny


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_matches_sliced_model(family):
    model = tiny(family)
    spec, geo = geometry(model)
    counter = ParameterCounter(geo, slice_refs(spec, geo))
    # (the multimodal Gemma 3's vision tower has q/k/v_proj too: they are not prunable)
    prunable = [m for n, m in model.named_modules() if n.split(".")[-1] in TARGETS and "vision" not in n]
    assert counter.prunable_total == sum(p.numel() for m in prunable for p in m.parameters())
    kept = random_kept(geo, seed=1, uniform=True)
    small = physically_pruned(model, kept, spec, geo)
    small_prunable = [m for n, m in small.named_modules() if n.split(".")[-1] in TARGETS and "vision" not in n]
    assert counter.remaining_from_kept(kept) == sum(p.numel() for m in small_prunable for p in m.parameters())
    masks = Decision(kept=kept, geo=geo).masks()
    assert int(counter.remaining(masks)) == counter.remaining_from_kept(kept)


def test_qwen2_biases_are_counted_and_sliced():
    model = tiny("qwen2")
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    _, geo = geometry(model)
    assert geo.qkv_bias and not geo.o_bias


def test_a_structure_absent_from_a_decision_is_fully_kept():
    from axolotl_atp.groups import kept_indices, kept_or_all

    model = tiny("llama")
    spec, geo = geometry(model)
    kept = {MLP: [[0, 5], [1]]}
    assert kept_or_all(kept, MLP, geo) == [[0, 5], [1]]
    assert kept_or_all(kept, HEADS, geo) == [list(range(geo.num_kv_heads))] * geo.num_layers
    counter = ParameterCounter(geo, slice_refs(spec, geo))
    full_heads = {**kept, HEADS: kept_or_all(kept, HEADS, geo)}
    assert counter.remaining_from_kept(kept) == counter.remaining_from_kept(full_heads)
    masks = Decision(kept=kept, geo=geo).masks()
    assert int(counter.remaining(masks)) == counter.remaining_from_kept(kept)
    assert kept_indices(masks) == kept


def test_structure_names_are_spelled_once():
    from typing import get_args

    from axolotl_atp.args import ATPConfig
    from axolotl_atp.groups import STRUCTURES, Structure

    assert (HEADS, MLP) == STRUCTURES == get_args(Structure)
    assert get_args(ATPConfig.model_fields["structures"].annotation) == (Structure,)
