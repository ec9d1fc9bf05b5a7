"""The `atp:` block through axolotl's real config loading, and every validation error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.kit import base_config, run_cli, write_config


def load(tmp_path: Path, model: Path, data: Path, **overrides: Any):
    from axolotl.cli.config import load_cfg

    path = write_config(tmp_path / "cfg.yml", base_config(model, data, tmp_path, **overrides))
    return load_cfg(str(path))


def test_plugin_registers_and_keys_survive_validation(tmp_path, tiny_llama, tiny_data):
    from axolotl.integrations.base import PluginManager

    cfg = load(
        tmp_path,
        tiny_llama,
        tiny_data,
        atp={"prune_ratio": 0.42, "layout": "uniform", "structures": ["mlp_channels"], "control_steps": 3},
        lora_mlp_kernel=True,
    )
    plugins = PluginManager.get_instance().plugins
    assert "axolotl_atp.ATPPlugin" in plugins, "the plugin failed to import and axolotl went on without it"
    assert type(plugins["axolotl_atp.ATPPlugin"]).__name__ == "ATPPlugin"
    assert cfg.atp.prune_ratio == 0.42
    assert cfg.atp.layout == "uniform"
    assert cfg.atp.structures == ["mlp_channels"]
    assert cfg.atp.control_steps == 3
    assert cfg.atp.temperature == 0.4  # defaults are filled in
    for key in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel"):
        assert cfg[key] is False, key


BAD_INPUTS = [
    ({"adapter": None}, r"adapter = None.*Fix: set `adapter: lora`"),
    ({"adapter": "llama-adapter"}, r"adapter = 'llama-adapter'"),
    ({"adapter": "qlora", "load_in_4bit": False}, r"needs load_in_4bit = true"),
    ({"load_in_8bit": True}, r"load_in_8bit = true is not supported"),
    ({"rl": "dpo"}, r"rl = 'dpo'.*supervised fine-tuning only"),
    ({"sample_packing": True}, r"sample_packing = True is not supported.*sample_packing: false"),
    ({"deepspeed": "zero2.json"}, r"deepspeed = 'zero2.json' is not supported"),
    ({"deepspeed": "zero2.json"}, r"Fix: remove `deepspeed`.*use one GPU or plain DDP"),
    ({"fsdp": ["full_shard"]}, r"fsdp = \['full_shard'\] is not supported.*Fix: remove `fsdp`"),
    (
        {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}},
        r"fsdp_config = \{.*\} is not supported with ATP. Fix: remove `fsdp_config`",
    ),
    ({"relora": True}, r"relora = True is not supported"),
    ({"peft_use_dora": True}, r"peft_use_dora = True is not supported"),
    ({"atp": None}, r"has no `atp:` block"),
    ({"atp": {"prune_ratoi": 0.3}}, r"prune_ratoi"),
    ({"atp": {"prune_ratio": 0.0}}, r"prune_ratio"),
    ({"atp": {"prune_ratio": 1.0}}, r"prune_ratio"),
    ({"atp": {"prune_ratio": -0.2}}, r"prune_ratio"),
    ({"atp": {"prune_ratio": "lots"}}, r"prune_ratio"),
    ({"atp": {"structures": []}}, r"atp.structures is empty"),
    ({"atp": {"structures": ["mlp_channels", "mlp_channels"]}}, r"lists a structure twice"),
    ({"atp": {"structures": ["layers"]}}, r"structures"),
    (
        {"atp": {"structures": ["attention_heads"], "importance_structures": ["mlp_channels"]}},
        r"atp.importance_structures lists \['mlp_channels'\], which atp.structures \(\['attention_heads'\]\) does not",
    ),
    ({"atp": {"layout": "ragged"}}, r"layout"),
    ({"atp": {"control_steps": 6}}, r"atp.control_steps = 6 is not below max_steps = 6"),
    ({"atp": {"control_steps": 0}}, r"control_steps"),
    ({"atp": {"temperature": 0}}, r"temperature"),
    ({"atp": {"group_lasso": "l1"}}, r"group_lasso"),
    ({"atp": {"calibration_size": 2.5}}, r"calibration_size = 2.5.*whole number"),
    ({"atp": {"generator_hidden_size": 30, "generator_num_heads": 4}}, r"multiple of atp.generator_num_heads"),
    ({"atp": {"mlp_round_to": 0}}, r"mlp_round_to"),
    ({"atp": {"min_heads_per_layer": 0}}, r"min_heads_per_layer"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_config_is_refused_with_a_message(tmp_path, tiny_llama, tiny_data, overrides, message):
    with pytest.raises(ValueError, match=message):
        load(tmp_path, tiny_llama, tiny_data, **overrides)


@pytest.mark.parametrize(("var", "what"), [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_fsdp_or_deepspeed_from_the_accelerate_config_is_refused(
    tmp_path, tiny_llama, tiny_data, monkeypatch, var, what
):
    """`accelerate launch` with an FSDP/DeepSpeed accelerate config sets these, whatever the axolotl config says."""
    monkeypatch.setenv(var, "true")
    with pytest.raises(
        ValueError,
        match=rf"{var}=true .*{what}.*Fix: launch with an accelerate config of `distributed_type: MULTI_GPU`",
    ):
        load(tmp_path, tiny_llama, tiny_data)


def test_cli_entry_points_show_help():
    merge = run_cli(["axolotl", "atp-merge", "--help"])
    assert merge.returncode == 0, merge.stderr
    assert "Merge the LoRA adapter of an ATP run" in merge.stdout and "--output-dir" in merge.stdout
    own = run_cli(["axolotl-atp", "--help"])
    assert own.returncode == 0, own.stderr
    assert "merge" in own.stdout
    sub = run_cli(["axolotl-atp", "merge", "--help"])
    assert sub.returncode == 0 and "--overwrite" in sub.stdout


def test_example_configs_validate(tmp_path, tiny_llama):
    """Every example in example_ymls/ passes the schema (model and data swapped for local ones)."""
    import yaml
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    from axolotl_atp.args import ATPConfig

    examples = sorted((Path(__file__).parents[1] / "example_ymls").glob("*.yml"))
    assert len(examples) >= 4
    for example in examples:
        raw = yaml.safe_load(example.read_text())
        assert raw["plugins"] == ["axolotl_atp.ATPPlugin"], example
        ATPConfig(**raw["atp"])  # the atp block alone, strictly
        raw["base_model"] = str(tiny_llama)
        raw.pop("base_model_config", None)
        from axolotl.utils.config import prepare_plugins

        cfg = DictDefault(raw)
        prepare_plugins(cfg)
        validated = validate_config(cfg)
        assert validated.atp.prune_ratio == raw["atp"]["prune_ratio"], example
