"""GPU checks (skipped without CUDA): bf16 QLoRA ATP training and merge through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.kit import base_config, run_cli, write_config

pytestmark = [pytest.mark.gpu, pytest.mark.e2e]


@pytest.mark.parametrize("layout", ["uniform", "per_layer"])
def test_bf16_qlora_train_and_merge_on_gpu(tmp_path, tiny_llama, tiny_data, layout):
    cfg = base_config(
        tiny_llama,
        tiny_data,
        tmp_path,
        adapter="qlora",
        load_in_4bit=True,
        bf16=True,
        gradient_checkpointing=True,
        gradient_accumulation_steps=2,
        optimizer="adamw_torch_fused",
        atp={"prune_ratio": 0.3, "control_steps": 3, "layout": layout},
    )
    path = write_config(tmp_path / "cfg.yml", cfg)
    result = run_cli(["axolotl", "train", str(path), "--launcher", "python"])
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert "base Linear class Linear4bit)" in log
    masks = json.loads((Path(cfg["output_dir"]) / "atp_masks.json").read_text())
    assert masks["params"]["achieved_prune_ratio"] >= 0.3 - 1e-9
    assert masks["group_lasso"]["mode"] == "off"  # the default: plain hard masks, the merge removes pruned slices
    merged = run_cli(["axolotl", "atp-merge", str(path)])
    assert merged.returncode == 0, (merged.stdout + merged.stderr)[-5000:]
    report = json.loads((Path(cfg["output_dir"]) / "atp-merged" / "atp_report.json").read_text())
    assert report["max_abs_logit_diff"] <= report["logit_tolerance"]
