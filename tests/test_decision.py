"""The frozen decision (`decision.py`): the budget within its granularity, deterministic."""

from __future__ import annotations

import pytest
import torch

from axolotl_atp.decision import freeze_decision, stock_config_accepts_heads
from axolotl_atp.groups import HEADS, MLP, ParameterCounter, slice_refs
from tests.tiny_models import geometry, tiny


@pytest.mark.parametrize("family", ["llama", "llama_mha"])
@pytest.mark.parametrize("layout", ["per_layer", "uniform"])
@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_freeze_meets_budget_within_granularity(family, layout, ratio):
    model = tiny(family, num_hidden_layers=3)
    spec, geo = geometry(model)
    counter = ParameterCounter(geo, slice_refs(spec, geo))
    g = torch.Generator().manual_seed(5)
    scores = {s: torch.randn(geo.num_layers, geo.num_groups(s), generator=g) for s in (HEADS, MLP)}
    accept = stock_config_accepts_heads(geo) if layout == "uniform" else None
    decision = freeze_decision(
        scores, geo, counter, ratio, layout, {HEADS: 1, MLP: 8}, {HEADS: 1, MLP: 8}, accept_heads=accept
    )
    counts = decision.counts()
    achieved = 1 - counter.remaining_from_kept(decision.kept) / counter.prunable_total
    layers = geo.num_layers if layout == "uniform" else 1
    step = min(counter.cost_per_group[HEADS], 8 * counter.cost_per_group[MLP]) * layers
    assert ratio - 1e-9 <= achieved <= ratio + step / counter.prunable_total + 1e-9
    assert all(c % 8 == 0 or c == geo.intermediate_size for c in counts[MLP])
    assert all(c >= 1 for c in counts[HEADS])
    if layout == "uniform":
        assert len(set(counts[HEADS])) == 1 and len(set(counts[MLP])) == 1
        assert geo.hidden_size % (counts[HEADS][0] * geo.group_size) == 0
    # Deterministic: the same scores give the same decision.
    again = freeze_decision(scores, geo, counter, ratio, layout, {HEADS: 1, MLP: 8}, {HEADS: 1, MLP: 8}, accept)
    assert again.kept == decision.kept
    # The lowest-scoring channels go first within a layer.
    layer0 = scores[MLP][0]
    dropped = sorted(set(range(geo.intermediate_size)) - set(decision.kept[MLP][0]))
    if dropped:
        assert layer0[dropped].max() <= layer0[decision.kept[MLP][0]].min()
