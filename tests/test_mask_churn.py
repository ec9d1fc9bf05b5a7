"""The mask-churn analysis (`benchmarks/mask_churn.py`): the generator it restores from a checkpoint's ATP state is
the run's, and the expected flips are those of two independent Gumbel-sigmoid samples."""

from __future__ import annotations

import torch

from axolotl_atp.args import ATPConfig
from axolotl_atp.training.checkpoint_state import load_state, save_state
from axolotl_atp.training.controller import ATPController
from axolotl_atp.training.generator import gumbel_sigmoid
from benchmarks.mask_churn import expected_churn, restored_generator
from tests.tiny_models import lora_model


def test_restored_generator_gives_the_runs_logits_prior_included(tmp_path):
    cfg = ATPConfig(prune_ratio=0.3, generator_num_heads=2, generator_num_layers=1)
    ctl = ATPController(lora_model("llama"), cfg, total_steps=10, peak_lr=1e-3, seed=5)
    prior = {s: torch.randn(ctl.geo.num_layers, ctl.geo.num_groups(s)) for s in ctl.structures}
    ctl.generator.set_prior(prior)
    save_state(ctl.state_dict(), tmp_path)
    restored = restored_generator(load_state(tmp_path), num_heads=2)
    with torch.no_grad():
        expected, found = ctl.generator.eval()(), restored()
    assert set(found) == set(expected)
    for s in expected:
        torch.testing.assert_close(found[s], expected[s])
        assert found[s].abs().max() > 0.5  # the prior is in the logits


def test_expected_churn_is_the_disagreement_of_two_independent_samples():
    scores = {"mlp_channels": torch.linspace(-4, 4, 2001).reshape(1, -1)}
    expected, groups = expected_churn(scores, noise_scale=1.0)
    assert groups == 2001
    g = torch.Generator().manual_seed(0)
    logits, offset = scores["mlp_channels"] - 3.0, 3.0  # scores are logits plus the offset
    trials = [
        float((gumbel_sigmoid(logits, 0.4, offset, g)[1] != gumbel_sigmoid(logits, 0.4, offset, g)[1]).sum())
        for _ in range(200)
    ]
    assert abs(sum(trials) / len(trials) - expected) < 0.02 * expected
    # Without noise the decision is deterministic; far from the threshold nothing flips.
    assert expected_churn(scores, noise_scale=0.0)[0] == 0.0
    assert expected_churn({"x": torch.full((2, 3), 30.0)}, noise_scale=1.0)[0] < 1e-9
