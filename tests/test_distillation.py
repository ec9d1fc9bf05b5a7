"""Distillation from the unpruned model (axolotl_atp/training/distillation.py), on tiny models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from axolotl_atp.architectures import spec_for
from axolotl_atp.args import ATPConfig
from axolotl_atp.groups import ModelGeometry
from axolotl_atp.masking import MaskedModel, MaskMode
from axolotl_atp.training.distillation import (
    Distiller,
    Teacher,
    captured_output,
    distillation_sums,
    final_norm_path,
    logits_function,
)
from tests.kit import tiny_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"]
VOCAB = 64


def peft_tiny(family: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, VOCAB))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    return peft_model


def masked_model(peft_model) -> tuple[MaskedModel, object]:
    spec = spec_for(peft_model.get_base_model().config.model_type)
    geo = ModelGeometry.from_config(peft_model.get_base_model().config, spec)
    masked = MaskedModel(peft_model, spec, geo)
    masks = {
        "attention_heads": torch.ones(geo.num_layers, geo.num_kv_heads),
        "mlp_channels": (torch.rand(geo.num_layers, geo.intermediate_size) > 0.5).float(),
    }
    masks["attention_heads"][:, 0] = 0.0
    masked.set_masks(masks, MaskMode.LORA_AWARE)
    return masked, spec


def batch(seed: int = 0, rows: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that is not trained on
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def hidden_and_logits(peft_model, spec, inputs):
    norm = peft_model.get_base_model().get_submodule(final_norm_path(spec))
    with captured_output(norm) as seen:
        out = peft_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return seen[-1], out.logits


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_kd_is_zero_when_the_student_is_the_teacher_and_ce_matches_transformers(family):
    peft_model = peft_tiny(family).eval()
    spec = spec_for(peft_model.get_base_model().config.model_type)
    inputs = batch()
    hidden, logits = hidden_and_logits(peft_model, spec, inputs)
    sums = distillation_sums(hidden, hidden, inputs["labels"], logits_function(peft_model), chunk_tokens=5)
    assert float(sums.kl) == pytest.approx(0.0, abs=1e-5)
    assert sums.tokens == int((inputs["labels"][:, 1:] != -100).sum())
    # The CE (soft-capped logits for Gemma 2) is transformers' own causal-LM loss.
    reference = ForCausalLMLoss(logits, inputs["labels"], VOCAB, num_items_in_batch=sums.tokens)
    assert float(sums.ce) / sums.tokens == pytest.approx(float(reference), rel=1e-5)


def test_chunked_kl_equals_unchunked_in_value_and_gradient():
    peft_model = peft_tiny().eval()
    spec = spec_for("llama")
    inputs = batch(rows=3)
    hidden, _ = hidden_and_logits(peft_model, spec, inputs)
    teacher = hidden.detach() + 2.0 * torch.randn_like(hidden)
    logits = logits_function(peft_model)
    results = []
    for chunk in (1, 7, 10_000):
        student = hidden.detach().clone().requires_grad_(True)
        sums = distillation_sums(student, teacher, inputs["labels"], logits, temperature=2.0, chunk_tokens=chunk)
        (sums.ce + 3.0 * sums.kl).backward()
        results.append((float(sums.ce), float(sums.kl), student.grad.clone()))
    assert results[0][1] > 1e-3  # the teacher differs: the KL is not trivially 0
    for ce, kl, grad in results[1:]:
        assert ce == pytest.approx(results[0][0], rel=1e-5)
        assert kl == pytest.approx(results[0][1], rel=1e-4)
        torch.testing.assert_close(grad, results[0][2], rtol=1e-4, atol=1e-6)


def test_kl_is_the_full_kl_of_the_softened_distributions():
    peft_model = peft_tiny().eval()
    inputs = batch(rows=1, length=6)
    inputs["labels"][:] = inputs["input_ids"]
    hidden, _ = hidden_and_logits(peft_model, spec_for("llama"), inputs)
    teacher = hidden + 0.5 * torch.randn_like(hidden)
    logits = logits_function(peft_model)
    sums = distillation_sums(hidden, teacher, inputs["labels"], logits, temperature=2.0)
    t = torch.log_softmax(logits(teacher[0, :-1]) / 2.0, -1)
    s = torch.log_softmax(logits(hidden[0, :-1]) / 2.0, -1)
    expected = torch.nn.functional.kl_div(s, t, log_target=True, reduction="sum")
    assert float(sums.kl) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("kind", ["base", "self", "folder"])
def test_teacher_runs_without_grad_and_restores_masks_and_adapter(kind, tmp_path):
    peft_model = peft_tiny().train()
    masked, spec = masked_model(peft_model)
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    norm = peft_model.get_base_model().get_submodule(final_norm_path(spec))
    mode, masks = masked.mode, masked.masks
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    student_before = peft_model(**inputs).logits.detach()

    if kind == "folder":  # a second adapter, e.g. a dense LoRA trained on the same data
        other = peft_tiny()  # the same base, another adapter
        with torch.no_grad():
            for name, param in other.named_parameters():
                if "lora_" in name:
                    param.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
        other.save_pretrained(tmp_path / "teacher-adapter")
        teacher = Teacher(peft_model, masked, norm, str(tmp_path / "teacher-adapter"))
    else:
        teacher = Teacher(peft_model, masked, norm, kind)
    hidden = teacher.hidden_states(inputs)

    # The expected teacher, computed independently.
    with masked.masks_off():
        if kind == "base":
            with peft_model.disable_adapter():
                expected, _ = hidden_and_logits(peft_model, spec, inputs)
        elif kind == "self":
            expected, _ = hidden_and_logits(peft_model, spec, inputs)
        else:
            expected, _ = hidden_and_logits(other.eval(), spec, inputs)
    assert not hidden.requires_grad
    torch.testing.assert_close(hidden, expected.detach(), rtol=1e-5, atol=1e-5)
    # Everything is as it was: mode, masks, train mode, active adapter, trainable parameters, the function.
    assert masked.mode is mode and masked.masks is masks
    assert peft_model.training and peft_model.active_adapter == "default"
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == trainable
    torch.testing.assert_close(peft_model(**inputs).logits.detach(), student_before)
    teacher.remove()
    assert set(peft_model.peft_config) == {"default"}


class FakeTrainer:
    """What `Distiller` reads from an HF Trainer: the model, `compute_loss` and `compute_loss_func`."""

    def __init__(self, model):
        self.model = model
        self.compute_loss_func = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # As transformers' Trainer.compute_loss with a compute_loss_func set.
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


def test_distiller_loss_mixes_ce_and_kd_over_the_accumulated_tokens():
    peft_model = peft_tiny().train()
    masked, spec = masked_model(peft_model)
    cfg = ATPConfig(kd_weight=0.5, ce_weight=2.0, kd_temperature=1.0)
    trainer = FakeTrainer(peft_model)
    distiller = Distiller(trainer, cfg)
    distiller.install()
    distiller.start(masked, spec)
    inputs = batch()
    num_items = 40  # the accumulated batch's labelled tokens (more than this micro-batch's)
    loss = trainer.compute_loss(peft_model, inputs, num_items_in_batch=num_items)

    # Independently: the masked student's and the unmasked base's logits.
    student = peft_model(input_ids=inputs["input_ids"]).logits
    with masked.masks_off(), peft_model.disable_adapter(), torch.no_grad():
        teacher = peft_model(input_ids=inputs["input_ids"]).logits
    labels = inputs["labels"][:, 1:].reshape(-1)
    keep = labels != -100
    s = torch.log_softmax(student[:, :-1].reshape(-1, VOCAB)[keep], -1)
    t = torch.log_softmax(teacher[:, :-1].reshape(-1, VOCAB)[keep], -1)
    ce = torch.nn.functional.nll_loss(s, labels[keep], reduction="sum")
    kl = (t.exp() * (t - s)).sum()
    assert float(loss) == pytest.approx(float((2.0 * ce + 0.5 * kl) / num_items), rel=1e-5)
    metrics = distiller.pop_metrics()
    assert metrics["atp/ce_loss"] == pytest.approx(float(ce) / int(keep.sum()), rel=1e-5)
    assert metrics["atp/kd_loss"] == pytest.approx(float(kl) / int(keep.sum()), rel=1e-5)
    assert distiller.pop_metrics() == {}
    loss.backward()  # reaches the LoRA weights
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora" in n)

    # Evaluation: the plain causal-LM loss of the full logits.
    peft_model.eval()
    with torch.no_grad():
        eval_loss = trainer.compute_loss(peft_model, inputs)
        expected = peft_model(input_ids=inputs["input_ids"], labels=inputs["labels"]).loss
    assert float(eval_loss) == pytest.approx(float(expected), rel=1e-5)


def test_calibration_loss_is_the_kl_to_the_unpruned_model_and_reaches_the_masks():
    """`kd_calibration`: the generator's loss is KL(unpruned base || masked model) per labelled token, and its
    gradient reaches the soft masks (the generator's output), as the CE calibration loss does."""
    peft_model = peft_tiny().train()
    masked, spec = masked_model(peft_model)
    geo = masked.geo
    soft = {
        "attention_heads": torch.full((geo.num_layers, geo.num_kv_heads), 0.7, requires_grad=True),
        "mlp_channels": torch.rand(geo.num_layers, geo.intermediate_size, generator=torch.Generator().manual_seed(1))
        .clamp(0.05, 0.95)
        .requires_grad_(),
    }
    masked.set_masks(soft, MaskMode.FULL)
    distiller = Distiller(FakeTrainer(peft_model), ATPConfig(kd_calibration=True))
    distiller.start(masked, spec)
    inputs = batch(seed=4)
    loss = distiller.calibration_loss(peft_model, inputs)

    with torch.no_grad():
        student = peft_model(input_ids=inputs["input_ids"]).logits
        with masked.masks_off(), peft_model.disable_adapter():
            teacher = peft_model(input_ids=inputs["input_ids"]).logits
    labels = inputs["labels"][:, 1:].reshape(-1)
    keep = labels != -100
    s = torch.log_softmax(student[:, :-1].reshape(-1, VOCAB)[keep], -1)
    t = torch.log_softmax(teacher[:, :-1].reshape(-1, VOCAB)[keep], -1)
    assert float(loss) == pytest.approx(float((t.exp() * (t - s)).sum() / keep.sum()), rel=1e-5)
    assert float(loss) > 0
    loss.backward()  # as the generator step: into the mask leaves, then on to the compact masks
    torch.stack(masked.mask_gradient_terms()).sum().backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in soft.values())

    # The same model as its own teacher (masks all on, the run's adapter kept): nothing to distil.
    masked.set_masks({k: torch.ones_like(v) for k, v in soft.items()}, MaskMode.FULL)
    distiller = Distiller(FakeTrainer(peft_model), ATPConfig(kd_calibration=True, kd_teacher="self"))
    distiller.start(masked, spec)
    assert float(distiller.calibration_loss(peft_model, inputs)) == pytest.approx(0.0, abs=1e-6)


def test_distiller_refuses_a_trainer_with_another_loss():
    trainer = SimpleNamespace(model=None, compute_loss_func=lambda *a, **k: 0, compute_loss=None)
    with pytest.raises(ValueError, match=r"atp\.kd_weight: 0"):
        Distiller(trainer, ATPConfig()).install()


def test_kd_options_are_validated(tmp_path):
    with pytest.raises(ValueError, match="kd_teacher"):
        ATPConfig(kd_teacher=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="ce_weight"):
        ATPConfig(kd_weight=0.0, ce_weight=0.5)
    with pytest.raises(ValueError, match="kd_calibration"):
        ATPConfig(kd_weight=0.0, kd_calibration=True)
    # Unset, it follows distillation: on with a teacher, off without one.
    assert ATPConfig().kd_calibration is True
    assert ATPConfig(kd_weight=0.0).kd_calibration is False
    assert ATPConfig(kd_calibration=False).kd_calibration is False
    with pytest.raises(ValueError, match="never learn from the labels"):
        ATPConfig(kd_teacher="self", ce_weight=0.0)
