"""Mechanics on tiny models built in the test: counting, masks, budget, group lasso, generator."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from axolotl_atp.architectures import UnsupportedArchitectureError, spec_for
from axolotl_atp.args import ATPConfig
from axolotl_atp.decision import Decision, freeze_decision, stock_config_accepts_heads
from axolotl_atp.export.slicing import slice_layer
from axolotl_atp.groups import HEADS, MLP, ModelGeometry, ParameterCounter, slice_refs
from axolotl_atp.masking import MaskedModel, MaskMode
from axolotl_atp.training.controller import ATPController
from axolotl_atp.training.group_lasso import GroupLasso
from tests.kit import GEMMA3_LORA_TARGETS, tiny_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"]
FAMILIES = ["llama", "llama_mha", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "gemma3"]


def tiny(family: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, 64, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.eval()


def geometry(model):
    spec = spec_for(model.config.model_type)
    return spec, ModelGeometry.from_config(model.config, spec)


def random_kept(geo: ModelGeometry, seed: int, uniform: bool) -> dict[str, list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    kept = {}
    for s in (HEADS, MLP):
        n = geo.num_groups(s)
        k_uniform = int(torch.randint(1, n + 1, (1,), generator=g))
        layers = []
        for _ in range(geo.num_layers):
            k = k_uniform if uniform else int(torch.randint(1, n + 1, (1,), generator=g))
            layers.append(sorted(torch.randperm(n, generator=g)[:k].tolist()))
        kept[s] = layers
    return kept


def physically_pruned(model, kept, spec, geo):
    """A stock model of the same family with the kept widths (uniform counts), weights sliced."""
    refs = slice_refs(spec, geo)
    cfg = copy.deepcopy(model.config)
    text = cfg.get_text_config()  # transformers' own accessor, independent of the spec's
    kv = len(kept[HEADS][0])
    text.num_key_value_heads = kv
    text.num_attention_heads = kv * geo.group_size
    text.head_dim = geo.head_dim
    text.intermediate_size = len(kept[MLP][0])
    small = AutoModelForCausalLM.from_config(cfg).eval()
    state = model.state_dict()
    new_state = {}
    prefix = f"{spec.layers_path}."
    for layer in range(geo.num_layers):
        lp = f"{prefix}{layer}."
        tensors = {k[len(lp) :]: v for k, v in state.items() if k.startswith(lp)}
        sliced = slice_layer(tensors, refs, {s: kept[s][layer] for s in kept})
        new_state.update({lp + k: v for k, v in sliced.items()})
    new_state.update({k: v for k, v in state.items() if not k.startswith(prefix)})
    small.load_state_dict(new_state)
    return small


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_matches_sliced_model(family):
    model = tiny(family)
    spec, geo = geometry(model)
    counter = ParameterCounter(geo, slice_refs(spec, geo))
    # (the multimodal Gemma 3's vision tower has q/k/v_proj too: they are not prunable)
    prunable = [m for n, m in model.named_modules() if n.split(".")[-1] in TARGETS and "vision" not in n]
    assert counter.prunable_total == sum(p.numel() for m in prunable for p in m.parameters())
    kept = random_kept(geo, seed=1, uniform=True)
    small = physically_pruned(model, kept, spec, geo)
    small_prunable = [m for n, m in small.named_modules() if n.split(".")[-1] in TARGETS and "vision" not in n]
    assert counter.remaining_from_kept(kept) == sum(p.numel() for m in small_prunable for p in m.parameters())
    masks = Decision(kept=kept, geo=geo).masks()
    assert int(counter.remaining(masks)) == counter.remaining_from_kept(kept)


def test_qwen2_biases_are_counted_and_sliced():
    model = tiny("qwen2")
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    _, geo = geometry(model)
    assert geo.qkv_bias and not geo.o_bias


def test_unknown_architecture_is_refused():
    with pytest.raises(UnsupportedArchitectureError, match=r"'gpt2' is not supported.*gemma3, gemma3_text.*llama"):
        spec_for("gpt2")


def test_gemma3_multimodal_spec_reads_the_text_config_and_checkpoint_names(tmp_path):
    """The geometry comes from `text_config`; every key transformers writes for the model maps to a module name."""
    from safetensors import safe_open

    model = tiny("gemma3")
    spec, geo = geometry(model)
    assert spec.text_config_of(model.config) is model.config.text_config
    assert (geo.num_layers, geo.num_heads, geo.num_kv_heads, geo.head_dim, geo.intermediate_size) == (2, 4, 2, 16, 96)
    assert len(model.get_submodule(spec.layers_path)) == geo.num_layers
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        saved = list(f.keys())
    assert any(k.startswith("language_model.model.layers.") for k in saved)  # the pre-5.0 names
    assert {spec.module_key(k) for k in saved} == set(model.state_dict())


def test_lora_on_the_vision_tower_is_refused():
    from axolotl_atp.lora_targets import check_lora_targets, decoder_lora_regex

    config = tiny_config("gemma3", 64)
    spec = spec_for("gemma3")
    with pytest.raises(ValueError, match=r"lora_target_modules = \['q_proj', 'o_proj'\] puts LoRA on .*vision_tower"):
        check_lora_targets({"lora_target_modules": ["q_proj", "o_proj"]}, config, spec)
    with pytest.raises(ValueError, match=r"lora_target_linear = true .*Fix: set `lora_target_linear: false`"):
        check_lora_targets({"lora_target_linear": True}, config, spec)
    check_lora_targets({"lora_target_modules": GEMMA3_LORA_TARGETS}, config, spec)
    check_lora_targets({"lora_target_modules": decoder_lora_regex(spec)}, config, spec)  # the suggested fix
    check_lora_targets({"lora_target_modules": ["o_proj", "down_proj"]}, config, spec)  # not in SigLIP
    check_lora_targets({"lora_target_linear": True}, tiny_config("gemma3_text", 64), spec_for("gemma3_text"))


def lora_model(family: str, seed: int = 0):
    model = tiny(family, seed)
    targets = GEMMA3_LORA_TARGETS if family == "gemma3" else TARGETS  # not the vision tower
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    return peft_model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_gate_equivalence_lora_aware_masked_and_removed(family):
    """With hard masks and zeroed pruned LoRA slices: LoRA-aware == masked == physically removed."""
    peft_model = lora_model(family)
    spec, geo = geometry(peft_model.get_base_model())
    kept = random_kept(geo, seed=2, uniform=True)
    masks = Decision(kept=kept, geo=geo).masks()
    lasso = GroupLasso(peft_model, slice_refs(spec, geo), geo, spec.layers_path)
    assert lasso.pruned_norm(masks) > 0
    lasso.prox(masks, float("inf"))
    assert lasso.pruned_norm(masks) == 0.0
    ids = torch.randint(0, 64, (2, 12))
    masked = MaskedModel(peft_model, spec, geo)
    with torch.no_grad():
        masked.set_masks(masks, MaskMode.LORA_AWARE)
        lora_aware = peft_model(input_ids=ids).logits
        masked.set_masks(masks, MaskMode.FULL)
        full = peft_model(input_ids=ids).logits
        masked.set_masks(masks, MaskMode.OFF)
        unmasked = peft_model(input_ids=ids).logits
        masked.remove()
        merged = copy.deepcopy(peft_model).merge_and_unload()
        removed = physically_pruned(merged, kept, spec, geo)(input_ids=ids).logits
    tol = 1e-4
    assert (lora_aware - full).abs().max() < tol
    assert (full - removed).abs().max() < tol
    assert (unmasked - full).abs().max() > 1e-2  # the masks really change the function


def test_lora_aware_masks_base_not_lora():
    """Before the prox, LoRA-aware differs from full masking: the LoRA path of pruned groups still flows."""
    peft_model = lora_model("llama")
    spec, geo = geometry(peft_model.get_base_model())
    masks = Decision(kept=random_kept(geo, 3, uniform=False), geo=geo).masks()
    masked = MaskedModel(peft_model, spec, geo)
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        masked.set_masks(masks, MaskMode.LORA_AWARE)
        a = peft_model(input_ids=ids).logits
        masked.set_masks(masks, MaskMode.FULL)
        b = peft_model(input_ids=ids).logits
    assert (a - b).abs().max() > 1e-3


def test_prox_zeroes_pruned_and_keeps_kept_slices():
    peft_model = lora_model("llama")
    spec, geo = geometry(peft_model.get_base_model())
    masks = Decision(kept=random_kept(geo, 4, uniform=False), geo=geo).masks()
    lasso = GroupLasso(peft_model, slice_refs(spec, geo), geo, spec.layers_path)
    before = [sl.weight.detach().clone() for sl in lasso.slices]
    norms = [lasso.pruned_norm(masks)]
    for _ in range(200):
        lasso.prox(masks, 0.05)
        norms.append(lasso.pruned_norm(masks))
    assert norms[-1] == 0.0
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(norms))
    for sl, old in zip(lasso.slices, before, strict=True):
        kept = masks[sl.structure][sl.layer][sl.group_index] >= 0.5
        new = sl.weight.detach()
        if sl.dim == 0:
            assert torch.equal(new[kept], old[kept]) and (new[~kept] == 0).all()
        else:
            assert torch.equal(new[:, kept], old[:, kept]) and (new[:, ~kept] == 0).all()


@pytest.mark.parametrize("family", ["llama", "llama_mha"])
@pytest.mark.parametrize("layout", ["per_layer", "uniform"])
@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_freeze_meets_budget_within_granularity(family, layout, ratio):
    model = tiny(family, num_hidden_layers=3)
    spec, geo = geometry(model)
    counter = ParameterCounter(geo, slice_refs(spec, geo))
    g = torch.Generator().manual_seed(5)
    scores = {s: torch.randn(geo.num_layers, geo.num_groups(s), generator=g) for s in (HEADS, MLP)}
    accept = stock_config_accepts_heads(geo) if layout == "uniform" else None
    decision = freeze_decision(
        scores, geo, counter, ratio, layout, {HEADS: 1, MLP: 8}, {HEADS: 1, MLP: 8}, accept_heads=accept
    )
    counts = decision.counts()
    achieved = 1 - counter.remaining_from_kept(decision.kept) / counter.prunable_total
    layers = geo.num_layers if layout == "uniform" else 1
    step = min(counter.cost_per_group[HEADS], 8 * counter.cost_per_group[MLP]) * layers
    assert ratio - 1e-9 <= achieved <= ratio + step / counter.prunable_total + 1e-9
    assert all(c % 8 == 0 or c == geo.intermediate_size for c in counts[MLP])
    assert all(c >= 1 for c in counts[HEADS])
    if layout == "uniform":
        assert len(set(counts[HEADS])) == 1 and len(set(counts[MLP])) == 1
        assert geo.hidden_size % (counts[HEADS][0] * geo.group_size) == 0
    # Deterministic: the same scores give the same decision.
    again = freeze_decision(scores, geo, counter, ratio, layout, {HEADS: 1, MLP: 8}, {HEADS: 1, MLP: 8}, accept)
    assert again.kept == decision.kept
    # The lowest-scoring channels go first within a layer.
    layer0 = scores[MLP][0]
    dropped = sorted(set(range(geo.intermediate_size)) - set(decision.kept[MLP][0]))
    if dropped:
        assert layer0[dropped].max() <= layer0[decision.kept[MLP][0]].min()


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


def test_atp_state_write_error_names_the_file_and_fix(tmp_path, monkeypatch):
    """The full-disk path without a real small disk: an ENOSPC from the writer."""
    import errno

    from axolotl_atp.training import checkpoint_state as state_module

    def no_space(obj, path):
        open(path, "wb").close()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_module.torch, "save", no_space)
    with pytest.raises(state_module.ATPStateError, match=r"No space left on device.*The disk is full\. Fix"):
        state_module.save_state({"x": 1}, tmp_path / "checkpoint-1")
    assert list((tmp_path / "checkpoint-1").iterdir()) == []


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
