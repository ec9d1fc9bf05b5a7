"""Mask churn in the control phase: how many group decisions the Gumbel noise alone flips between two
consecutive generator steps, against the flips the run logged (`atp/mask_flips`).

A group with noise-free score s (logit + offset) is kept by a sample when s + noise_scale * L >= 0, L standard
logistic, that is with probability p = sigmoid(s / noise_scale). Two independent samples from the same generator
disagree on it with probability 2p(1-p). The sum over the groups is the churn expected from the sampling alone,
with the generator standing still; where it matches the logged flips, the churn is the exploration the
Gumbel-sigmoid is built for, not the generator's logits walking.

The checkpoint's generator is one update past the sample the logged count ends on (a checkpoint is written after
the optimizer step whose generator update it holds), so the two agree only where the logits move slowly.

Reads checkpoints (`checkpoint-N` folders with `atp_state.pt` and `trainer_state.json`) of an ATP run:

    python benchmarks/mask_churn.py RUN_OUTPUT_DIR/checkpoint-30 ... [--offset 3.0] [--generator-num-heads 4]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from axolotl_atp.args import ATPConfig
from axolotl_atp.training.checkpoint_state import checkpoint_step, load_state
from axolotl_atp.training.generator import PruningDecisionGenerator, decision_scores


def restored_generator(state: dict, num_heads: int) -> PruningDecisionGenerator:
    """The generator of a checkpoint's ATP state, with its prior. Its width and depth are read off the weights;
    its attention-head count (which the weights' shapes do not show) is the run's `atp.generator_num_heads`."""
    weights = state["generator"]
    hidden = weights["layer_embeddings"].shape[1]
    layers = sum(1 for name in weights if name.startswith("encoder.layers.") and name.endswith(".linear1.weight"))
    generator = PruningDecisionGenerator(
        state["num_layers"], state["groups"], hidden_size=hidden, num_encoder_layers=layers, num_heads=num_heads
    )
    generator.load_state_dict(weights)
    generator.set_prior(state["generator_prior"])
    return generator.eval()


def expected_churn(scores: dict[str, torch.Tensor], noise_scale: float) -> tuple[float, int]:
    """(expected flips between two independent samples, groups) at `noise_scale`."""
    if noise_scale <= 0:
        return 0.0, sum(s.numel() for s in scores.values())
    flips, groups = 0.0, 0
    for score in scores.values():
        p = torch.sigmoid(score.double() / noise_scale)
        flips += float((2 * p * (1 - p)).sum())
        groups += score.numel()
    return flips, groups


def logged_row(checkpoint: Path, step: int) -> dict | None:
    """The trainer's logged metrics at `step` (the checkpoint's own log history)."""
    history = json.loads((checkpoint / "trainer_state.json").read_text()).get("log_history", [])
    rows = [r for r in history if r.get("step") == step and "atp/mask_flips" in r]
    return rows[-1] if rows else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", nargs="+", type=Path)
    defaults = ATPConfig()
    parser.add_argument("--offset", type=float, default=defaults.offset, help="the run's atp.offset")
    parser.add_argument("--generator-num-heads", type=int, default=defaults.generator_num_heads)
    args = parser.parse_args()
    print(
        "| checkpoint | noise scale | groups | expected flips (sampling alone) | logged flips | groups within 1 of 0 |"
    )
    print("|---|---|---|---|---|---|")
    for checkpoint in args.checkpoints:
        step = checkpoint_step(checkpoint)
        state = load_state(checkpoint)
        row = logged_row(checkpoint, step) if step is not None else None
        noise = float(row["atp/noise_scale"]) if row else 1.0
        with torch.no_grad():
            scores = decision_scores(restored_generator(state, args.generator_num_heads)(), args.offset)
        expected, groups = expected_churn(scores, noise)
        near = sum(int((s.abs() < 1).sum()) for s in scores.values())
        logged = f"{float(row['atp/mask_flips']):,.0f} ({float(row['atp/mask_flips']) / groups:.1%})" if row else "-"
        print(
            f"| {checkpoint.parent.name}/{checkpoint.name} | {noise:g} | {groups:,} | {expected:,.0f} ({expected / groups:.1%}) | {logged} "
            f"| {near:,} ({near / groups:.1%}) |"
        )


if __name__ == "__main__":
    main()
