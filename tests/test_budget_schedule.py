"""The budget schedule (axolotl_atp/training/budget_schedule.py) and how the controller follows it."""

from __future__ import annotations

import itertools

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from axolotl_atp.args import ATPConfig
from axolotl_atp.training.budget_schedule import ramp_steps, target_remaining_ratio
from axolotl_atp.training.controller import ATPController
from tests.kit import tiny_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("schedule", ["cubic", "linear"])
def test_target_ramps_from_dense_and_reaches_the_budget_at_the_configured_step(schedule):
    steps = ramp_steps(control_steps=40, ramp=0.75)
    assert steps == 30
    targets = [target_remaining_ratio(t, 0.4, steps, schedule) for t in range(60)]
    assert 0.95 < targets[0] < 1.0  # the first step asks for a little
    assert all(a >= b for a, b in itertools.pairwise(targets))  # never asks for more back
    assert targets[steps - 2] > 0.6
    assert targets[steps - 1] == pytest.approx(0.6)  # reached after `steps` steps...
    assert targets[-1] == pytest.approx(0.6)  # ...and held


def test_cubic_moves_fast_first_and_constant_asks_for_the_budget_at_once():
    cubic = [target_remaining_ratio(t, 0.5, 10, "cubic") for t in range(10)]
    linear = [target_remaining_ratio(t, 0.5, 10, "linear") for t in range(10)]
    assert all(c < lin for c, lin in zip(cubic[:-1], linear[:-1], strict=True))
    assert target_remaining_ratio(0, 0.5, 10, "constant") == 0.5


def peft_tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 64, num_hidden_layers=3, intermediate_size=96))
    return get_peft_model(model, LoraConfig(r=2, target_modules=TARGETS, lora_dropout=0.0))


def calibration(peft_model, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 16), generator=g)

    def loss():
        return peft_model(input_ids=ids, labels=ids).loss

    return loss


def run_control(ctl: ATPController, peft_model, steps: range) -> list[dict]:
    seen = []
    for step in steps:
        ctl.begin_step(step, calibration(peft_model, step))
        seen.append(dict(ctl.metrics))
    return seen


def test_generator_follows_the_schedule_and_the_freeze_changes_little():
    peft_model = peft_tiny()
    # MLP channels only: this tiny model's 2 KV heads per layer would make the per-layer minimum bind (the
    # generator may drop a layer's last head, which the freeze must put back at the cost of many channels).
    cfg = ATPConfig(prune_ratio=0.4, control_steps=40, generator_lr=1e-2, structures=["mlp_channels"])
    ctl = ATPController(peft_model, cfg, total_steps=50, peak_lr=1e-3, seed=0)
    assert ctl.ramp_steps == 20  # half of the control phase by default
    assert ctl.noise_scale(19) == 1.0 and 0 < ctl.noise_scale(30) < 1 and ctl.noise_scale(39) == 0.0
    metrics = run_control(ctl, peft_model, range(40))
    assert metrics[0]["atp/target_remaining_ratio"] > 0.9
    assert metrics[-1]["atp/target_remaining_ratio"] == pytest.approx(0.6)
    # The generator tracks the target in the hold phase.
    gaps = [abs(m["atp/remaining_ratio"] - m["atp/target_remaining_ratio"]) for m in metrics[25:]]
    assert sum(gaps) / len(gaps) < 0.03 and max(gaps) < 0.06, gaps
    ctl.begin_step(40, None)  # the freeze
    assert ctl.frozen
    fraction = ctl.metrics["atp/freeze_flip_fraction"]
    assert fraction == ctl.flips_at_freeze / ctl.num_groups_total
    assert fraction < 0.02, fraction


def test_constant_budget_without_annealing_leaves_the_freeze_far_from_the_last_sample():
    """The control for the test above: the old behaviour flips many groups at the freeze."""
    peft_model = peft_tiny()
    cfg = ATPConfig(
        prune_ratio=0.4, control_steps=40, generator_lr=1e-2, budget_schedule="constant", anneal_noise=False
    )
    ctl = ATPController(peft_model, cfg, total_steps=50, peak_lr=1e-3, seed=0)
    run_control(ctl, peft_model, range(40))
    ctl.begin_step(40, None)
    assert ctl.metrics["atp/freeze_flip_fraction"] > 0.1, ctl.metrics["atp/freeze_flip_fraction"]


def test_resuming_mid_schedule_gives_the_uninterrupted_result():
    cfg = ATPConfig(prune_ratio=0.3, control_steps=12, generator_lr=1e-2)
    model_a = peft_tiny()
    uninterrupted = ATPController(model_a, cfg, total_steps=20, peak_lr=1e-3, seed=3)
    run_control(uninterrupted, model_a, range(13))

    model_b = peft_tiny()
    first = ATPController(model_b, cfg, total_steps=20, peak_lr=1e-3, seed=3)
    run_control(first, model_b, range(6))  # killed in the ramp
    state = first.state_dict()
    first.masked.remove()  # the killed process's hooks are gone with it
    resumed = ATPController(model_b, cfg, total_steps=20, peak_lr=1e-3, seed=99)
    resumed.load_state_dict(state)
    run_control(resumed, model_b, range(6, 13))
    assert resumed.decision is not None and uninterrupted.decision is not None
    assert resumed.decision.kept == uninterrupted.decision.kept
    for a, b in zip(resumed.generator.parameters(), uninterrupted.generator.parameters(), strict=True):
        torch.testing.assert_close(a, b)
