"""The frozen decision (`decision.py`): the budget within its granularity, deterministic."""

from __future__ import annotations

import pytest
import torch

from axolotl_atp.decision import budget_split, freeze_decision, rechoose_within_layers, stock_config_accepts_heads
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


def test_a_structure_left_whole_by_the_last_masks_stays_whole_when_the_freeze_closes_the_gap():
    """The generator kept every KV head and removed channels short of the budget. Its head scores are all below its
    channel scores (another generator head, no prior): ranked across structures, the freeze would remove heads
    first; with the split of the last masks it takes the gap from the channels and keeps the heads."""
    model = tiny("llama", num_hidden_layers=3)
    spec, geo = geometry(model)
    counter = ParameterCounter(geo, slice_refs(spec, geo))
    g = torch.Generator().manual_seed(0)
    scores = {HEADS: torch.rand(geo.num_layers, geo.num_groups(HEADS), generator=g) + 0.5}
    scores[MLP] = torch.rand(geo.num_layers, geo.num_groups(MLP), generator=g) + 1.0
    scores[MLP][:, :16] -= 3.0  # the channels the last masks removed
    last = {HEADS: torch.ones_like(scores[HEADS]), MLP: (scores[MLP] >= 0).float()}
    ratio = 0.3
    assert counter.remaining_ratio(last) > 1 - ratio + 0.05  # the last masks miss the budget
    args = (scores, geo, counter, ratio, "per_layer", {HEADS: 1, MLP: 8}, {HEADS: 1, MLP: 8})

    ranked_together = freeze_decision(*args)
    assert min(ranked_together.counts()[HEADS]) < geo.num_groups(HEADS)  # raw scores: heads go first

    split = budget_split(last, counter, ratio)
    assert split[HEADS] == geo.num_layers * geo.num_groups(HEADS) * counter.cost_per_group[HEADS]
    decision = freeze_decision(*args, structure_targets=split)
    assert decision.counts()[HEADS] == [geo.num_groups(HEADS)] * geo.num_layers
    achieved = 1 - counter.remaining_from_kept(decision.kept) / counter.prunable_total
    assert ratio - 1e-9 <= achieved <= ratio + 8 * counter.cost_per_group[MLP] / counter.prunable_total + 1e-9
    for layer in range(geo.num_layers):  # the removed channels are still the lowest-scoring ones
        assert not set(range(16)) & set(decision.kept[MLP][layer])


def test_the_budget_split_shares_the_gap_as_the_last_masks_share_the_removal():
    model = tiny("llama", num_hidden_layers=3)
    spec, geo = geometry(model)
    counter = ParameterCounter(geo, slice_refs(spec, geo))
    dense = {s: torch.ones(geo.num_layers, geo.num_groups(s)) for s in (HEADS, MLP)}
    assert budget_split(dense, counter, 0.3) is None  # nothing removed: no split to keep
    last = {s: m.clone() for s, m in dense.items()}
    last[HEADS][0, 0] = 0.0
    last[MLP][:, :8] = 0.0
    cost = counter.cost_per_group
    removed = {HEADS: cost[HEADS], MLP: 8 * geo.num_layers * cost[MLP]}
    for ratio in (0.2, 0.01):  # a gap to close, and masks that removed more than the budget asks
        split = budget_split(last, counter, ratio)
        full = {s: geo.num_layers * geo.num_groups(s) * cost[s] for s in (HEADS, MLP)}
        gap = float(counter.remaining(last)) - (1 - ratio) * counter.prunable_total
        assert sum(split.values()) == pytest.approx(sum(full.values()) - sum(removed.values()) - gap)
        assert (full[HEADS] - removed[HEADS] - split[HEADS]) / (full[MLP] - removed[MLP] - split[MLP]) == (
            pytest.approx(removed[HEADS] / removed[MLP])
        )


def test_rechoosing_within_layers_keeps_each_layers_count_and_takes_the_top_scores():
    """`freeze_channels: importance`: the generator's decision sets each layer's width; the importance chooses which
    channels fill it. The other structure is left as it was."""
    model = tiny("llama", num_hidden_layers=3)
    spec, geo = geometry(model)
    counter = ParameterCounter(geo, slice_refs(spec, geo))
    g = torch.Generator().manual_seed(1)
    scores = {s: torch.randn(geo.num_layers, geo.num_groups(s), generator=g) for s in (HEADS, MLP)}
    decision = freeze_decision(scores, geo, counter, 0.3, "per_layer", {HEADS: 1, MLP: 8}, {HEADS: 1, MLP: 8})
    importance = torch.randn(geo.num_layers, geo.num_groups(MLP), generator=g)
    rechosen = rechoose_within_layers(decision, MLP, importance)
    assert rechosen.counts() == decision.counts()
    assert rechosen.kept[HEADS] == decision.kept[HEADS]
    for layer, kept in enumerate(rechosen.kept[MLP]):
        dropped = sorted(set(range(geo.num_groups(MLP))) - set(kept))
        if dropped:
            assert importance[layer, kept].min() > importance[layer, dropped].max()
    assert rechosen.kept[MLP] != decision.kept[MLP]  # random scores: the two choices differ
