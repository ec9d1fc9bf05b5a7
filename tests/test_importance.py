"""The generator's importance prior (axolotl_atp/training/importance.py), on tiny models."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from axolotl_atp.args import ATPConfig
from axolotl_atp.decision import freeze_decision
from axolotl_atp.groups import HEADS, MLP
from axolotl_atp.training.controller import ATPController
from axolotl_atp.training.importance import wanda_sp_scores
from tests.tiny_models import TARGETS, geometry, tiny


def batches(n: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (2, 10), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def expected_scores(model, geo, inputs) -> dict[str, torch.Tensor]:
    """Independently: the inputs of every o_proj and down_proj, |W| weighted by their column norms, summed per
    KV head (its query heads' columns are contiguous) or per channel, standardised per layer."""
    seen: dict[tuple[str, int], list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for name, module in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):
            handles.append(
                module.register_forward_pre_hook(lambda _m, x, key=(name, i): seen.setdefault(key, []).append(x[0]))
            )
    with torch.no_grad():
        for b in inputs:
            model(input_ids=b["input_ids"])
    for h in handles:
        h.remove()
    raw = {HEADS: [], MLP: []}
    for i, layer in enumerate(model.model.layers):
        for structure, name, weight, width in (
            (HEADS, "o", layer.self_attn.o_proj.weight, geo.group_size * geo.head_dim),
            (MLP, "down", layer.mlp.down_proj.weight, 1),
        ):
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[(name, i)]])
            column = (weight.abs() * x.norm(dim=0)).sum(0)
            raw[structure].append(column.view(-1, width).sum(1))
    out = {}
    for s, rows in raw.items():
        v = torch.stack(rows)
        out[s] = (v - v.mean(1, keepdim=True)) / v.std(1, keepdim=True)
    return out


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_scores_are_activation_weighted_column_norms_per_group(family):
    model = tiny(family, seed=1)
    spec, geo = geometry(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=TARGETS, lora_dropout=0.0))
    inputs = batches()
    peft_model.train()
    scores = wanda_sp_scores(peft_model, spec, geo, inputs, [HEADS, MLP])
    assert peft_model.training  # back in the mode it was in
    expected = expected_scores(peft_model.get_base_model(), geo, inputs)
    for s in (HEADS, MLP):
        assert scores[s].shape == (geo.num_layers, geo.num_groups(s))
        torch.testing.assert_close(scores[s], expected[s], rtol=1e-4, atol=1e-4)


def test_the_prior_ranks_dead_channels_last_and_is_kept_across_a_resume():
    """Channels 48..95 write nothing (zero down_proj columns): with the importance prior, the generator's very
    first decision already removes them before any live channel; the prior survives a save and restore."""
    model = tiny("llama", seed=3, num_hidden_layers=2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, 48:] = 0.0
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=TARGETS, lora_dropout=0.0))
    spec, geo = geometry(model)
    cfg = ATPConfig(prune_ratio=0.2, structures=["mlp_channels"], importance_scale=2.0)
    scores = wanda_sp_scores(peft_model, spec, geo, batches(), [MLP])
    assert (scores[MLP][:, 48:].max(1).values < scores[MLP][:, :48].min(1).values).all()

    ctl = ATPController(peft_model, cfg, total_steps=10, peak_lr=1e-3, seed=0)
    random_start = ctl.scores()[MLP]
    ctl.set_importance_prior(scores)
    torch.testing.assert_close(ctl.scores()[MLP], random_start + 2.0 * scores[MLP])
    decision = ctl.freeze()
    for kept in decision.kept[MLP]:
        assert set(range(48)) <= set(kept) and len(kept) < 96  # only dead channels removed

    fresh = ATPController(peft_model, cfg, total_steps=10, peak_lr=1e-3, seed=0)
    fresh.load_state_dict(ctl.state_dict())
    torch.testing.assert_close(fresh.scores()[MLP], ctl.scores()[MLP])
    # A state written before the prior existed restores a generator without one.
    old = {k: v for k, v in ctl.state_dict().items() if k != "generator_prior"}
    older = ATPController(peft_model, cfg, total_steps=10, peak_lr=1e-3, seed=0)
    older.load_state_dict(old)
    torch.testing.assert_close(older.scores()[MLP], random_start)


def test_a_prior_centred_on_the_budget_quantile_removes_the_budget_at_offset_zero():
    """`importance_centre: budget`: the prior is negative on exactly the least important fraction of each layer's
    channels that meets the budget when the MLP carries it alone, whatever the scale."""
    model = tiny("llama", seed=5, num_hidden_layers=2)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=TARGETS, lora_dropout=0.0))
    spec, geo = geometry(model)
    scores = wanda_sp_scores(peft_model, spec, geo, batches(), [MLP])
    for scale in (1.0, 30.0):
        cfg = ATPConfig(prune_ratio=0.2, importance_scale=scale, importance_centre="budget")
        ctl = ATPController(peft_model, cfg, total_steps=10, peak_lr=1e-3, seed=0)
        q = ctl.budget_quantile([MLP])
        mlp_cost = geo.num_layers * geo.num_groups(MLP) * ctl.counter.cost_per_group[MLP]
        assert q == pytest.approx(0.2 * ctl.counter.prunable_total / mlp_cost)
        ctl.set_importance_prior(scores)
        prior = ctl.generator.prior()[MLP]
        removed = (prior < 0).sum(1)
        expected = q * geo.num_groups(MLP)
        assert ((removed - expected).abs() <= 1).all(), (removed, expected)
        # The order within each layer is the importance order.
        order = prior.argsort(1)
        assert torch.equal(order, scores[MLP].argsort(1))
    # The mean centre (the default) is the plain standardised score.
    ctl = ATPController(
        peft_model, ATPConfig(prune_ratio=0.2, importance_scale=2.0), total_steps=10, peak_lr=1e-3, seed=0
    )
    ctl.set_importance_prior(scores)
    torch.testing.assert_close(ctl.generator.prior()[MLP], 2.0 * scores[MLP])


def test_a_prior_centred_on_the_global_budget_quantile_leans_towards_the_static_decision():
    """`importance_centre: global`: one zero for all layers, so the prior keeps Wanda-sp's ranking across layers. With
    the generator's own logits at zero and the offset at 0, the freeze gives the static decision (two-stage's, its
    per-layer widths included), and the groups below zero are the ones it removes."""
    model = tiny("llama", seed=5, num_hidden_layers=3)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=TARGETS, lora_dropout=0.0))
    spec, geo = geometry(model)
    scores = wanda_sp_scores(peft_model, spec, geo, batches(), [MLP])
    cfg = ATPConfig(
        prune_ratio=0.2, structures=["mlp_channels"], importance_scale=7.0, importance_centre="global", offset=0.0
    )
    ctl = ATPController(peft_model, cfg, total_steps=10, peak_lr=1e-3, seed=0)
    with torch.no_grad():
        for weight in ctl.generator.heads.values():
            weight.zero_()
    ctl.set_importance_prior(scores)
    prior = ctl.generator.prior()[MLP]
    # One centre: the prior is the scores less a constant, times the scale.
    torch.testing.assert_close(prior - 7.0 * scores[MLP], (prior - 7.0 * scores[MLP])[0, 0].expand_as(prior))
    static = freeze_decision(
        scores,
        geo,
        ctl.counter,
        0.2,
        "per_layer",
        round_to={MLP: cfg.mlp_round_to},
        minimum={MLP: cfg.min_mlp_channels_per_layer},
    )
    prior_decision = ctl.freeze()
    assert prior_decision.kept[MLP] == static.kept[MLP]
    removed = sum(geo.num_groups(MLP) - len(k) for k in static.kept[MLP])
    assert abs(int((prior < 0).sum()) - removed) <= 1
    # The widths differ across layers: a per-layer centre (`budget`) would remove the same count from each.
    assert len({len(k) for k in static.kept[MLP]}) > 1
