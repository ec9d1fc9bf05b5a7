"""One ATP run's state and its step logic, independent of axolotl and of the HF Trainer.

Per optimizer step `t` (0-based):
  1. `begin_step(t)`: during the control phase, a generator step on a calibration batch (LoRA
     frozen, soft masks on full outputs, CE + budget loss); at `t == control_steps` the masks freeze
     to a deterministic exact-budget decision. Then the hard masks are set for the LoRA step.
  2. the trainer's micro-batches run with the LoRA-aware forward (and, in `loss` mode, `penalty()`).
  3. `end_step(t)`: the proximal group-lasso step on the pruned groups' LoRA slices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from axolotl_atp.architectures import spec_for
from axolotl_atp.args import ATPConfig
from axolotl_atp.bnb_cpu import keep_4bit_layout_on_cpu
from axolotl_atp.decision import (
    Decision,
    budget_split,
    freeze_decision,
    rechoose_within_layers,
    stock_config_accepts_heads,
)
from axolotl_atp.groups import HEADS, MLP, Masks, ModelGeometry, ParameterCounter, slice_refs
from axolotl_atp.masking import MaskedModel, MaskMode
from axolotl_atp.masks_file import MasksFileError, read_masks
from axolotl_atp.peft_unwrap import unwrap_base_model
from axolotl_atp.training import distributed
from axolotl_atp.training.budget_schedule import ramp_steps, target_remaining_ratio
from axolotl_atp.training.generator import PruningDecisionGenerator, decision_scores, gumbel_sigmoid
from axolotl_atp.training.group_lasso import GroupLasso, ramp

STATE_VERSION = 1


class NonFiniteError(RuntimeError):
    """A NaN or inf in an ATP loss term: training stops before writing a broken adapter."""


def check_finite(value: torch.Tensor, term: str, step: int) -> None:
    if not torch.isfinite(value).all():
        raise NonFiniteError(
            f"axolotl-atp: the {term} is {value.item() if value.numel() == 1 else value} at optimizer step "
            f"{step}. Training stopped so that no broken adapter is written. Fix: lower the learning "
            "rates (atp.generator_lr, learning_rate), or check the data for empty or huge rows."
        )


class ATPController:
    """Generator, masks, budget and group lasso of one run on one (PEFT) model."""

    def __init__(self, model: nn.Module, cfg: ATPConfig, *, total_steps: int, peak_lr: float, seed: int):
        base = unwrap_base_model(model)
        keep_4bit_layout_on_cpu(model)  # before the importance prior reads the 4-bit base weights
        self.model = model
        self.cfg = cfg
        self.model_type = base.config.model_type
        self.spec = spec_for(self.model_type)
        self.geo = ModelGeometry.from_config(base.config, self.spec)
        self.refs = slice_refs(self.spec, self.geo)
        self.counter = ParameterCounter(self.geo, self.refs)
        self.structures = list(cfg.structures)
        self.masked = MaskedModel(model, self.spec, self.geo)
        self.lasso = GroupLasso(model, {s: self.refs[s] for s in self.structures}, self.geo, self.spec.layers_path)
        self.device = next(p.device for p in model.parameters())
        self.total_steps = max(1, total_steps)
        self.control_steps = cfg.control_steps or max(1, self.total_steps // 2)
        self.peak_lr = peak_lr
        self.seed = seed
        torch.manual_seed(seed)  # the generator's init is part of the run's seeded state
        self.generator = PruningDecisionGenerator(
            self.geo.num_layers,
            {s: self.geo.num_groups(s) for s in self.structures},
            hidden_size=cfg.generator_hidden_size,
            num_encoder_layers=cfg.generator_num_layers,
            num_heads=cfg.generator_num_heads,
        ).to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.generator.parameters(), lr=cfg.generator_lr, weight_decay=cfg.generator_weight_decay
        )
        self.noise = torch.Generator().manual_seed(seed)
        # Data parallel: every rank starts from rank 0's generator and noise (no-ops on one process).
        distributed.broadcast_module(self.generator)
        distributed.broadcast_rng_state(self.noise, self.device)
        self.hard_masks: Masks = {
            s: torch.ones(self.geo.num_layers, self.geo.num_groups(s), device=self.device) for s in self.structures
        }
        self.decision: Decision | None = None
        self.generator_steps = 0
        self.metrics: dict[str, float] = {}
        # The generator's sampled remaining ratio at its last step, and at the freeze its distance above
        # the target: a large gap means the frozen decision jumps far from what the generator trained.
        self.last_remaining_ratio: float | None = None
        # The noise scale of the last generator step: 0 means the hard masks are the generator's own
        # deterministic decision, which the freeze then changes as little as the budget allows.
        self.last_noise_scale: float | None = None
        self.budget_gap_at_freeze: float | None = None
        # Group decisions the freeze changed against the masks the LoRA steps last trained with.
        self.flips_at_freeze: int | None = None
        if cfg.decision_file is not None:
            self._use_decision_file(Path(cfg.decision_file))
        # ATP's LoRA-aware forward, or plain hard masks (the ablation) during the LoRA steps.
        self.lora_step_mode = MaskMode.LORA_AWARE if cfg.lora_aware else MaskMode.FULL

    def set_importance_prior(self, importance: Masks) -> None:
        """Start the generator from static importance (`generator_init: importance`): `importance_scale` times the
        standardised scores, less each layer's centre (`importance_centre`), is added to its logits for the whole
        run. Data parallel: rank 0's prior is used."""
        centres = self.importance_centres(importance)
        self.generator.set_prior(
            {s: self.cfg.importance_scale * (importance[s].cpu() - centres[s]).to(self.device) for s in importance}
        )
        distributed.broadcast_module(self.generator)

    def budget_quantile(self, structures: list[str]) -> float:
        """The fraction of each of `structures`' groups that meets the budget when they alone carry it."""
        cost = sum(self.counter.structure_total(s) for s in structures)
        return min(1.0, self.cfg.prune_ratio * self.counter.prunable_total / max(1, cost))

    def importance_centres(self, importance: Masks) -> Masks:
        """Per structure, each layer's zero of the prior ([layers, 1]): 0 (the standardised mean), the layer's
        budget quantile (`budget`), or the budget quantile of all layers' scores together (`global`: the groups
        below zero are those the static decision removes, the two-stage baseline's, per-layer widths included)."""
        centre = self.cfg.importance_centre
        if centre == "mean":
            return {s: torch.zeros(z.shape[0], 1) for s, z in importance.items()}
        q = self.budget_quantile(list(importance))
        if centre == "global":
            return {
                s: torch.quantile(z.float().cpu().flatten(), q).expand(z.shape[0], 1) for s, z in importance.items()
            }
        return {s: torch.quantile(z.float().cpu(), q, dim=1, keepdim=True) for s, z in importance.items()}

    def _use_decision_file(self, path: Path) -> None:
        """A fixed decision from step 0 (e.g. a static-importance baseline): the generator is not trained."""
        decision, _ = read_masks(path, self.geo, self.model_type)
        for s, layers in decision.kept.items():
            if s not in self.structures and any(len(k) < self.geo.num_groups(s) for k in layers):
                raise MasksFileError(
                    f"{path} prunes {s}, which atp.structures ({self.structures}) does not list. Fix: add {s} to "
                    "atp.structures."
                )
        self.decision = Decision(kept={s: decision.kept[s] for s in self.structures}, geo=self.geo)
        self.hard_masks = self.decision.masks(self.device)
        self.control_steps = 0

    # ----- phases ---------------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        return self.decision is not None

    def in_control(self, step: int) -> bool:
        return not self.frozen and step < self.control_steps

    @property
    def ramp_steps(self) -> int:
        return ramp_steps(self.control_steps, self.cfg.budget_ramp)

    def target_ratio(self, step: int) -> float:
        """The remaining ratio the budget loss asks for at optimizer step `step` (the budget schedule)."""
        return target_remaining_ratio(step, self.cfg.prune_ratio, self.ramp_steps, self.cfg.budget_schedule)

    def noise_scale(self, step: int) -> float:
        """Gumbel-noise scale at `step`: 1 while the target ramps, then (with `anneal_noise`) down to 0 at the
        last control step, so that the generator ends on its own deterministic decision."""
        hold = self.control_steps - self.ramp_steps
        if not self.cfg.anneal_noise or step < self.ramp_steps or hold <= 0:
            return 1.0
        return max(0.0, 1.0 - (step - self.ramp_steps + 1) / hold)

    @property
    def num_groups_total(self) -> int:
        return sum(self.geo.num_layers * self.geo.num_groups(s) for s in self.structures)

    def begin_step(self, step: int, calibration_loss: Callable[[], torch.Tensor] | None) -> None:
        """Prepare optimizer step `step`: maybe a generator step or the freeze, then set the LoRA masks."""
        self.metrics = {}
        if not self.frozen and step >= self.control_steps:
            self.freeze()
        elif self.in_control(step) and calibration_loss is not None and step % self.cfg.generator_interval == 0:
            self.generator_step(calibration_loss, step)
        self.masked.set_masks(self.hard_masks, self.lora_step_mode)

    def generator_step(self, calibration_loss: Callable[[], torch.Tensor], step: int) -> None:
        """One generator update: the calibration loss (KL to the teacher, or CE) with soft masks + budget loss;
        LoRA frozen."""
        self.generator.train()
        logits = self.generator()
        soft, hard = {}, {}
        noise_scale = self.noise_scale(step)
        for s, z in logits.items():
            soft[s], hard[s] = gumbel_sigmoid(z, self.cfg.temperature, self.cfg.offset, self.noise, noise_scale)
        ratio = self.counter.remaining_ratio(hard)
        target = self.target_ratio(step)
        budget = self.cfg.budget_weight * (torch.log(ratio) - math.log(target)).abs()
        check_finite(budget, "budget loss", step)
        self.masked.set_masks(soft, MaskMode.FULL)
        with frozen_parameters(self.model):
            ce = calibration_loss()
        # The mean over the ranks: the logged value, and a NaN on one rank stops all of them together.
        ce_mean = distributed.average_scalar(ce.detach())
        check_finite(ce_mean, "calibration loss", step)
        ce.backward()  # reaches only the mask leaves: the LoRA weights are frozen for this step
        torch.stack([budget, *self.masked.mask_gradient_terms()]).sum().backward()
        # Data parallel: each rank drew its own calibration batch, so the mean of the ranks' gradients is
        # the gradient of the mean of their calibration losses (a world_size-times bigger batch when the
        # batches hold equal token counts), as DDP does for the LoRA weights. The budget term is the same
        # on every rank. Identical gradients give identical AdamW steps, hence identical generators.
        distributed.average_gradients(self.generator.parameters())
        torch.nn.utils.clip_grad_norm_(self.generator.parameters(), self.cfg.generator_max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        new_hard = self.lora_masks_after_generator_step(hard)
        when = f"after the generator step at optimizer step {step}"
        distributed.check_same(list(self.generator.parameters()), "pruning-decision generator's parameters", when)
        distributed.check_same([new_hard[s] for s in self.structures], "hard masks", when)
        flips = self._replace_hard_masks(new_hard)
        self.generator_steps += 1
        self.last_remaining_ratio = float(ratio.detach())
        self.last_noise_scale = noise_scale
        self.metrics.update(
            {
                "atp/calibration_loss": float(ce_mean),
                "atp/budget_loss": float(budget.detach()),
                "atp/remaining_ratio": float(ratio.detach()),
                "atp/target_remaining_ratio": target,
                "atp/noise_scale": noise_scale,
                "atp/mask_flips": float(flips),
            }
        )

    def lora_masks_after_generator_step(self, sampled: Masks) -> Masks:
        """The hard masks the next LoRA steps train with (`control_masks`): the generator step's sample, or the
        generator's noise-free decision after its update."""
        if self.cfg.control_masks == "decision":
            return {s: (score >= 0).float() for s, score in self.scores().items()}
        return {s: (m.detach() >= 0.5).float() for s, m in sampled.items()}

    @torch.no_grad()
    def scores(self) -> Masks:
        self.generator.eval()
        return decision_scores(self.generator(), self.cfg.offset)

    def freeze_scores(self) -> Masks:
        """The scores the freeze ranks groups by.

        When the last generator step sampled without noise (`anneal_noise`), its hard masks are the decision
        the LoRA steps trained with: those groups are ranked above the others (kept first), so that the freeze
        only adds or removes the lowest- or highest-scoring groups the exact budget needs. Otherwise, the
        generator's noise-free scores alone.
        """
        scores = self.scores()
        if self.last_noise_scale != 0.0:
            return scores
        anchored = {}
        for s, score in scores.items():
            margin = 2.0 * float(score.abs().max()) + 1.0
            anchored[s] = score + margin * (self.hard_masks[s].to(score.device) - 0.5)
        return anchored

    def freeze(self) -> Decision:
        """Fix the masks to the deterministic decision that meets the budget (up to rounding). Where the last
        trained masks miss the budget, each structure takes its share of the gap (`budget_split`), so that heads
        and channels, scored by different generator heads, are not ranked against each other on raw scores."""
        cfg = self.cfg
        self.decision = freeze_decision(
            self.freeze_scores(),
            self.geo,
            self.counter,
            cfg.prune_ratio,
            cfg.layout,
            round_to={HEADS: cfg.heads_round_to, MLP: cfg.mlp_round_to},
            minimum={HEADS: cfg.min_heads_per_layer, MLP: cfg.min_mlp_channels_per_layer},
            accept_heads=stock_config_accepts_heads(self.geo) if cfg.layout == "uniform" else None,
            structure_targets=budget_split(self.hard_masks, self.counter, cfg.prune_ratio),
        )
        if cfg.freeze_channels == "importance":  # the prior is the importance, less a per-layer constant
            self.decision = rechoose_within_layers(self.decision, MLP, self.generator.prior()[MLP])
        frozen = self.decision.masks(self.device)
        distributed.check_same([frozen[s] for s in self.structures], "frozen decision", "at the freeze")
        self.flips_at_freeze = self._replace_hard_masks(frozen)
        self.metrics["atp/mask_flips"] = float(self.flips_at_freeze)
        self.metrics["atp/freeze_flip_fraction"] = self.flips_at_freeze / self.num_groups_total
        self.metrics["atp/frozen"] = 1.0
        if self.last_remaining_ratio is not None:
            self.budget_gap_at_freeze = self.last_remaining_ratio - (1.0 - cfg.prune_ratio)
        return self.decision

    def _replace_hard_masks(self, new_hard: Masks) -> int:
        """Use `new_hard` for the LoRA steps; return how many group decisions flipped."""
        flips = sum(int((new_hard[s] != self.hard_masks[s].to(new_hard[s].device)).sum()) for s in new_hard)
        self.hard_masks = new_hard
        return flips

    def lasso_threshold(self, step: int) -> float:
        """Prox threshold after optimizer step `step`; infinite at the last step, so pruned slices end at 0."""
        if step + 1 >= self.total_steps:
            return math.inf
        return self.cfg.group_lasso_strength * self.peak_lr * ramp((step + 1) / self.total_steps)

    def end_step(self, step: int) -> None:
        """After the optimizer step: the proximal group-lasso step (`prox` mode) and its metrics."""
        self.metrics["atp/remaining_ratio_hard"] = float(self.counter.remaining_ratio(self.hard_masks))
        norm = self.lasso.pruned_norm(self.hard_masks)
        check_finite(torch.tensor(norm), "group-lasso norm", step)
        if self.cfg.group_lasso == "prox":
            threshold = self.lasso_threshold(step)
            self.lasso.prox(self.hard_masks, threshold)
            if math.isinf(threshold):
                self.metrics["atp/group_lasso_norm_before_final_projection"] = norm
                norm = self.lasso.pruned_norm(self.hard_masks)
        self.metrics["atp/group_lasso_norm"] = norm

    def penalty(self) -> torch.Tensor:
        """The `loss`-mode group-lasso term for the current micro-batch (already weighted)."""
        return self.cfg.group_lasso_strength * self.lasso.penalty(self.hard_masks)

    def finish(self) -> Decision:
        """The final decision (freezing now if the run ended inside the control phase)."""
        return self.decision if self.decision is not None else self.freeze()

    # ----- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "model_type": self.model_type,
            "num_layers": self.geo.num_layers,
            "groups": {s: self.geo.num_groups(s) for s in self.structures},
            "generator": self.generator.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "noise_rng": self.noise.get_state(),
            "hard_masks": {s: m.cpu() for s, m in self.hard_masks.items()},
            "decision": self.decision.kept if self.decision else None,
            "generator_steps": self.generator_steps,
            "control_steps": self.control_steps,
            "last_noise_scale": self.last_noise_scale,
            "generator_prior": {s: p.cpu() for s, p in self.generator.prior().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"num_layers": self.geo.num_layers, "groups": {s: self.geo.num_groups(s) for s in self.structures}}
        found = {"num_layers": state.get("num_layers"), "groups": state.get("groups")}
        if state.get("version") != STATE_VERSION or found != expected or state.get("model_type") != self.model_type:
            raise ValueError(
                f"ATP state is for another model or config (found {state.get('model_type')} {found}, expected "
                f"{self.model_type} {expected}). Fix: resume with the config the checkpoint was made with."
            )
        self.generator.load_state_dict(state["generator"])
        if "generator_prior" in state:  # absent from states written before the prior existed: zeros, as then
            self.generator.set_prior({s: p.to(self.device) for s, p in state["generator_prior"].items()})
        self.optimizer.load_state_dict(state["optimizer"])
        self.noise.set_state(state["noise_rng"])
        self.hard_masks = {s: m.to(self.device) for s, m in state["hard_masks"].items()}
        self.decision = Decision(kept=state["decision"], geo=self.geo) if state["decision"] else None
        self.generator_steps = int(state["generator_steps"])
        self.control_steps = int(state["control_steps"])
        self.last_noise_scale = state.get("last_noise_scale")
        # Every rank read the checkpoint; make sure they read the same one.
        distributed.check_same(
            [*self.generator.parameters(), *(self.hard_masks[s] for s in self.structures)],
            "restored generator and masks",
            "after restoring the checkpoint",
        )


@contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Temporarily stop gradients to a module's trainable parameters (the LoRA weights)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
