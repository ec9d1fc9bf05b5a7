"""The real SmolLM2-135M (GQA: 9 query heads over 3 KV heads) with real PubMed abstracts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.common import logged_rows
from tests.kit import base_config, run_cli, write_config

pytestmark = [pytest.mark.real, pytest.mark.e2e]


def test_smollm2_pubmed_short_run_follows_the_budget_and_merges(tmp_path, smollm2, pubmed):
    cfg = base_config(
        smollm2,
        pubmed / "train.jsonl",
        tmp_path,
        sequence_len=128,
        micro_batch_size=2,
        max_steps=14,
        learning_rate=5e-4,
        lora_r=8,
        lora_alpha=16,
        atp={"prune_ratio": 0.4, "control_steps": 10, "generator_lr": 0.02, "calibration_size": 16, "mlp_round_to": 8},
    )
    # A slice of the corpus keeps tokenization short; the rows are real abstracts.
    subset = tmp_path / "pubmed-subset.jsonl"
    subset.write_text("".join((pubmed / "train.jsonl").read_text().splitlines(keepends=True)[:400]))
    cfg["datasets"] = [{"path": str(subset), "type": "completion"}]
    result = run_cli(["axolotl", "train", str(write_config(tmp_path / "cfg.yml", cfg)), "--launcher", "python"])
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    rows = [r for r in logged_rows(log) if "atp/budget_loss" in r]
    assert len(rows) >= 8
    # The budget schedule ramps the target from dense to 0.6 over the first half of the control phase, and the
    # generator's sampled remaining ratio follows it down (within 10 steps it lags; the freeze meets the budget).
    targets = [r["atp/target_remaining_ratio"] for r in rows]
    ratios = [r["atp/remaining_ratio"] for r in rows]
    print(
        "target / sampled remaining ratio per generator step:",
        [(round(t, 3), round(r, 3)) for t, r in zip(targets, ratios, strict=True)],
    )
    assert targets[0] > 0.9 and targets[-1] == pytest.approx(0.6)
    assert min(ratios[-3:]) < ratios[0] - 0.03, ratios
    masks = json.loads((Path(cfg["output_dir"]) / "atp_masks.json").read_text())
    assert len(masks["layers"]) == 30
    assert masks["geometry"]["num_heads"] == 9 and masks["geometry"]["num_kv_heads"] == 3
    assert 0.4 <= masks["params"]["achieved_prune_ratio"] < 0.41
    merged = run_cli(["axolotl", "atp-merge", str(tmp_path / "cfg.yml")])
    assert merged.returncode == 0, (merged.stdout + merged.stderr)[-5000:]
    report = json.loads((Path(cfg["output_dir"]) / "atp-merged" / "atp_report.json").read_text())
    assert report["max_abs_logit_diff"] <= report["logit_tolerance"]
    assert report["params_after"] < report["params_before"] == 134_515_008
