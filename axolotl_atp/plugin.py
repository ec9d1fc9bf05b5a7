"""`ATPPlugin`: wires axolotl's plugin hooks to the parts in this package, and nothing more."""

from __future__ import annotations

from typing import Any

from axolotl.integrations.base import BasePlugin

from axolotl_atp.args import ATPConfig, force_fused_kernels_off, plugin_listed
from axolotl_atp.log import get_logger

LOG = get_logger(__name__)
# The seed when neither `atp.seed` nor axolotl's `seed` is set.
DEFAULT_SEED = 42


def atp_config(cfg: Any) -> ATPConfig | None:
    """The validated `atp:` block, or None when ATP is not active for this config."""
    if not plugin_listed(cfg) or cfg.get("atp") is None or cfg.get("merge_lora") or cfg.get("inference"):
        return None
    return ATPConfig(**dict(cfg["atp"]))


def axolotl_seed(cfg: Any) -> int:
    """axolotl's `seed`, or `DEFAULT_SEED`."""
    seed = cfg.get("seed")
    return int(seed) if seed is not None else DEFAULT_SEED


def run_seed(cfg: Any, atp_cfg: ATPConfig) -> int:
    """The seed of ATP's generator, its noise and the calibration split: `atp.seed`, else axolotl's."""
    return atp_cfg.seed if atp_cfg.seed is not None else axolotl_seed(cfg)


class ATPPlugin(BasePlugin):
    """All-in-One Tuning and Structural Pruning for axolotl (`plugins: [axolotl_atp.ATPPlugin]`)."""

    def __init__(self) -> None:
        super().__init__()
        self.calibration_dataset: Any = None

    def get_input_args(self) -> str:
        return "axolotl_atp.args.ATPArgs"

    def register(self, cfg: dict) -> None:
        # compat(axolotl 0.19): runs on the raw config before validation: turning the fused kernels off here stops axolotl
        # from auto-enabling them (the args validator does it again for programmatic paths).
        if plugin_listed(cfg) and cfg.get("atp") is not None:
            force_fused_kernels_off(cfg)

    def pre_model_load(self, cfg: Any) -> None:
        if atp_config(cfg) is None:
            return
        from transformers import AutoConfig

        from axolotl_atp.architectures import spec_for
        from axolotl_atp.lora_targets import check_lora_targets

        # Refuse an unsupported family, or LoRA on a part kept whole, before the weights are loaded.
        model_config = AutoConfig.from_pretrained(
            cfg.base_model_config or cfg.base_model, trust_remote_code=bool(cfg.trust_remote_code)
        )
        check_lora_targets(cfg, model_config, spec_for(model_config.model_type))

    def pre_lora_load(self, cfg: Any, model: Any) -> None:
        if atp_config(cfg) is None:
            return
        from transformers import set_seed

        # compat(axolotl 0.19): axolotl seeds only when the trainer is built, after the LoRA weights are initialised, so two runs
        # with the same `seed` start from different adapters. A run killed and resumed must end where an
        # uninterrupted run ends, so the adapter's initialisation follows `seed` too.
        set_seed(axolotl_seed(cfg))

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        if atp_config(cfg) is None or cfg.resume_from_checkpoint or not cfg.auto_resume_from_checkpoints:
            return
        from pathlib import Path

        from axolotl_atp.training.checkpoint_state import last_complete_checkpoint

        # compat(axolotl 0.19): axolotl's auto-resume takes the newest checkpoint folder, even one whose save was killed
        # midway; resume from the newest complete one instead (the others are left as they are).
        checkpoint, skipped = last_complete_checkpoint(Path(cfg.output_dir))
        if skipped:
            LOG.warning(
                "axolotl-atp: skipping checkpoint(s) whose save was interrupted: %s", ", ".join(map(str, skipped))
            )
        if checkpoint is not None:
            cfg.resume_from_checkpoint = str(checkpoint)
            LOG.info("axolotl-atp: resuming from the last complete checkpoint %s", checkpoint)

    def load_datasets(self, cfg: Any, preprocess: bool = False) -> Any:
        atp_cfg = atp_config(cfg)
        if preprocess or atp_cfg is None or atp_cfg.decision_file is not None:
            return None  # a fixed decision needs no calibration rows
        from axolotl.common.datasets import TrainDatasetMeta, load_datasets
        from axolotl.utils.trainer import calculate_total_num_steps

        from axolotl_atp.training.calibration import split_calibration

        meta = load_datasets(cfg=cfg)
        train, calibration = split_calibration(meta.train_dataset, atp_cfg.calibration_size, run_seed(cfg, atp_cfg))
        self.calibration_dataset = calibration
        LOG.info(
            "axolotl-atp: held out %d of %d training rows for calibration", len(calibration), len(meta.train_dataset)
        )
        total_num_steps = calculate_total_num_steps(cfg, train)
        return TrainDatasetMeta(train_dataset=train, eval_dataset=meta.eval_dataset, total_num_steps=total_num_steps)

    def add_callbacks_post_trainer(self, cfg: Any, trainer: Any) -> list:
        atp_cfg = atp_config(cfg)
        if atp_cfg is None:
            return []
        from axolotl_atp.training.calibration import split_calibration
        from axolotl_atp.training.callback import ATPCallback
        from axolotl_atp.training.group_lasso import add_group_lasso_to_loss

        calibration = self.calibration_dataset
        if calibration is None and atp_cfg.decision_file is None:
            # Datasets were loaded without this plugin's hook (e.g. `axolotl.train.train` called directly).
            trainer.train_dataset, calibration = split_calibration(
                trainer.train_dataset, atp_cfg.calibration_size, run_seed(cfg, atp_cfg)
            )
        distiller = None
        if atp_cfg.kd_weight > 0:
            from axolotl_atp.training.distillation import Distiller

            distiller = Distiller(trainer, atp_cfg)
            distiller.install()
        callback = ATPCallback(trainer, atp_cfg, calibration, run_seed(cfg, atp_cfg), cfg.base_model, distiller)
        if atp_cfg.group_lasso == "loss":
            add_group_lasso_to_loss(trainer, callback)
        return [callback]
