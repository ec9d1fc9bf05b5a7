"""The frozen pruning decision: deterministic, and meeting the budget up to the rounding granularity.

Scores are the generator's noise-free logits plus offset (no random sample, unlike the reference
code). Groups are removed greedily, the lowest-scoring removable block first, until the remaining
prunable parameters are at or below the target; the overshoot is below the smallest block. A block respects
the layout (`uniform`: the same count removed from every layer), the rounding multiple and the per-layer
minimum.

Scores of different structures come from different generator heads (and the importance prior adds to some
only), so they are not on one scale. With `structure_targets` (the parameters each structure should keep), the
removal first reaches each structure's own target ranking its groups only against each other; only what is left
of the budget after that (less than one block of each structure) is ranked across structures.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from axolotl_atp.groups import HEADS, STRUCTURES, Masks, ModelGeometry, ParameterCounter, kept_or_all


class BudgetError(ValueError):
    """The target ratio cannot be met under the per-layer minimum and rounding."""


@dataclass
class Decision:
    """Kept group indices per structure and layer, in the original indexing."""

    kept: dict[str, list[list[int]]]
    geo: ModelGeometry
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, list[int]]:
        return {s: [len(k) for k in layers] for s, layers in self.kept.items()}

    def masks(self, device: torch.device | str = "cpu") -> Masks:
        out = {}
        for s, layers in self.kept.items():
            mask = torch.zeros(self.geo.num_layers, self.geo.num_groups(s), device=device)
            for layer, idx in enumerate(layers):
                mask[layer, idx] = 1.0
            out[s] = mask
        return out

    def kept_groups(self, structure: str) -> list[list[int]]:
        """Kept group indices per layer; all of them for a structure this decision does not prune."""
        return kept_or_all(self.kept, structure, self.geo)


def allowed_counts(n: int, round_to: int, minimum: int, accept: Callable[[int], bool] | None = None) -> list[int]:
    """Kept counts a layer may have, largest first: n itself, or multiples of `round_to` >= minimum."""
    counts = [n] + [k for k in range((n - 1) // round_to * round_to, 0, -round_to) if k >= minimum and k < n]
    if accept is not None:
        counts = [k for k in counts if k == n or accept(k)]
    return counts


@dataclass
class _Track:
    """A sequence of removal steps that must be taken in order (one structure of one layer, or of all)."""

    structure: str
    layers: list[int]
    counts: list[int]
    order: list[torch.Tensor]  # per layer in `layers`: group indices by descending score
    scores: list[torch.Tensor]  # per layer: scores in that order
    position: int = 0

    def next_step(self) -> tuple[float, int] | None:
        """(mean score of the groups removed next, groups removed per layer), or None when exhausted."""
        if self.position + 1 >= len(self.counts):
            return None
        hi, lo = self.counts[self.position], self.counts[self.position + 1]
        removed = torch.cat([s[lo:hi] for s in self.scores])
        return float(removed.mean()), hi - lo


def freeze_decision(
    scores: Masks,
    geo: ModelGeometry,
    counter: ParameterCounter,
    prune_ratio: float,
    layout: str,
    round_to: dict[str, int],
    minimum: dict[str, int],
    accept_heads: Callable[[int], bool] | None = None,
    structure_targets: Mapping[str, float] | None = None,
) -> Decision:
    """The deterministic decision for `scores` ({structure: [layers, groups]}; higher = more important).

    `structure_targets`: {structure: prunable parameters of its groups to keep}, reached first within each
    structure (see the module docstring); `budget_split` gives the split of a last trained decision."""
    tracks: list[_Track] = []
    for structure in STRUCTURES:
        n = geo.num_groups(structure)
        if structure not in scores:
            continue
        accept = accept_heads if (structure == HEADS and layout == "uniform") else None
        counts = allowed_counts(n, round_to.get(structure, 1), minimum.get(structure, 1), accept)
        groups = (
            [[layer] for layer in range(geo.num_layers)] if layout == "per_layer" else [list(range(geo.num_layers))]
        )
        for layers in groups:
            sorted_scores, order = [], []
            for layer in layers:
                s, o = torch.sort(scores[structure][layer].detach().float().cpu(), descending=True, stable=True)
                sorted_scores.append(s)
                order.append(o)
            tracks.append(_Track(structure, layers, counts, order, sorted_scores))

    def cost(candidate: tuple[tuple[float, int], _Track]) -> int:
        (_, removed), track = candidate
        return removed * len(track.layers) * counter.cost_per_group[track.structure]

    target = (1.0 - prune_ratio) * counter.prunable_total
    remaining = counter.prunable_total
    for structure, structure_target in (structure_targets or {}).items():
        own = [t for t in tracks if t.structure == structure]
        kept = counter.structure_total(structure)
        while remaining > target:  # the lowest-scoring step of this structure that stays at or above its target
            fitting = [
                (step, t)
                for t in own
                if (step := t.next_step()) is not None and kept - cost((step, t)) >= structure_target
            ]
            if not fitting:
                break
            chosen = min(fitting, key=lambda c: c[0][0])
            chosen[1].position += 1
            kept -= cost(chosen)
            remaining -= cost(chosen)
    while remaining > target:
        candidates = [(step, t) for t in tracks if (step := t.next_step()) is not None]
        if not candidates:
            raise BudgetError(
                f"prune_ratio = {prune_ratio} cannot be met: even at the per-layer minimum and rounding, "
                f"{remaining / counter.prunable_total:.3f} of the prunable parameters remain. Fix: lower "
                "atp.prune_ratio, lower atp.min_heads_per_layer / atp.min_mlp_channels_per_layer, or add "
                "a structure to atp.structures."
            )

        # Lowest score first among the steps that do not overshoot the target; once none fits, the
        # cheapest step, so the overshoot stays below the smallest step.
        fitting = [c for c in candidates if remaining - cost(c) >= target]
        chosen = min(fitting, key=lambda c: c[0][0]) if fitting else min(candidates, key=lambda c: (cost(c), c[0][0]))
        chosen[1].position += 1
        remaining -= cost(chosen)

    kept: dict[str, list[list[int]]] = {
        s: [list(range(geo.num_groups(s))) for _ in range(geo.num_layers)] for s in scores
    }
    for track in tracks:
        count = track.counts[track.position]
        for layer, order in zip(track.layers, track.order, strict=True):
            kept[track.structure][layer] = sorted(order[:count].tolist())
    notes = []
    if accept_heads is not None and layout == "uniform" and HEADS in scores:
        notes.append("uniform layout: head counts limited to those a stock config accepts")
    return Decision(kept=kept, geo=geo, notes=notes)


def rechoose_within_layers(decision: Decision, structure: str, scores: torch.Tensor) -> Decision:
    """`decision` with each layer of `structure` keeping its highest-`scores` groups ([layers, groups]; higher = more
    important), as many as the decision keeps there: the per-layer counts, and so the budget, the rounding and the
    other structures, are unchanged (`freeze_channels: importance`)."""
    layers = []
    for layer, kept in enumerate(decision.kept[structure]):
        order = torch.sort(scores[layer].detach().float().cpu(), descending=True, stable=True).indices
        layers.append(sorted(order[: len(kept)].tolist()))
    notes = [*decision.notes, f"{structure}: each layer keeps its highest-importance groups at the decision's count"]
    return Decision(kept={**decision.kept, structure: layers}, geo=decision.geo, notes=notes)


def budget_split(masks: Masks, counter: ParameterCounter, prune_ratio: float) -> dict[str, float] | None:
    """`structure_targets` for a freeze that lands near `masks` (the hard masks last trained with): the budget's
    gap to what `masks` keep is shared among the structures as `masks` already share the removal (a structure the
    generator left whole stays whole while another can take the gap). None when `masks` remove nothing: there is
    no split to keep, and the freeze ranks across structures."""
    kept = {s: float(mask.sum()) * counter.cost_per_group[s] for s, mask in masks.items()}
    removed = {s: counter.structure_total(s) - kept[s] for s in masks}
    total_removed = sum(removed.values())
    if total_removed <= 0:
        return None
    gap = float(counter.remaining(masks)) - (1.0 - prune_ratio) * counter.prunable_total
    return {s: kept[s] - gap * removed[s] / total_removed for s in masks}


# compat(transformers 5.16): the stock configs' head-count check.
def stock_config_accepts_heads(geo: ModelGeometry) -> Callable[[int], bool]:
    """transformers 5.16's configs refuse a hidden_size that is not a multiple of num_attention_heads,
    even with head_dim set: only KV-head counts whose query-head count divides hidden_size export."""
    return lambda kv: geo.hidden_size % (kv * geo.group_size) == 0
