"""The pruning-decision generator (PDG): a small network outside the LLM that emits one logit per group.

Learned per-layer embeddings go through a small transformer encoder (attention across the LLM's
layers), a LayerNorm, and one linear head per (layer, structure), plus an optional fixed prior (the
groups' static importance). The decision is a Gumbel-sigmoid
sample with a straight-through hard threshold.
"""

from __future__ import annotations

import torch
from torch import nn

from axolotl_atp.groups import Masks


class PruningDecisionGenerator(nn.Module):
    """Maps learned layer embeddings to logits `{structure: [num_layers, num_groups]}`."""

    def __init__(
        self,
        num_layers: int,
        groups_per_structure: dict[str, int],
        hidden_size: int = 64,
        num_encoder_layers: int = 2,
        num_heads: int = 4,
    ):
        super().__init__()
        self.layer_embeddings = nn.Parameter(torch.empty(num_layers, hidden_size))
        nn.init.orthogonal_(self.layer_embeddings)
        # No dropout: the decision noise is the Gumbel sample, and dropout would make it seed-dependent twice.
        encoder_layer = nn.TransformerEncoderLayer(
            hidden_size, num_heads, 4 * hidden_size, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(encoder_layer, num_encoder_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden_size)
        # One bias-free head per (layer, structure), stored as [layers, hidden, groups] for one einsum.
        self.heads = nn.ParameterDict(
            {
                name: nn.Parameter(torch.randn(num_layers, hidden_size, n) * hidden_size**-0.5 * 0.1)
                for name, n in groups_per_structure.items()
            }
        )

        # A fixed prior added to the logits (`generator_init: importance`); zeros for a random start. Saved with
        # the controller's state rather than in this module's state_dict.
        for name, n in groups_per_structure.items():
            self.register_buffer(f"prior_{name}", torch.zeros(num_layers, n), persistent=False)

    def prior(self) -> Masks:
        return {name: getattr(self, f"prior_{name}") for name in self.heads}

    def set_prior(self, prior: Masks) -> None:
        for name, value in prior.items():
            getattr(self, f"prior_{name}").copy_(value)

    def forward(self) -> Masks:
        hidden = self.norm(self.encoder(self.layer_embeddings.unsqueeze(0)).squeeze(0))
        prior = self.prior()
        return {name: torch.einsum("ld,ldn->ln", hidden, weight) + prior[name] for name, weight in self.heads.items()}


def gumbel_sigmoid(
    logits: torch.Tensor,
    temperature: float,
    offset: float,
    generator: torch.Generator | None = None,
    noise_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A relaxed Bernoulli sample: `(soft, hard_ste)`.

    `soft = sigmoid((z + noise_scale * noise + offset) / T)` with logistic noise (the difference of two
    Gumbels, which is what makes this a relaxed Bernoulli); `hard_ste` is `1[soft >= 0.5]` in the forward
    and has the gradient of `soft` in the backward. At `noise_scale` 0 the hard sample is the generator's
    deterministic decision (the noise is drawn all the same, so the random stream does not depend on it).
    """
    uniform = torch.rand(logits.shape, generator=generator, device="cpu").clamp(1e-6, 1 - 1e-6)
    noise = (torch.log(uniform) - torch.log1p(-uniform)).to(logits.device, logits.dtype) * noise_scale
    soft = torch.sigmoid((logits + noise + offset) / temperature)
    hard = (soft >= 0.5).to(soft.dtype)
    return soft, hard - soft.detach() + soft


def decision_scores(logits: Masks, offset: float) -> Masks:
    """Noise-free scores: a group is kept by the generator's own hard decision iff its score >= 0."""
    return {name: (value + offset).detach() for name, value in logits.items()}
