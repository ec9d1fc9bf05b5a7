"""One run's step logic (`training/controller.py`): the generator learns, NaNs stop, fixed decisions, the freeze."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from axolotl_atp.args import ATPConfig
from axolotl_atp.decision import Decision
from axolotl_atp.groups import HEADS, MLP, ParameterCounter, slice_refs
from axolotl_atp.masking import MaskMode
from axolotl_atp.training.controller import ATPController
from tests.tiny_models import TARGETS, geometry, lora_model, random_kept, tiny


def pattern_batch(g: torch.Generator, n: int) -> torch.Tensor:
    """Arithmetic progressions mod 64: the next token is predictable, so a trained MLP matters."""
    start = torch.randint(0, 64, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    return (start + stride * torch.arange(16)) % 64


def test_generator_learns_important_channels():
    """Channels 0..47 are trained and carry the model; 48..95 are dead. The generator keeps the live ones."""
    model = tiny("llama", seed=3, num_hidden_layers=1).train()
    down = model.model.layers[0].mlp.down_proj.weight
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        with torch.no_grad():
            down[:, 48:] = 0.0
        ids = pattern_batch(g, 16)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        down[:, 48:] = 0.0
    peft_model = get_peft_model(model.eval(), LoraConfig(r=2, target_modules=TARGETS, lora_dropout=0.0))
    cfg = ATPConfig(prune_ratio=0.3, structures=["mlp_channels"], generator_lr=5e-3)
    ctl = ATPController(peft_model, cfg, total_steps=400, peak_lr=1e-3, seed=0)

    def loss():
        ids = pattern_batch(g, 16)
        return peft_model(input_ids=ids, labels=ids).loss

    for step in range(200):
        ctl.begin_step(step, loss)
    assert ctl.metrics["atp/remaining_ratio"] < 0.9  # the budget loss pulled the decision down
    scores = ctl.scores()[MLP][0]
    assert scores[:48].mean() > scores[48:].mean() + 0.5
    decision = ctl.freeze()
    kept = set(decision.kept[MLP][0])
    live_kept = len(kept & set(range(48))) / 48
    dead_kept = len(kept & set(range(48, 96))) / 48
    assert live_kept > dead_kept + 0.15, (live_kept, dead_kept)  # chance: equal fractions


def test_non_finite_loss_stops_with_step_and_term():
    from axolotl_atp.training.controller import NonFiniteError

    peft_model = lora_model("llama")
    ctl = ATPController(peft_model, ATPConfig(prune_ratio=0.3), total_steps=10, peak_lr=1e-3, seed=0)

    def nan_loss():
        return peft_model(input_ids=torch.randint(0, 64, (1, 8))).logits.sum() * float("nan")

    with pytest.raises(NonFiniteError, match=r"calibration loss is nan at optimizer step 3"):
        ctl.generator_step(nan_loss, 3)
    with torch.no_grad():
        next(p for n, p in peft_model.named_parameters() if "lora_B" in n).fill_(float("inf"))
    ctl.hard_masks = {s: torch.zeros_like(m) for s, m in ctl.hard_masks.items()}  # every group pruned
    with pytest.raises(NonFiniteError, match=r"group-lasso norm is (inf|nan) at optimizer step 4"):
        ctl.end_step(4)


def _masks_file(tmp_path, peft_model, layout: str, ratio: float):
    from axolotl_atp.atomic_files import write_json_atomically
    from axolotl_atp.masks_file import decision_to_json

    spec, geo = geometry(peft_model.get_base_model())
    decision = Decision(kept=random_kept(geo, 7, uniform=layout == "uniform"), geo=geo)
    counter = ParameterCounter(geo, slice_refs(spec, geo))
    data = decision_to_json(
        decision, model_type="llama", prune_ratio=ratio, layout=layout, structures=[HEADS, MLP], counter=counter
    )
    path = tmp_path / "decision.json"
    write_json_atomically(data, path)
    return path, decision


def test_decision_file_fixes_the_decision_from_step_zero(tmp_path):
    """A static decision (the two-stage baseline's path): no generator step, the masks never move."""
    peft_model = lora_model("llama")
    path, decision = _masks_file(tmp_path, peft_model, "uniform", 0.35)
    cfg = ATPConfig(decision_file=str(path), lora_aware=False, group_lasso="off")
    assert (cfg.layout, cfg.prune_ratio) == ("uniform", 0.35)  # adopted from the file
    assert cfg.kd_calibration is False  # no generator to calibrate
    ctl = ATPController(peft_model, cfg, total_steps=6, peak_lr=1e-3, seed=0)
    before = copy.deepcopy(ctl.generator.state_dict())

    def calibration_loss():
        raise AssertionError("no generator step may run with a fixed decision")

    for step in range(6):
        ctl.begin_step(step, calibration_loss)
        assert ctl.masked.mode is MaskMode.FULL  # lora_aware: false = plain hard masks in LoRA steps
        ctl.end_step(step)
    assert ctl.finish().kept == decision.kept
    assert all(torch.equal(before[k], v) for k, v in ctl.generator.state_dict().items())


def test_decision_file_conflicts_and_bad_files_are_refused(tmp_path):
    from pydantic import ValidationError

    path, _ = _masks_file(tmp_path, lora_model("llama"), "per_layer", 0.3)
    with pytest.raises(ValidationError, match=r"atp.layout = 'uniform' but atp.decision_file .* layout 'per_layer'"):
        ATPConfig(decision_file=str(path), layout="uniform")
    with pytest.raises(ValidationError, match=r"atp.prune_ratio = 0.5 .* prune_ratio 0.3"):
        ATPConfig(decision_file=str(path), prune_ratio=0.5)
    with pytest.raises(ValidationError, match=r"not found"):
        ATPConfig(decision_file=str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValidationError, match=r"not an axolotl-atp masks file"):
        ATPConfig(decision_file=str(tmp_path / "bad.json"))
    # A decision for another model is refused when the controller meets the model.
    other = lora_model("llama_mha")
    with pytest.raises(ValueError, match=r"Fix: merge with the base model"):
        ATPController(other, ATPConfig(decision_file=str(path)), total_steps=4, peak_lr=1e-3, seed=0)


def test_budget_gap_at_freeze_is_measured():
    """A control phase too short for the generator to reach the budget is measured at the freeze."""
    peft_model = lora_model("llama")
    ctl = ATPController(peft_model, ATPConfig(prune_ratio=0.5, control_steps=1), total_steps=4, peak_lr=1e-3, seed=0)
    ids = torch.randint(0, 64, (2, 8))

    def calibration_loss():
        return peft_model(input_ids=ids, labels=ids).loss

    ctl.begin_step(0, calibration_loss)
    assert ctl.budget_gap_at_freeze is None
    ctl.begin_step(1, calibration_loss)  # the freeze, after a single generator step from a dense start
    assert ctl.frozen and ctl.budget_gap_at_freeze == pytest.approx(ctl.last_remaining_ratio - 0.5)
    assert ctl.budget_gap_at_freeze > 0.3


@pytest.mark.parametrize("control_masks", ["sample", "decision"])
def test_control_masks_are_the_sample_or_the_noise_free_decision(control_masks):
    """`control_masks`: the LoRA steps of the control phase train with the generator step's Gumbel sample, or with
    the generator's own noise-free decision after its update (the masks a freeze at that point would rank first)."""
    peft_model = lora_model("llama")
    cfg = ATPConfig(prune_ratio=0.5, control_steps=6, control_masks=control_masks, offset=0.0)
    ctl = ATPController(peft_model, cfg, total_steps=12, peak_lr=1e-3, seed=0)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))

    def calibration_loss():
        return peft_model(input_ids=ids, labels=ids).loss

    differs_from_decision = False
    for step in range(4):
        ctl.begin_step(step, calibration_loss)
        decision = {s: (score >= 0).float() for s, score in ctl.scores().items()}
        same = all(torch.equal(ctl.hard_masks[s], decision[s]) for s in decision)
        if control_masks == "decision":
            assert same, step
        differs_from_decision |= not same
    # At offset 0 half the groups sit at the threshold: the noisy sample is not the decision.
    assert differs_from_decision == (control_masks == "sample")


def test_freeze_channels_importance_keeps_the_generators_widths_and_heads_and_the_priors_channels():
    """Two runs alike but for `freeze_channels`: the same KV heads and per-layer MLP widths at the freeze; with
    `importance` each layer keeps its channels of highest importance (the prior), and the LoRA steps train with them."""
    peft_model = lora_model("llama")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    importance = torch.randn(2, 96, generator=torch.Generator().manual_seed(1))
    frozen = {}
    for choice in ("generator", "importance"):
        model = copy.deepcopy(peft_model)
        cfg = ATPConfig(prune_ratio=0.4, control_steps=3, freeze_channels=choice)
        ctl = ATPController(model, cfg, total_steps=6, peak_lr=1e-3, seed=0)
        assert ctl.geo.num_layers == 2 and ctl.geo.num_groups(MLP) == 96
        ctl.set_importance_prior({MLP: importance})

        def calibration_loss(model=model):
            return model(input_ids=ids, labels=ids).loss

        for step in range(4):
            ctl.begin_step(step, calibration_loss)
        frozen[choice] = ctl
    by_generator, by_importance = frozen["generator"].decision, frozen["importance"].decision
    assert by_importance.counts() == by_generator.counts()
    assert by_importance.kept[HEADS] == by_generator.kept[HEADS]
    for layer, kept in enumerate(by_importance.kept[MLP]):
        assert kept == sorted(torch.argsort(importance[layer], descending=True, stable=True)[: len(kept)].tolist())
    assert by_importance.kept[MLP] != by_generator.kept[MLP]
    # The LoRA steps after the freeze train with the rechosen channels, and the export writes them.
    assert torch.equal(frozen["importance"].hard_masks[MLP], by_importance.masks()[MLP])
