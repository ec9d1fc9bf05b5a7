"""The `atp:` block of an axolotl config, and its interplay with the rest of the config.

axolotl merges `ATPArgs` into its own schema (`get_input_args`). Everything here runs before a
model is loaded, so a bad config fails in seconds with a message that names the key and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from axolotl_atp.groups import Structure
from axolotl_atp.log import get_logger

LOG = get_logger(__name__)

PLUGIN_NAME = "axolotl_atp.ATPPlugin"

# axolotl's fused LoRA kernels replace `lora.Linear.forward` with Triton code, so the mask hooks
# ATP puts on the LoRA layers would never fire. They must be off whenever ATP is on.
FUSED_LORA_KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")


class ATPConfig(BaseModel):
    """Settings of one ATP run (fields of the `atp:` block)."""

    # A misspelled key inside `atp:` is an error, not silently dropped. This config lives only on the
    # nested model, so it does not leak into axolotl's own schema.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prune_ratio: float = Field(
        default=0.3,
        gt=0.0,
        lt=1.0,
        description="Fraction of the prunable decoder-linear parameters (q/k/v/o/gate/up/down weights "
        "and biases) to remove. 0.4 removes 40% of them.",
    )
    structures: list[Structure] = Field(
        default_factory=lambda: ["attention_heads", "mlp_channels"],
        description="Which groups may be pruned: `attention_heads` (a KV head with the query heads "
        "that share it) and/or `mlp_channels` (row j of gate/up, column j of down).",
    )
    layout: Literal["per_layer", "uniform"] = Field(
        default="per_layer",
        description="`per_layer`: kept widths differ per layer (better accuracy; export loads with "
        "trust_remote_code). `uniform`: the same kept counts in every layer (export is a stock config; worse "
        "perplexity at the same ratio, see the README's quality findings).",
    )
    control_steps: int | None = Field(
        default=None,
        gt=0,
        description="Optimizer steps during which the pruning-decision generator trains; then the "
        "masks freeze. Default: half of the run's optimizer steps.",
    )
    generator_interval: int = Field(
        default=1, ge=1, description="Train the generator every N optimizer steps of the control phase."
    )
    generator_init: Literal["importance", "random"] = Field(
        default="importance",
        description="Where the generator starts: `importance` adds a fixed prior to its logits, the Wanda-sp "
        "importance (activation-weighted weight magnitude) of each group on calibration rows, standardised within "
        "each layer and structure, so the first decisions remove the least important groups of each layer and "
        "the generator learns from there; `random` starts from its random initialisation alone (the paper).",
    )
    importance_structures: list[Structure] = Field(
        default_factory=lambda: ["mlp_channels"],
        description="The structures whose logits get the importance prior; the others start at random. Default: MLP "
        "channels only (on SmolLM2, Wanda-sp's choice of KV heads was far worse than the generator's own).",
    )
    importance_batches: int = Field(
        default=8, ge=1, description="Calibration batches the `importance` prior is measured on (forwards only)."
    )
    importance_scale: float = Field(
        default=3.0,
        gt=0.0,
        description="Logits added per standard deviation of importance within a layer (`generator_init: importance`).",
    )
    importance_centre: Literal["mean", "budget", "global"] = Field(
        default="mean",
        description="Where the prior is zero in each layer: at the layer's mean importance (`mean`), at the "
        "quantile the budget would remove if the prior's structures carried it alone (`budget`: with the offset "
        "at 0 the first decision is then the static one at the final budget, whatever the scale, with the same "
        "fraction removed in every layer), or at that quantile of all layers' scores together (`global`: with the "
        "offset at 0 the first decision is the static Wanda-sp one, two-stage's, its per-layer widths included).",
    )
    generator_lr: float = Field(default=1e-2, gt=0.0, description="Learning rate of the generator's AdamW.")
    generator_weight_decay: float = Field(default=0.0, ge=0.0, description="Weight decay of the generator.")
    generator_hidden_size: int = Field(default=64, ge=4, description="Width of the generator's encoder.")
    generator_num_layers: int = Field(default=2, ge=1, description="Transformer layers in the generator.")
    generator_num_heads: int = Field(default=4, ge=1, description="Attention heads in the generator.")
    generator_max_grad_norm: float = Field(
        default=3.0, gt=0.0, description="Gradient-norm clip of the generator's updates."
    )
    temperature: float = Field(
        default=0.4, gt=0.0, description="Temperature T of the Gumbel-sigmoid s = sigmoid((z+noise+offset)/T)."
    )
    offset: float = Field(
        default=3.0, description="Logit offset of the Gumbel-sigmoid; positive values start the run dense."
    )
    budget_weight: float = Field(
        default=5.0,
        ge=0.0,
        description="Weight alpha of the budget loss alpha*|log(remaining/total) - log(target)|, where target "
        "follows `budget_schedule`.",
    )
    budget_schedule: Literal["linear", "cubic", "constant"] = Field(
        default="linear",
        description="The remaining ratio the generator is asked for during the control phase: `linear` ramps it "
        "evenly from 1 to 1 - prune_ratio, `cubic` fast first and slowly at the end (as Zhu & Gupta and "
        "LoRAPrune), `constant` asks for 1 - prune_ratio from the first step.",
    )
    budget_ramp: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="Fraction of the control phase over which the target ramps; the rest holds the final target.",
    )
    control_masks: Literal["sample", "decision"] = Field(
        default="sample",
        description="The hard masks the LoRA steps of the control phase train with: `sample` (the generator step's "
        "Gumbel sample, as in the paper) or `decision` (the generator's noise-free decision after its update: the "
        "noise explores for the generator only, and the LoRA trains on masks that change only as the decision does).",
    )
    freeze_channels: Literal["generator", "importance"] = Field(
        default="generator",
        description="Which MLP channels each layer keeps when the masks freeze: the generator's highest-scoring "
        "(`generator`, the paper's), or the highest Wanda-sp importance, the prior's, at the generator's count for "
        "that layer (`importance`). The KV heads and every layer's width stay the generator's. Needs the "
        "importance prior on MLP channels (`generator_init: importance`, `mlp_channels` in importance_structures).",
    )
    anneal_noise: bool = Field(
        default=True,
        description="Decay the Gumbel noise to 0 over the control steps after the ramp, so that the generator's "
        "last samples are its own deterministic decision and the freeze changes little.",
    )
    kd_weight: float = Field(
        default=1.0,
        ge=0.0,
        description="Weight of the distillation term T^2*KL(teacher || student) over the labelled tokens in the "
        "LoRA steps; 0 turns distillation off (no teacher forward).",
    )
    ce_weight: float = Field(
        default=1.0,
        ge=0.0,
        description="Weight of the cross-entropy on the labels in the LoRA steps when distillation is on.",
    )
    kd_temperature: float = Field(default=1.0, gt=0.0, description="Temperature T of the distillation term.")
    kd_teacher: str = Field(
        default="base",
        description="The teacher: `base` (the base model with the masks off and the adapter disabled: no second "
        "copy of the weights; 4-bit under QLoRA), `self` (the run's own adapter with the masks off), or the path "
        "of a LoRA adapter folder for the same base (e.g. a dense LoRA trained on the same data).",
    )
    kd_chunk_tokens: int = Field(
        default=1024,
        ge=1,
        description="Labelled tokens per chunk of the distillation loss: the teacher's and the student's logits "
        "exist for one chunk at a time (a 128k vocabulary at 1024 tokens: 0.5 GB each in fp32).",
    )
    kd_calibration: bool | None = Field(
        default=None,
        description="Train the generator on KL(teacher || masked model) on the calibration batch instead of its "
        "cross-entropy (the damage a decision does, measured against the unpruned model; one more teacher forward "
        "per generator step). Default: on whenever distillation is on (`kd_weight` above 0) and a generator is "
        "trained (no `decision_file`).",
    )
    group_lasso: Literal["prox", "loss", "off"] | None = Field(
        default=None,
        description="How the LoRA slices of pruned groups are driven to zero: `prox` (block soft-"
        "threshold after each optimizer step, threshold growing over training, exact zeros at the end), "
        "`loss` (paper-era group-lasso term added to the training loss), or `off`. Default: `prox` with "
        "`lora_aware: true` (the LoRA slices of pruned groups stay live there), else `off` (plain hard masks "
        "already remove them from every LoRA step and the merge removes them from the model).",
    )
    group_lasso_strength: float = Field(
        default=1000.0,
        ge=0.0,
        description="`prox`: the threshold is strength * peak_lr * ramp(t), ramp growing from 0 to 1. "
        "`loss`: the weight of the group-lasso term (use a small value such as 0.01).",
    )
    calibration_size: float = Field(
        default=0.05,
        gt=0.0,
        description="Rows held out of the training split for the generator's calibration batches: a "
        "fraction if below 1, else a row count. Never taken from the evaluation split.",
    )
    calibration_batch_size: int | None = Field(
        default=None, ge=1, description="Rows per calibration batch. Default: `micro_batch_size`."
    )
    mlp_round_to: int = Field(default=1, ge=1, description="Kept MLP widths are multiples of this (or the full width).")
    heads_round_to: int = Field(
        default=1, ge=1, description="Kept KV-head counts are multiples of this (or the full count)."
    )
    min_heads_per_layer: int = Field(
        default=1, ge=1, description="Fewest KV heads (with their query heads) kept in any layer."
    )
    min_mlp_channels_per_layer: int = Field(default=1, ge=1, description="Fewest MLP channels kept in any layer.")
    seed: int | None = Field(
        default=None, description="Seed of the generator and its noise. Default: axolotl's `seed`, or 42."
    )
    masks_file: str = Field(
        default="atp_masks.json", description="File name, inside `output_dir`, of the frozen decision."
    )
    lora_aware: bool = Field(
        default=False,
        description="`false`: LoRA steps see plain hard masks, the pruned groups removed entirely, so that "
        "training sees the model the merge will write. `true`: the paper's LoRA-aware forward: LoRA steps zero "
        "only the base outputs of pruned groups; their LoRA slices stay live and the group lasso drives them to "
        "zero. Over three seeds of the long quality benchmark the two were level (benchmarks/RESULTS.md), and "
        "`false` is the simpler step.",
    )
    decision_file: str | None = Field(
        default=None,
        description="A masks file (e.g. another run's `atp_masks.json`) used as the fixed decision from the "
        "first step: no generator is trained, and its layout and prune_ratio are the run's.",
    )

    # One validator per rule; pydantic runs them in this order (the decision file last).
    @model_validator(mode="after")
    def require_a_structure(self) -> ATPConfig:
        if not self.structures:
            raise ValueError(
                "atp.structures is empty: nothing could be pruned. Fix: list at least one of "
                "`attention_heads`, `mlp_channels`."
            )
        return self

    @model_validator(mode="after")
    def refuse_repeated_structures(self) -> ATPConfig:
        if len(set(self.structures)) != len(self.structures):
            raise ValueError(f"atp.structures lists a structure twice ({self.structures}). Fix: list each once.")
        return self

    @model_validator(mode="after")
    def check_importance_structures_are_pruned(self) -> ATPConfig:
        # Only where the user listed them: the default (MLP channels) simply does nothing when they are not pruned.
        unpruned = [s for s in self.importance_structures if s not in self.structures]
        if "importance_structures" in self.model_fields_set and unpruned:
            raise ValueError(
                f"atp.importance_structures lists {unpruned}, which atp.structures ({self.structures}) does not "
                "prune: no prior would be applied to it. Fix: remove it from atp.importance_structures, or add it "
                "to atp.structures."
            )
        return self

    @model_validator(mode="after")
    def check_freeze_channels_has_importance(self) -> ATPConfig:
        if self.freeze_channels != "importance":
            return self
        if self.decision_file is not None:
            raise ValueError(
                "atp.freeze_channels = 'importance' has no effect with atp.decision_file (a fixed decision, no "
                "freeze). Fix: remove one of them."
            )
        missing = [
            f"{key} = {value!r}"
            for key, value, ok in (
                ("generator_init", self.generator_init, self.generator_init == "importance"),
                ("structures", self.structures, "mlp_channels" in self.structures),
                ("importance_structures", self.importance_structures, "mlp_channels" in self.importance_structures),
            )
            if not ok
        ]
        if missing:
            raise ValueError(
                f"atp.freeze_channels = 'importance' ranks MLP channels by the importance prior, but atp."
                f"{', atp.'.join(missing)}. Fix: set generator_init: importance and list mlp_channels in "
                "structures and importance_structures, or remove atp.freeze_channels."
            )
        return self

    @model_validator(mode="after")
    def require_whole_generator_heads(self) -> ATPConfig:
        if self.generator_hidden_size % self.generator_num_heads:
            raise ValueError(
                f"atp.generator_hidden_size ({self.generator_hidden_size}) must be a multiple of "
                f"atp.generator_num_heads ({self.generator_num_heads}). Fix: change one of them."
            )
        return self

    @model_validator(mode="after")
    def require_whole_calibration_row_count(self) -> ATPConfig:
        if self.calibration_size >= 1 and self.calibration_size != int(self.calibration_size):
            raise ValueError(
                f"atp.calibration_size = {self.calibration_size}: a value of 1 or more is a row count "
                "and must be a whole number. Fix: use a fraction below 1 or an integer."
            )
        return self

    @model_validator(mode="after")
    def check_self_teacher_has_labels(self) -> ATPConfig:
        if self.kd_weight > 0 and self.ce_weight == 0 and self.kd_teacher == "self":
            raise ValueError(
                "atp.kd_teacher = 'self' with atp.ce_weight = 0: the student would only follow its own unmasked "
                "copy and never learn from the labels. Fix: set atp.ce_weight above 0, or use kd_teacher: base."
            )
        return self

    @model_validator(mode="after")
    def check_ce_weight_needs_distillation(self) -> ATPConfig:
        if self.kd_weight == 0 and self.ce_weight != 1.0:
            raise ValueError(
                f"atp.ce_weight = {self.ce_weight} has no effect with atp.kd_weight = 0 (distillation off, the "
                "plain training loss is used). Fix: remove atp.ce_weight, or set atp.kd_weight above 0."
            )
        return self

    @model_validator(mode="after")
    def check_kd_calibration_has_a_teacher(self) -> ATPConfig:
        if self.kd_calibration and self.kd_weight == 0:
            raise ValueError(
                "atp.kd_calibration = true needs a teacher, but atp.kd_weight = 0 turns distillation off. Fix: set "
                "atp.kd_weight above 0, or remove atp.kd_calibration."
            )
        return self

    @model_validator(mode="after")
    def resolve_kd_calibration(self) -> ATPConfig:
        if self.kd_calibration is None:  # a fixed `decision_file` trains no generator: nothing to calibrate
            self.kd_calibration = self.kd_weight > 0 and self.decision_file is None
        return self

    @model_validator(mode="after")
    def resolve_group_lasso(self) -> ATPConfig:
        if self.group_lasso is None:  # only the LoRA-aware forward leaves pruned LoRA slices live
            self.group_lasso = "prox" if self.lora_aware else "off"
        return self

    @model_validator(mode="after")
    def check_kd_teacher(self) -> ATPConfig:
        if self.kd_teacher not in ("base", "self") and not (Path(self.kd_teacher) / "adapter_config.json").is_file():
            raise ValueError(
                f"atp.kd_teacher = {self.kd_teacher!r} is neither `base`, `self` nor a LoRA adapter folder (no "
                "adapter_config.json there). Fix: use `base`, `self`, or the folder of a LoRA adapter of this base."
            )
        return self

    @model_validator(mode="after")
    def adopt_decision_file(self) -> ATPConfig:
        if self.decision_file is not None:
            self._adopt_decision_file()
        return self

    def _adopt_decision_file(self) -> None:
        """Take layout and prune_ratio from the decision file; refuse explicit values that disagree."""
        from axolotl_atp.masks_file import peek_masks_header

        header = peek_masks_header(Path(self.decision_file))
        for key in ("layout", "prune_ratio"):
            value = header[key]
            if key in self.model_fields_set and getattr(self, key) != value:
                raise ValueError(
                    f"atp.{key} = {getattr(self, key)!r} but atp.decision_file ({self.decision_file}) was made "
                    f"with {key} {value!r}. Fix: remove atp.{key} (the file's value is used) or use another file."
                )
            setattr(self, key, value)


class ATPArgs(BaseModel):
    """Plugin args merged into axolotl's config schema (see `ATPPlugin.get_input_args`)."""

    atp: ATPConfig | None = Field(
        default=None,
        description="All-in-One Tuning and Structural Pruning settings (see the axolotl-atp README).",
    )

    @model_validator(mode="before")
    @classmethod
    def _check_interplay(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not plugin_listed(data):
            return data
        check_axolotl_config(data)
        force_fused_kernels_off(data)
        return data


def plugin_listed(cfg: Any) -> bool:
    """Whether `plugins:` names the ATP plugin."""
    plugins = cfg.get("plugins") or []
    return any(str(p).split(".")[-1] == "ATPPlugin" and str(p).startswith("axolotl_atp") for p in plugins)


def force_fused_kernels_off(cfg: Any) -> list[str]:
    """Turn axolotl's fused LoRA kernels off; return the keys that the user had turned on."""
    was_on = [k for k in FUSED_LORA_KERNEL_KEYS if cfg.get(k)]
    for key in FUSED_LORA_KERNEL_KEYS:
        cfg[key] = False
    if was_on:
        LOG.warning(
            "axolotl-atp: turned off %s: the fused LoRA kernels bypass the LoRA layers that ATP's masks hook into.",
            ", ".join(was_on),
        )
    else:
        LOG.info("axolotl-atp: fused LoRA kernels are off (they would bypass ATP's mask hooks)")
    return was_on


# Keys ATP refuses whenever they are set (truthy), with the fix to name.
UNSUPPORTED_KEYS = {
    "sample_packing": "set `sample_packing: false` (packed rows are not supported by ATP yet)",
    "deepspeed": "remove `deepspeed` (DeepSpeed is not supported by ATP yet; use one GPU or plain DDP)",
    "fsdp": "remove `fsdp` (FSDP is not supported by ATP yet; use one GPU or plain DDP)",
    "fsdp_config": "remove `fsdp_config` (FSDP is not supported by ATP yet; use one GPU or plain DDP)",
    "relora": "remove `relora` (ReLoRA merges adapters mid-run, which ATP's masks do not follow)",
    "peft_use_dora": "remove `peft_use_dora` (DoRA's magnitude vector is not masked by ATP yet)",
    "lora_target_parameters": "remove `lora_target_parameters` (only LoRA on Linear modules is supported)",
    "unfrozen_parameters": "remove `unfrozen_parameters` (full fine-tuning of base weights is not supported)",
}
# Model-parallel sizes: 1 (or unset) is a single shard, anything else is refused.
MODEL_PARALLEL_KEYS = ("context_parallel_size", "tensor_parallel_size")
# Set by `accelerate launch` from an accelerate config of `distributed_type: FSDP` or `DEEPSPEED`.
ACCELERATE_SHARDING_ENV = (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"))


def require_atp_block(cfg: Any) -> None:
    if cfg.get("atp") is None:
        raise ValueError(
            f"`plugins` lists {PLUGIN_NAME} but the config has no `atp:` block. Fix: add one, e.g. "
            "`atp: {prune_ratio: 0.3}` (every key has a default), or remove the plugin."
        )


def require_lora_adapter(cfg: Any) -> None:
    adapter = cfg.get("adapter")
    if adapter not in ("lora", "qlora"):
        raise ValueError(
            f"adapter = {adapter!r}: ATP trains LoRA adapters alongside its pruning decision. "
            "Fix: set `adapter: lora` or `adapter: qlora` (with `load_in_4bit: true`)."
        )


def require_4bit_for_qlora(cfg: Any) -> None:
    """QLoRA trains on 4-bit weights; the merge (`merge_lora`) loads them unquantized."""
    if cfg.get("adapter") == "qlora" and not cfg.get("load_in_4bit") and not cfg.get("merge_lora"):
        raise ValueError(
            "adapter = 'qlora' needs load_in_4bit = true. Fix: set `load_in_4bit: true`, or use `adapter: lora`."
        )


def refuse_8bit(cfg: Any) -> None:
    if cfg.get("load_in_8bit"):
        raise ValueError(
            "load_in_8bit = true is not supported with ATP. Fix: use `adapter: qlora` with "
            "`load_in_4bit: true`, or LoRA in bf16/fp32."
        )


def refuse_rl(cfg: Any) -> None:
    if cfg.get("rl"):
        raise ValueError(
            f"rl = {cfg.get('rl')!r}: ATP runs with supervised fine-tuning only. Fix: remove `rl`, "
            "or remove the ATP plugin."
        )


def refuse_unsupported_keys(cfg: Any) -> None:
    for key, fix in UNSUPPORTED_KEYS.items():
        value = cfg.get(key)
        if value:
            raise ValueError(f"{key} = {value!r} is not supported with ATP. Fix: {fix}.")


def refuse_model_parallelism(cfg: Any) -> None:
    for key in MODEL_PARALLEL_KEYS:
        value = cfg.get(key)
        if value not in (None, 1):
            raise ValueError(
                f"{key} = {value!r} is not supported with ATP. Fix: remove `{key}` (not supported by ATP yet)."
            )


def refuse_sharding_from_accelerate(cfg: Any) -> None:
    """`accelerate launch` turns FSDP/DeepSpeed on through the environment, whatever the axolotl config says."""
    for var, what in ACCELERATE_SHARDING_ENV:
        value = os.environ.get(var, "")
        if value.lower() in ("true", "1", "yes"):
            raise ValueError(
                f"the environment has {var}={value} (set by `accelerate launch` from an accelerate config with "
                f"{what}), which is not supported with ATP. Fix: launch with an accelerate config of "
                "`distributed_type: MULTI_GPU` (plain DDP), or with torchrun, or on one GPU."
            )


def require_freeze_before_end(cfg: Any) -> None:
    max_steps = cfg.get("max_steps")
    atp = cfg.get("atp") or {}
    control_steps = atp.get("control_steps") if isinstance(atp, dict) else None
    if max_steps and control_steps and control_steps >= max_steps:
        raise ValueError(
            f"atp.control_steps = {control_steps} is not below max_steps = {max_steps}: the masks would "
            "never freeze before training ends. Fix: lower atp.control_steps (e.g. to half of max_steps)."
        )


# In this order: the first rule a config breaks is the one reported.
AXOLOTL_CONFIG_RULES = (
    require_atp_block,
    require_lora_adapter,
    require_4bit_for_qlora,
    refuse_8bit,
    refuse_rl,
    refuse_unsupported_keys,
    refuse_model_parallelism,
    refuse_sharding_from_accelerate,
    require_freeze_before_end,
)


def check_axolotl_config(cfg: Any) -> None:
    """Refuse axolotl settings that ATP does not support, naming the key, the value and the fix."""
    for rule in AXOLOTL_CONFIG_RULES:
        rule(cfg)
