"""Training-loop glue: drives an `ATPController` from the HF Trainer's callback events."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from axolotl_atp.args import ATPConfig
from axolotl_atp.atomic_files import write_json_atomically
from axolotl_atp.log import get_logger
from axolotl_atp.masking import MaskMode
from axolotl_atp.masks_file import decision_to_json
from axolotl_atp.peft_unwrap import base_layer_of, count_parameters
from axolotl_atp.training import distributed
from axolotl_atp.training.calibration import CalibrationSampler
from axolotl_atp.training.checkpoint_state import checkpoint_dir, load_state, save_state
from axolotl_atp.training.controller import ATPController
from axolotl_atp.training.distillation import Distiller
from axolotl_atp.training.importance import wanda_sp_scores

LOG = get_logger(__name__)
# Warn when the generator's sampled remaining ratio is this far above the target at the freeze.
BUDGET_GAP_WARNING = 0.05


class ATPCallback(TrainerCallback):
    """Generator steps, freeze, masks, prox, metrics, checkpoint state and the final masks file."""

    def __init__(
        self,
        trainer: Any,
        atp_cfg: ATPConfig,
        calibration_dataset: Any,
        seed: int,
        base_model: str | None,
        distiller: Distiller | None = None,
    ):
        self.trainer = trainer
        self.distiller = distiller
        self.atp_cfg = atp_cfg
        self.calibration_dataset = calibration_dataset
        self.seed = seed
        self.base_model = base_model
        self.controller: ATPController | None = None
        self.sampler: CalibrationSampler | None = None
        self._saved_step: int | None = None

    # --- helpers -------------------------------------------------------------------------------
    def _calibration_loss(self) -> torch.Tensor:
        assert self.sampler is not None and self.controller is not None
        # Data parallel: rank r of w draws batch k*w + r at generator step k, so the ranks see different
        # rows and their averaged gradient is that of a w-times bigger batch (one process: batch k, as before).
        index = self.controller.generator_steps * distributed.world_size() + distributed.rank()
        batch = self.trainer._prepare_inputs(self.sampler.batch(index))
        with self.trainer.compute_loss_context_manager():
            if self.distiller is not None and self.atp_cfg.kd_calibration:
                return self.distiller.calibration_loss(self.trainer.model, batch)
            return self.trainer.model(**batch).loss

    def _log(self) -> None:
        if self.controller and self.distiller is not None:
            self.controller.metrics.update(self.distiller.pop_metrics())
        if self.controller and self.controller.metrics:
            store = getattr(self.trainer, "store_metrics", None)
            if callable(store):
                store(dict(self.controller.metrics), train_eval="train")

    # --- events --------------------------------------------------------------------------------
    @staticmethod
    def _writes_files(state: TrainerState) -> bool:
        """Only global rank 0 writes ATP files. The process-group rank is checked too: a process group
        that the Trainer does not know about (e.g. torchrun on CPUs without ACCELERATE_USE_CPU) would
        otherwise make every rank "process zero"."""
        return state.is_world_process_zero and distributed.rank() == 0

    def _log_rank_masks(self, step: int) -> None:
        """Data parallel: each rank logs the fingerprint of the masks it trains with, when they change."""
        c = self.controller
        if c is None or not distributed.is_distributed():
            return
        if step == 0 or c.metrics.get("atp/mask_flips", 0.0) > 0:
            LOG.info(
                "axolotl-atp: rank %d of %d uses hard masks %s from step %d",
                distributed.rank(),
                distributed.world_size(),
                distributed.masks_digest(c.hard_masks),
                step,
                main_process_only=False,
            )

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._refuse_sharded_trainer()
        model = self.trainer.model
        self.controller = ATPController(
            model, self.atp_cfg, total_steps=state.max_steps, peak_lr=args.learning_rate, seed=self.seed
        )
        if self.calibration_dataset is not None:
            batch_size = self.atp_cfg.calibration_batch_size or args.per_device_train_batch_size
            self.sampler = CalibrationSampler(
                self.calibration_dataset, self.trainer.data_collator, batch_size, self.seed
            )
        if state.global_step > 0:
            self._restore(checkpoint_dir(Path(args.output_dir), state.global_step))
        elif self.atp_cfg.generator_init == "importance" and self.sampler is not None and self._importance_structures():
            self._start_from_importance()
        if self.distiller is not None:
            self.distiller.start(self.controller.masked, self.controller.spec)
        self._log_plan()

    def _importance_structures(self) -> list[str]:
        return [s for s in self.atp_cfg.importance_structures if s in self.atp_cfg.structures]

    def _start_from_importance(self) -> None:
        """The generator's prior: Wanda-sp importance on the first calibration batches (unpruned model)."""
        c, sampler = self.controller, self.sampler
        assert c is not None and sampler is not None
        count = self.atp_cfg.importance_batches
        batches = (self.trainer._prepare_inputs(sampler.batch(i)) for i in range(count))
        model = getattr(self.trainer.model, "module", self.trainer.model)
        with c.masked.masks_off(), self.trainer.compute_loss_context_manager():
            scores = wanda_sp_scores(model, c.spec, c.geo, batches, self._importance_structures())
        c.set_importance_prior(scores)
        LOG.info(
            "axolotl-atp: the generator's %s logits start from the Wanda-sp importance of %d calibration batches "
            "of %d rows (generator_init: importance)",
            " and ".join(scores),
            count,
            sampler.batch_size,
        )

    def _refuse_sharded_trainer(self) -> None:
        """The last line of defence against FSDP/DeepSpeed turned on where the config validation cannot see."""
        for flag, name in (("is_fsdp_enabled", "FSDP"), ("is_deepspeed_enabled", "DeepSpeed")):
            if getattr(self.trainer, flag, False):
                raise ValueError(
                    f"axolotl-atp: the trainer runs under {name} (trainer.{flag} = True, from the axolotl or the "
                    "accelerate config), which ATP does not support: its masks hook into unsharded LoRA layers. "
                    "Fix: launch plain data parallel (accelerate `distributed_type: MULTI_GPU`, or torchrun) or "
                    "use one GPU."
                )

    def _restore(self, checkpoint: Path) -> None:
        assert self.controller is not None
        self.controller.load_state_dict(load_state(checkpoint))
        LOG.info("axolotl-atp: restored generator, masks and decision from %s", checkpoint)

    def _log_plan(self) -> None:
        """What this run prunes, and when the masks freeze."""
        c = self.controller
        assert c is not None
        if self.atp_cfg.decision_file is not None:
            LOG.info("axolotl-atp: fixed decision from %s; no generator is trained", self.atp_cfg.decision_file)
        base_linear = type(base_layer_of(c.masked.layers[0].get_submodule(c.spec.down))).__name__
        groups = ", ".join(f"{c.geo.num_groups(s)} {s} per layer" for s in c.structures)
        LOG.info("axolotl-atp: %d layers (base Linear class %s), %s", c.geo.num_layers, base_linear, groups)
        LOG.info(
            "axolotl-atp: target prune ratio %.3f of %d prunable parameters; the generator trains for %d of %d "
            "steps, then the masks freeze (%s layout)",
            self.atp_cfg.prune_ratio,
            c.counter.prunable_total,
            c.control_steps,
            c.total_steps,
            self.atp_cfg.layout,
        )

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        assert self.controller is not None
        was_frozen = self.controller.frozen
        self.controller.begin_step(state.global_step, self._calibration_loss)
        if self.controller.frozen and not was_frozen:
            counts = self.controller.decision.counts() if self.controller.decision else {}
            LOG.info("axolotl-atp: masks frozen at step %d; kept per layer: %s", state.global_step, counts)
            flips, groups = self.controller.flips_at_freeze or 0, self.controller.num_groups_total
            last = self.controller.last_remaining_ratio
            LOG.info(
                "axolotl-atp: the freeze changed %d of %d group decisions (%.2f%%) against the masks last trained "
                "with%s",
                flips,
                groups,
                100 * flips / groups,
                ""
                if last is None
                else f"; the generator last kept {last:.3f} of the prunable parameters (target "
                f"{1.0 - self.atp_cfg.prune_ratio:.3f})",
            )
            gap = self.controller.budget_gap_at_freeze
            if gap is not None and gap > BUDGET_GAP_WARNING:
                LOG.warning(
                    "axolotl-atp: when the masks froze, the generator still kept %.3f of the prunable parameters "
                    "(target %.3f): the freeze removed the rest at once, and the LoRA steps left must recover it. "
                    "Fix: raise atp.generator_lr or atp.control_steps so that atp/remaining_ratio reaches the "
                    "target during the control phase.",
                    1.0 - self.atp_cfg.prune_ratio + gap,
                    1.0 - self.atp_cfg.prune_ratio,
                )
        self._log_rank_masks(state.global_step)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        assert self.controller is not None
        # `global_step` is incremented after this event: the step that just ran is `global_step`.
        self.controller.end_step(state.global_step)
        self._log()
        # Evaluation between steps sees the hard-masked model, as the export will be.
        self.controller.masked.set_masks(self.controller.hard_masks, MaskMode.FULL)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        # Before the trainer writes the checkpoint (and rotates old ones), so that a checkpoint whose
        # trainer_state.json exists always has its ATP state, wherever a kill lands.
        if control.should_save:
            self._save_state(args, state)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._save_state(args, state)  # for saves outside the step loop (e.g. per epoch)

    def _save_state(self, args: TrainingArguments, state: TrainerState) -> None:
        if self.controller is None or not self._writes_files(state) or self._saved_step == state.global_step:
            return
        self._saved_step = state.global_step
        checkpoint = checkpoint_dir(Path(args.output_dir), state.global_step)
        save_state(self.controller.state_dict(), checkpoint)
        # Logged from whichever process writes, so a second writer would show in the log.
        LOG.info("axolotl-atp: saved generator, masks and decision to %s", checkpoint, main_process_only=False)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self.controller is None:
            return
        c = self.controller
        if self.distiller is not None:
            self.distiller.finish()  # a teacher adapter loaded from a folder is not saved with the run's adapter
        decision = c.finish()
        c.masked.set_masks(c.hard_masks, MaskMode.FULL)
        if distributed.is_distributed():
            LOG.info(
                "axolotl-atp: rank %d of %d ends with decision %s",
                distributed.rank(),
                distributed.world_size(),
                distributed.kept_digest(decision.kept),
                main_process_only=False,
            )
        if not self._writes_files(state):
            return
        data = decision_to_json(
            decision,
            model_type=c.model_type,
            prune_ratio=self.atp_cfg.prune_ratio,
            layout=self.atp_cfg.layout,
            structures=c.structures,
            counter=c.counter,
            total_params_before=count_parameters(self.trainer.model),
            base_model=self.base_model,
            group_lasso={"mode": self.atp_cfg.group_lasso, "pruned_slice_norm": c.lasso.pruned_norm(c.hard_masks)},
        )
        path = Path(args.output_dir) / self.atp_cfg.masks_file
        write_json_atomically(data, path)
        LOG.info(
            "axolotl-atp: wrote %s (achieved prune ratio %.4f of prunable parameters, target %.4f)",
            path,
            data["params"]["achieved_prune_ratio"],
            self.atp_cfg.prune_ratio,
            main_process_only=False,
        )
