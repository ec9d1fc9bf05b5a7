"""The streaming export (`export/pruned.py`): refusals before anything is written, the per_layer
config and its remote code, and the tokenizer a per_layer export loads without remote code."""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from axolotl_atp.architectures import spec_for
from axolotl_atp.decision import Decision
from axolotl_atp.export import pruned
from axolotl_atp.export.sources import DEFAULT_MAX_SHARD_BYTES, BaseCheckpoint, CheckpointError, LoraAdapter
from axolotl_atp.groups import HEADS, MLP, ModelGeometry
from tests.kit import build_tiny_model


def adapter_with_replacement(folder: Path, key: str, shape: tuple[int, ...]) -> LoraAdapter:
    """A PEFT adapter folder holding one `modules_to_save` tensor, as PEFT saves it."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_alpha": 8, "r": 4}))
    module = key.removesuffix(".weight")
    tensors = {f"base_model.model.{module}.modules_to_save.default.weight": torch.full(shape, 0.5)}
    save_file(tensors, folder / "adapter_model.safetensors")
    return LoraAdapter(folder)


def full_decision(geo: ModelGeometry) -> Decision:
    kept = {s: [list(range(geo.num_groups(s)))] * geo.num_layers for s in (HEADS, MLP)}
    return Decision(kept=kept, geo=geo)


def export(model_dir: Path, adapter: LoraAdapter, out: Path):
    config = AutoConfig.from_pretrained(model_dir)
    spec = spec_for(config.model_type)
    geo = ModelGeometry.from_config(config, spec)
    out.mkdir()
    return pruned.write_pruned_weights(BaseCheckpoint(model_dir), adapter, out, spec, geo, full_decision(geo), None)


def test_modules_to_save_of_a_tied_lm_head_is_refused(tmp_path):
    """A tied model has no lm_head tensor: the trained replacement would be dropped silently."""
    model = build_tiny_model(tmp_path / "model", "llama_tied")
    vocab, hidden = load_file(model / "model.safetensors")["model.embed_tokens.weight"].shape
    adapter = adapter_with_replacement(tmp_path / "adapter", "lm_head.weight", (vocab, hidden))
    with pytest.raises(
        CheckpointError, match=r"replaces \['lm_head.weight'\].*Fix: train without `lora_modules_to_save`"
    ):
        export(model, adapter, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # refused before anything is written


def test_modules_to_save_of_an_untied_lm_head_is_merged(tmp_path):
    model = build_tiny_model(tmp_path / "model", "llama")
    shape = tuple(load_file(model / "model.safetensors")["lm_head.weight"].shape)
    adapter = adapter_with_replacement(tmp_path / "adapter", "lm_head.weight", shape)
    export(model, adapter, tmp_path / "out")
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["lm_head.weight"], torch.full(shape, 0.5))


def test_the_default_shard_is_small():
    """One output shard is held in memory before it is written."""
    assert DEFAULT_MAX_SHARD_BYTES <= 512 * 2**20


def test_a_changed_configuration_template_is_refused(tmp_path, monkeypatch):
    remote = tmp_path / "remote"
    shutil.copytree(pruned.REMOTE_DIR, remote)
    assert "BASE_MODEL_TYPE = 'qwen2'" in pruned.configuration_code("qwen2")
    text = (remote / "configuration_atp.py").read_text()
    (remote / "configuration_atp.py").write_text(text.replace(pruned.BASE_MODEL_TYPE_LINE, "BASE_MODEL_TYPE = 'llama'"))
    monkeypatch.setattr(pruned, "REMOTE_DIR", remote)
    with pytest.raises(RuntimeError, match=r"must hold the line `BASE_MODEL_TYPE = \"llama\"` exactly once"):
        pruned.configuration_code("qwen2")


def test_the_tokenizer_of_a_per_layer_export_loads_without_remote_code(tmp_path, monkeypatch):
    """transformers reads config.json (remote code) before the tokenizer; with trust_remote_code=False
    it must neither ask nor run the remote code, and the tokenizer is the base one."""
    from transformers import AutoTokenizer

    model = build_tiny_model(tmp_path / "model", "llama")
    config = AutoConfig.from_pretrained(model)
    spec = spec_for("llama")
    geo = ModelGeometry.from_config(config, spec)
    out = tmp_path / "export"
    out.mkdir()
    pruned.write_per_layer_config(config, full_decision(geo), geo, spec, out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(model / name, out / name)

    class Prompted(BaseException):  # not an Exception: transformers catches those around its prompt
        pass

    def no_prompt(*args, **kwargs):
        raise Prompted("transformers asked whether to run the export's remote code")

    monkeypatch.setattr(builtins, "input", no_prompt)
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    expected = AutoTokenizer.from_pretrained(model)
    text = "the patient was admitted with chest pain"
    assert tokenizer(text)["input_ids"] == expected(text)["input_ids"]
    assert json.loads((out / "config.json").read_text())["auto_map"]  # the model itself still needs remote code
