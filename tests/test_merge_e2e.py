"""`axolotl atp-merge` after a real `axolotl train`: the export loads in a fresh process and computes
what an independently built reference computes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.kit import (
    GEMMA3_LORA_TARGETS,
    OFFLINE_ENV,
    base_config,
    base_family,
    build_tiny_model,
    corpus,
    run_cli,
    write_config,
    write_jsonl,
)

pytestmark = pytest.mark.e2e

LOAD_SCRIPT = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, remote, out = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=remote).eval()
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
ids = torch.tensor(json.load(open(out + ".ids.json")))
with torch.no_grad():
    logits = model(input_ids=ids).logits
    generated = model.generate(input_ids=ids[:1, :5], max_new_tokens=6, do_sample=False)
    image = torch.load(out + ".image.pt") if len(sys.argv) > 4 else None
    image_logits = model(**image).logits if image else None
tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
torch.save({"logits": logits, "num_parameters": model.num_parameters(), "generated": generated,
            "class": type(model).__name__, "image_logits": image_logits, "tied": tied}, out)
"""


def make_run(root: Path, family: str, adapter: str, layout: str, ratio: float = 0.35) -> tuple[Path, Path, dict]:
    model = build_tiny_model(root / "model", family)
    data = write_jsonl(root / "data.jsonl", corpus(80, seed=3))
    extra = {"adapter": adapter, "load_in_4bit": adapter == "qlora"}
    if family == "phi3":  # fused projections
        extra["lora_target_modules"] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    if base_family(family) == "gemma3":  # multimodal: LoRA on the language model only
        extra["lora_target_modules"] = GEMMA3_LORA_TARGETS
    cfg = base_config(model, data, root, atp={"prune_ratio": ratio, "control_steps": 3, "layout": layout}, **extra)
    path = write_config(root / "cfg.yml", cfg)
    result = run_cli(["axolotl", "train", str(path), "--launcher", "python"])
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return path, model, cfg


def merge(cfg_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli(["axolotl", "atp-merge", str(cfg_path), *args])


def nf4(weight: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight.float(), blocksize=64, compress_statistics=True, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state).float()


def decoder_layers(model):
    """The decoder layers of a causal LM, or of the language model inside a multimodal one."""
    return getattr(model.model, "language_model", model.model).layers


def reference_logits(
    model_dir: Path, adapter_dir: Path, masks: dict, ids: torch.Tensor, nf4_base: bool, image: dict | None = None
):
    """Base + merged LoRA with pruned heads' o_proj input columns and pruned channels' down_proj input
    columns zeroed: built from the masks file alone, without the plugin's code."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if nf4_base:
        with torch.no_grad():
            for module in decoder_layers(model).modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(nf4(module.weight))
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().eval()
    head_dim = masks["geometry"]["head_dim"]
    with torch.no_grad():
        for layer, kept in zip(decoder_layers(model), masks["layers"], strict=True):
            o = layer.self_attn.o_proj.weight
            cols = torch.ones(o.shape[1], dtype=torch.bool)
            for head in range(masks["geometry"]["num_heads"]):
                cols[head * head_dim : (head + 1) * head_dim] = head in kept["heads"]
            o[:, ~cols] = 0.0
            down = layer.mlp.down_proj.weight
            keep = torch.zeros(down.shape[1], dtype=torch.bool)
            keep[kept["mlp"]] = True
            down[:, ~keep] = 0.0
        return model(input_ids=ids).logits, (model(**image).logits if image else None)


def load_fresh(export: Path, remote: bool, ids: torch.Tensor, tmp: Path, image: dict | None = None) -> dict:
    out = tmp / "loaded.pt"
    (tmp / "loaded.pt.ids.json").write_text(json.dumps(ids.tolist()))
    if image:
        torch.save(image, tmp / "loaded.pt.image.pt")
    env_prefix = {**OFFLINE_ENV}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_SCRIPT,
            str(export),
            "1" if remote else "0",
            str(out),
            *(["image"] if image else []),
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, **env_prefix},
        cwd=tmp,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out)


CASES = [  # every family: LoRA and QLoRA, both layouts across families, two ratios
    ("llama", "lora", "per_layer", 0.35),
    ("llama", "qlora", "uniform", 0.2),
    ("llama_mha", "lora", "uniform", 0.35),
    ("llama_mha", "qlora", "per_layer", 0.2),
    ("mistral", "lora", "uniform", 0.35),
    ("mistral", "qlora", "per_layer", 0.2),
    ("qwen2", "lora", "per_layer", 0.35),
    ("qwen2", "qlora", "uniform", 0.2),
    ("qwen3", "qlora", "uniform", 0.35),
    ("qwen3", "lora", "per_layer", 0.2),
    ("phi3", "lora", "per_layer", 0.35),
    ("phi3", "qlora", "uniform", 0.2),
    ("gemma2", "qlora", "uniform", 0.35),
    ("gemma2", "lora", "per_layer", 0.2),
    ("gemma3_text", "lora", "per_layer", 0.35),
    ("gemma3_text", "qlora", "uniform", 0.2),
    # Multimodal Gemma 3 with lm_head tied to the input embeddings, as the real checkpoints (no lm_head
    # tensor in the checkpoint); the untied text-only cases above cover the other side.
    ("gemma3_tied", "lora", "per_layer", 0.35),
    ("gemma3_tied", "qlora", "uniform", 0.2),
]


@pytest.mark.parametrize(("family", "adapter", "layout", "ratio"), CASES)
def test_merge_export_matches_independent_reference(tmp_path, family, adapter, layout, ratio):
    cfg_path, model_dir, cfg = make_run(tmp_path, family, adapter, layout, ratio)
    result = merge(cfg_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    export = Path(cfg["output_dir"]) / "atp-merged"
    report = json.loads((export / "atp_report.json").read_text())
    masks = json.loads((export / "atp_masks.json").read_text())
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "atp_widths.png"):
        assert (export / name).is_file(), name
    assert report["max_abs_logit_diff"] is not None and report["max_abs_logit_diff"] <= report["logit_tolerance"]
    assert report["base_weights"] == ("nf4" if adapter == "qlora" else "original")

    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    multimodal = base_family(family) == "gemma3"
    image = image_input(model_dir) if multimodal else None
    loaded = load_fresh(export, layout == "per_layer", ids, tmp_path, image)
    expected, expected_image = reference_logits(
        model_dir, Path(cfg["output_dir"]), masks, ids, nf4_base=adapter == "qlora", image=image
    )
    if image:  # the vision tower and projector feed the pruned language model as before
        assert (loaded["image_logits"] - expected_image).abs().max() < 1e-4
    assert (loaded["logits"] - expected).abs().max() < 1e-4
    assert loaded["num_parameters"] == report["params_after"] < report["params_before"]
    assert loaded["generated"].shape == (1, 11)
    assert loaded["tied"] == family.endswith("_tied")
    if loaded["tied"]:  # no lm_head tensor in the base, none written
        assert not any("lm_head" in key for key in exported_keys(export))
    if layout == "uniform":
        config = json.loads((export / "config.json").read_text())
        base = json.loads((model_dir / "config.json").read_text())
        assert config["model_type"] == base["model_type"] and "auto_map" not in config
        assert loaded["class"] == base["architectures"][0]
        text = config.get("text_config", config)
        assert text["intermediate_size"] == len(masks["layers"][0]["mlp"])
        assert text["num_attention_heads"] == len(masks["layers"][0]["heads"])
    else:
        assert loaded["class"] == "ATPPrunedForCausalLM"
    if multimodal:
        assert_vision_tower_copied(model_dir, export)
    achieved = report["achieved_prune_ratio"]
    assert ratio - 1e-9 <= achieved <= ratio + 0.02, achieved
    assert report["prunable_params_before"] - report["prunable_params_after"] == (
        report["params_before"] - report["params_after"]
    )


def exported_keys(export: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(export / "model.safetensors", "pt") as f:
        return list(f.keys())


def image_input(model_dir: Path) -> dict:
    """Text around one image (Gemma 3's image tokens), and random pixels."""
    config = json.loads((model_dir / "config.json").read_text())
    image_tokens = [config["boi_token_index"], *[config["image_token_index"]] * config["mm_tokens_per_image"]]
    ids = torch.tensor([[5, 17, 40, *image_tokens, config["eoi_token_index"], 60, 61, 62]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "pixel_values": pixels}


def assert_vision_tower_copied(model_dir: Path, export: Path) -> None:
    """Every base tensor outside the decoder layers and lm_head (vision tower, projector, embeddings,
    norms) is in the export unchanged, whether under the base's key names or under module names."""
    from safetensors.torch import load_file

    from axolotl_atp.architectures import spec_for

    spec = spec_for("gemma3")
    base = {spec.module_key(k): v for k, v in load_file(model_dir / "model.safetensors").items()}
    exported = {spec.module_key(k): v for k, v in load_file(export / "model.safetensors").items()}
    assert set(base) == set(exported)
    whole = [k for k in base if k.startswith(spec.keep_whole)]
    assert len(whole) > 10 and any(".encoder.layers.0.self_attn.q_proj." in k for k in whole)
    for key in whole:
        assert torch.equal(base[key], exported[key]), key


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-errors")
    cfg_path, _, cfg = make_run(root, "llama", "lora", "per_layer")
    return root, cfg_path, cfg


def test_merge_refusals(trained_run, tmp_path):
    _, cfg_path, cfg = trained_run
    run_dir = Path(cfg["output_dir"])

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user file")
    result = merge(cfg_path, "--output-dir", str(busy))
    assert result.returncode != 0 and "exists and is not empty" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    assert (busy / "keep.txt").read_text() == "user file"

    result = merge(cfg_path, "--output-dir", str(run_dir), "--overwrite")
    assert result.returncode != 0 and "holds the run's adapter or checkpoints" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    assert (run_dir / "adapter_model.safetensors").is_file()

    no_plugin = dict(cfg)
    no_plugin.pop("plugins")
    no_plugin.pop("atp")
    result = merge(write_config(tmp_path / "plain.yml", no_plugin))
    assert result.returncode != 0 and "does not list the ATP plugin" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_prints_bad_inputs_as_one_message(trained_run, tmp_path):
    """As a new user meets them: a masks file with an out-of-range index, a run without its adapter."""
    _, _, cfg = trained_run
    run = tmp_path / "run"
    shutil.copytree(cfg["output_dir"], run, ignore=shutil.ignore_patterns("atp-merged"))
    masks = json.loads((run / "atp_masks.json").read_text())
    masks["layers"][0]["mlp"] = [999]
    (run / "atp_masks.json").write_text(json.dumps(masks))
    result = merge(write_config(tmp_path / "bad-masks.yml", {**cfg, "output_dir": str(run)}))
    output = result.stderr + result.stdout
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output
    assert f"Error: {run / 'atp_masks.json'}: layers[0].mlp has an index outside 0..95. Fix:" in output
    (run / "adapter_model.safetensors").unlink()
    result = merge(write_config(tmp_path / "no-adapter.yml", {**cfg, "output_dir": str(run)}))
    output = result.stderr + result.stdout
    assert result.returncode == 1 and "Traceback" not in output
    assert f"Error: {run} has no LoRA adapter" in output


def run_merge_in_process(cfg: dict, tmp_path: Path, name: str, **kwargs):
    from axolotl_atp.export.merge import run_merge

    return run_merge(str(write_config(tmp_path / f"{name}.yml", cfg)), **kwargs)


def test_missing_adapter_and_masks_are_refused(trained_run, tmp_path):
    from axolotl_atp.export.sources import CheckpointError
    from axolotl_atp.masks_file import MasksFileError

    _, _, cfg = trained_run
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="has no LoRA adapter"):
        run_merge_in_process({**cfg, "output_dir": str(empty)}, tmp_path, "a")
    partial = tmp_path / "no-masks"
    shutil.copytree(cfg["output_dir"], partial)
    (partial / "atp_masks.json").unlink()
    shutil.rmtree(partial / "atp-merged", ignore_errors=True)
    with pytest.raises(MasksFileError, match=r"atp_masks\.json not found"):
        run_merge_in_process({**cfg, "output_dir": str(partial)}, tmp_path, "b")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["layers"].pop(), "has 1 layers but the model has 2"),
        (lambda m: m.__setitem__("model_type", "qwen2"), "made for model_type 'qwen2'"),
        (lambda m: m["layers"][0].__setitem__("mlp", [0, 0, 1]), "duplicate indices"),
        (lambda m: m["layers"][0].__setitem__("mlp", [999]), "outside 0..95"),
        (lambda m: m["layers"][1].__setitem__("mlp", []), "is empty"),
        (lambda m: m["layers"][0].__setitem__("heads", [0]), "are not the query heads"),
        (lambda m: m["geometry"].__setitem__("intermediate_size", 128), "intermediate_size = 128"),
    ],
)
def test_bad_masks_file_is_refused(trained_run, tmp_path, edit, message):
    from axolotl_atp.masks_file import MasksFileError

    _, _, cfg = trained_run
    run = tmp_path / "run"
    shutil.copytree(cfg["output_dir"], run, ignore=shutil.ignore_patterns("atp-merged"))
    masks = json.loads((run / "atp_masks.json").read_text())
    edit(masks)
    (run / "atp_masks.json").write_text(json.dumps(masks))
    with pytest.raises(MasksFileError, match=message):
        run_merge_in_process({**cfg, "output_dir": str(run)}, tmp_path, "c")


def test_truncated_masks_file_is_refused(trained_run, tmp_path):
    from axolotl_atp.masks_file import MasksFileError

    _, _, cfg = trained_run
    run = tmp_path / "run"
    shutil.copytree(cfg["output_dir"], run, ignore=shutil.ignore_patterns("atp-merged"))
    text = (run / "atp_masks.json").read_text()
    (run / "atp_masks.json").write_text(text[: len(text) // 2])
    with pytest.raises(MasksFileError, match="is not valid JSON"):
        run_merge_in_process({**cfg, "output_dir": str(run)}, tmp_path, "d")


def test_interrupted_merge_leaves_no_output(trained_run, tmp_path, monkeypatch):
    from axolotl_atp.export import sources as checkpoint

    _, _, cfg = trained_run
    out = tmp_path / "export"
    calls = {"n": 0}
    original = checkpoint.ShardWriter.add

    def add_then_die(self, tensors):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, tensors)

    monkeypatch.setattr(checkpoint.ShardWriter, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_merge_in_process(cfg, tmp_path, "e", output_dir=str(out))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]


def test_merge_refuses_an_output_disk_without_room(trained_run, tmp_path, monkeypatch):
    import shutil as shutil_module

    from axolotl_atp.export import merge as merge_module

    _, _, cfg = trained_run
    real = shutil_module.disk_usage
    monkeypatch.setattr(merge_module.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = tmp_path / "export"
    with pytest.raises(merge_module.MergeError, match=r"GiB free but the export needs about .* Nothing was written"):
        run_merge_in_process(cfg, tmp_path, "f", output_dir=str(out))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]


def test_merge_on_a_disk_that_fills_up(trained_run, tmp_path, small_disk, monkeypatch):
    """The disk fills after the free-space check (another process writing): a clear error, nothing left."""
    from axolotl_atp.export import merge as merge_module

    _, _, cfg = trained_run
    monkeypatch.setattr(merge_module, "check_free_space", lambda folder, needed: None)
    filler = small_disk / "other-process.bin"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 8192))  # 8 KiB left
    out = small_disk / "export"
    with pytest.raises(merge_module.MergeError, match=r"filled up while writing the export .*No space left"):
        run_merge_in_process(cfg, tmp_path, "g", output_dir=str(out))
    assert list(small_disk.iterdir()) == [filler]


def test_atp_state_on_a_full_disk(small_disk):
    from axolotl_atp.training.checkpoint_state import ATPStateError, save_state

    state = {"generator": torch.zeros(1_000_000)}  # 4 MB on a 1 MiB disk
    with pytest.raises(ATPStateError, match=r"could not write .*atp_state.pt .*The disk is full\. Fix: free space"):
        save_state(state, small_disk / "checkpoint-3")
    assert [p.name for p in (small_disk / "checkpoint-3").iterdir()] == []
