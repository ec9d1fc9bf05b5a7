"""Distillation from the unpruned model in the LoRA steps, with no second copy of the weights.

The teacher is the model being trained with its masks off and, by default, its adapter disabled: the
base model (4-bit under QLoRA), run under `no_grad`. The student is the masked model. The LoRA step's
loss over the labelled tokens is

    ce_weight * CE(student, labels) + kd_weight * T^2 * KL(teacher || student)        (Minitron: forward KL, T=1)

Neither side's logits are ever materialised for the whole batch: both forwards stop at the final norm
(`logits_to_keep=1`, the hidden states captured by a hook), and the output head runs on chunks of
labelled tokens inside activation checkpoints, so a 128k vocabulary at sequence length 4096 holds one
chunk of logits at a time, in the forward and in the backward.

Wiring (`Distiller.install`): the trainer's `compute_loss` runs the teacher first, then calls the original
`compute_loss` with `logits_to_keep=1`; the loss itself is the trainer's `compute_loss_func`, so the HF
Trainer applies its own gradient-accumulation and data-parallel token normalisation to it, exactly as to
its own causal-LM loss.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.checkpoint import checkpoint

from axolotl_atp.architectures import ArchitectureSpec
from axolotl_atp.args import ATPConfig
from axolotl_atp.log import get_logger
from axolotl_atp.masking import MaskedModel
from axolotl_atp.peft_unwrap import unwrap_base_model

LOG = get_logger(__name__)
IGNORE_INDEX = -100
TEACHER_ADAPTER = "atp_teacher"


# ----- the loss ---------------------------------------------------------------------------------------
@dataclass
class DistillationSums:
    """Sums over the labelled tokens of one micro-batch (divide by `tokens` for means)."""

    ce: torch.Tensor
    kl: torch.Tensor
    tokens: int


def logits_function(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Hidden states after the final norm -> fp32 logits, as the model's own head computes them."""
    base = unwrap_base_model(model)
    head = base.get_output_embeddings()
    config = base.config
    text = getattr(config, "text_config", None) or config
    softcap = getattr(text, "final_logit_softcapping", None) or getattr(config, "final_logit_softcapping", None)

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = head(hidden).float()
        if softcap:
            out = torch.tanh(out / softcap) * softcap
        return out

    return logits


def _chunk_terms(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    logits: Callable[[torch.Tensor], torch.Tensor],
    temperature: float,
    with_kl: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE sum, KL(teacher || student) sum at temperature T) of one chunk of labelled tokens."""
    student_logits = logits(student)
    if not with_kl:
        ce = F.cross_entropy(student_logits, labels, reduction="sum")
        return ce, ce.new_zeros(())
    with torch.no_grad():
        teacher_logprobs = F.log_softmax(_scaled(logits(teacher), temperature), dim=-1)
    student_logprobs = F.log_softmax(_scaled(student_logits, temperature), dim=-1)
    if temperature == 1.0:  # the CE reuses the KL's log-softmax
        ce = -student_logprobs.gather(1, labels[:, None]).sum()
    else:
        ce = F.cross_entropy(student_logits, labels, reduction="sum")
    kl = (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum()
    return ce, kl


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature


def distillation_sums(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    labels: torch.Tensor,
    logits: Callable[[torch.Tensor], torch.Tensor],
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
) -> DistillationSums:
    """CE and KL sums over the labelled next-token positions, one chunk of logits at a time.

    `*_hidden` are [batch, seq, hidden] after the final norm; position t predicts `labels[:, t + 1]`, as in
    the causal-LM loss of transformers. Where there are several chunks, each runs inside a non-reentrant
    activation checkpoint: its logits are freed after the forward and recomputed in the backward. A single
    chunk runs without one: its logits are the only ones held either way, and recomputing them would cost
    one more pass of the output head.
    """
    hidden_size = student_hidden.shape[-1]
    targets = labels[:, 1:].reshape(-1).to(student_hidden.device)
    positions = torch.nonzero(targets != IGNORE_INDEX).flatten()
    student = student_hidden[:, :-1].reshape(-1, hidden_size)[positions]
    teacher = None if teacher_hidden is None else teacher_hidden[:, :-1].reshape(-1, hidden_size)[positions]
    targets = targets[positions]
    ce = student_hidden.new_zeros((), dtype=torch.float32)
    kl = student_hidden.new_zeros((), dtype=torch.float32)
    count = int(positions.numel())
    for start in range(0, count, chunk_tokens):
        part = slice(start, start + chunk_tokens)
        t_part = teacher[part] if teacher is not None else student[part].detach()
        args = (student[part], t_part, targets[part], logits, temperature, teacher is not None)
        if count > chunk_tokens:
            chunk_ce, chunk_kl = checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            chunk_ce, chunk_kl = _chunk_terms(*args)
        ce = ce + chunk_ce
        kl = kl + chunk_kl
    return DistillationSums(ce=ce, kl=kl, tokens=count)


# ----- the teacher ------------------------------------------------------------------------------------
def final_norm_path(spec: ArchitectureSpec) -> str:
    """The decoder's final norm, beside its layers (`model.norm`, `model.language_model.norm`)."""
    return spec.layers_path.rsplit(".", 1)[0] + ".norm"


@contextmanager
def captured_output(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect `module`'s outputs during the block (the final norm: the hidden states the head reads)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        yield seen
    finally:
        handle.remove()


def accepts_logits_to_keep(model: nn.Module) -> bool:
    forward = unwrap_base_model(model).forward
    return "logits_to_keep" in inspect.signature(forward).parameters


class Teacher:
    """The unpruned model, computed in place: masks off, and the adapter disabled (`base`), kept (`self`),
    or swapped for a second, frozen adapter loaded from a folder."""

    def __init__(self, model: nn.Module, masked: MaskedModel, norm: nn.Module, kind: str):
        self.peft_model = getattr(model, "module", model)  # under DDP, the teacher bypasses the wrapper
        self.masked = masked
        self.norm = norm
        self.kind = kind
        if kind not in ("base", "self"):
            self._load_adapter(Path(kind))

    def _load_adapter(self, folder: Path) -> None:
        trainable = {n for n, p in self.peft_model.named_parameters() if p.requires_grad}
        was_training = self.peft_model.training
        # peft's load_adapter puts the model in eval mode for a frozen adapter: restore what training had.
        self.peft_model.load_adapter(str(folder), adapter_name=TEACHER_ADAPTER, is_trainable=False)
        self.peft_model.train(was_training)
        for name, param in self.peft_model.named_parameters():
            param.requires_grad_(name in trainable)
        LOG.info("axolotl-atp: distillation teacher: the base model with the adapter in %s", folder)

    @contextmanager
    def _active(self) -> Iterator[None]:
        """The teacher's adapter state for one forward; everything is restored afterwards."""
        if self.kind == "base":
            with self.peft_model.disable_adapter():
                yield
            return
        if self.kind == "self":
            yield
            return
        previous = self.peft_model.active_adapter
        flags = {n: p.requires_grad for n, p in self.peft_model.named_parameters()}
        self.peft_model.base_model.set_adapter(TEACHER_ADAPTER)
        try:
            yield
        finally:
            self.peft_model.base_model.set_adapter(previous)
            for name, param in self.peft_model.named_parameters():
                param.requires_grad_(flags[name])

    @torch.no_grad()
    def hidden_states(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The teacher's final-norm hidden states for a batch (no grad, eval mode, masks off)."""
        was_training = self.peft_model.training
        self.peft_model.eval()
        try:
            with self.masked.masks_off(), self._active(), captured_output(self.norm) as seen:
                self.peft_model(**inputs)
        finally:
            self.peft_model.train(was_training)
        return seen[-1].detach()

    def remove(self) -> None:
        """Drop a loaded teacher adapter, so that the run's saved adapter is the student's alone."""
        if self.kind not in ("base", "self") and TEACHER_ADAPTER in getattr(self.peft_model, "peft_config", {}):
            self.peft_model.delete_adapter(TEACHER_ADAPTER)


# ----- wiring into the trainer ------------------------------------------------------------------------
class Distiller:
    """Owns the teacher and the loss of the LoRA steps (and, with `kd_calibration`, of the generator steps).

    `install()` wraps the trainer before training; `start()` (at train begin, once the masks exist) builds
    the teacher. Until then, and in evaluation, the loss is the plain causal-LM loss.
    """

    def __init__(self, trainer: Any, cfg: ATPConfig):
        self.trainer = trainer
        self.cfg = cfg
        self.teacher: Teacher | None = None
        self.norm: nn.Module | None = None
        self.logits: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.keep_one_logit = False
        self._teacher_hidden: torch.Tensor | None = None
        self._student_hidden: list[torch.Tensor] | None = None
        self._sums: dict[str, float] = {"ce": 0.0, "kd": 0.0, "tokens": 0.0}

    def start(self, masked: MaskedModel, spec: ArchitectureSpec) -> None:
        model = self.trainer.model
        base = unwrap_base_model(getattr(model, "module", model))
        self.norm = base.get_submodule(final_norm_path(spec))
        self.logits = logits_function(base)
        self.keep_one_logit = accepts_logits_to_keep(base)
        self.teacher = Teacher(model, masked, self.norm, self.cfg.kd_teacher)

    def finish(self) -> None:
        if self.teacher is not None:
            self.teacher.remove()
        self.teacher = None

    def install(self) -> None:
        """Route the trainer's training loss through this distiller (see the module docstring)."""
        trainer = self.trainer
        if getattr(trainer, "compute_loss_func", None) is not None:
            raise ValueError(
                "axolotl-atp: distillation (atp.kd_weight > 0) computes the training loss itself, but this trainer "
                f"already has a custom loss ({trainer.compute_loss_func!r}). Fix: set atp.kd_weight: 0, or drop the "
                "setting that installs the other loss."
            )
        trainer.compute_loss_func = self.loss_from_outputs
        compute_loss = trainer.compute_loss

        @functools.wraps(compute_loss)
        def with_teacher(model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None):
            if not model.training or self.teacher is None or self.norm is None:
                return compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            with self._teacher_then_student(inputs) as (student_inputs, teacher, student):
                self._teacher_hidden, self._student_hidden = teacher, student
                try:
                    return compute_loss(
                        model, student_inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                    )
                finally:
                    self._teacher_hidden, self._student_hidden = None, None

        trainer.compute_loss = with_teacher

    def loss_from_outputs(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        """The trainer's `compute_loss_func`: CE + KD in training, the plain causal-LM loss in evaluation."""
        if self._student_hidden is None or self.logits is None:  # evaluation: the model computed full logits
            from transformers.loss.loss_utils import ForCausalLMLoss

            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            return ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch)
        sums = distillation_sums(
            self._student_hidden[-1],
            self._teacher_hidden,
            labels,
            self.logits,
            self.cfg.kd_temperature,
            self.cfg.kd_chunk_tokens,
        )
        total = self.cfg.ce_weight * sums.ce + self.cfg.kd_weight * self.cfg.kd_temperature**2 * sums.kl
        self._sums["ce"] += float(sums.ce.detach())
        self._sums["kd"] += float(sums.kl.detach())
        self._sums["tokens"] += sums.tokens
        # As transformers' causal-LM loss: a sum over the accumulated batch's labelled tokens divided by their
        # count (the Trainer does not divide again when a compute_loss_func is set), or a micro-batch mean.
        denominator = num_items_in_batch if num_items_in_batch is not None else max(1, sums.tokens)
        if torch.is_tensor(denominator):
            denominator = denominator.to(total.device)
        return total / denominator

    def calibration_loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """KL(teacher || masked model) per labelled token on a calibration batch (`kd_calibration`)."""
        assert self.logits is not None
        with self._teacher_then_student(batch) as (student_inputs, teacher, student):
            model(**{k: v for k, v in student_inputs.items() if k != "labels"})
        sums = distillation_sums(student[-1], teacher, batch["labels"], self.logits, self.cfg.kd_temperature)
        return self.cfg.kd_temperature**2 * sums.kl / max(1, sums.tokens)

    @contextmanager
    def _teacher_then_student(
        self, inputs: dict[str, Any]
    ) -> Iterator[tuple[dict[str, Any], torch.Tensor, list[torch.Tensor]]]:
        """The steps both losses share: the teacher's hidden states for `inputs` (run now), then, for the
        student's forward inside the block, its inputs (`logits_to_keep=1` where the model takes it) and the
        list that collects its final-norm hidden states."""
        assert self.teacher is not None and self.norm is not None
        # Both forwards stop the output head at one position: the hook's hidden states feed the chunked head.
        keep = {"logits_to_keep": 1} if self.keep_one_logit else {}
        teacher = self.teacher.hidden_states({**{k: v for k, v in inputs.items() if k != "labels"}, **keep})
        student_inputs = {**inputs, **keep}
        with captured_output(self.norm) as seen:
            yield student_inputs, teacher, seen

    def pop_metrics(self) -> dict[str, float]:
        """Per-token means of the CE and KD terms since the last call (one optimizer step)."""
        sums, self._sums = self._sums, {"ce": 0.0, "kd": 0.0, "tokens": 0.0}
        if not sums["tokens"]:
            return {}
        return {"atp/ce_loss": sums["ce"] / sums["tokens"], "atp/kd_loss": sums["kd"] / sums["tokens"]}
