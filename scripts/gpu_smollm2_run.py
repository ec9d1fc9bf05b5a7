"""A short bf16 QLoRA + ATP run and merge of the real SmolLM2-135M on a GPU; prints step time and peak memory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, assets, logged_rows, pubmed_subset, run_cli, smollm2_config, train


def main() -> None:
    model, pubmed = assets()
    work = ROOT / "benchmarks" / "work" / "gpu-check"
    data = pubmed_subset(pubmed, work / "data.jsonl", 1000)
    results = {}
    for name, atp in (("plain", None), ("atp", {"prune_ratio": 0.4, "control_steps": 20, "calibration_size": 32})):
        cfg = smollm2_config(
            model,
            data,
            work / name,
            atp=atp,
            adapter="qlora",
            load_in_4bit=True,
            bf16=True,
            gradient_checkpointing=True,
            optimizer="adamw_torch_fused",
            max_steps=40,
            micro_batch_size=8,
            sequence_len=512,
        )
        log, metrics = train(cfg, name)
        rows = logged_rows(log)
        peak = max((r.get("memory/max_allocated (GiB)", 0.0) for r in rows), default=0.0)
        results[name] = {"seconds_per_step": metrics["train_runtime"] / 40, "peak_gpu_gib": peak}
        print(name, results[name], flush=True)
    cfg_path = work / "atp" / "atp.yml"
    _, seconds, rss = run_cli(["axolotl", "atp-merge", str(cfg_path)], work / "merge.log")
    report = json.loads((work / "atp" / "run" / "atp-merged" / "atp_report.json").read_text())
    print(
        json.dumps(
            {
                **results,
                "step_time_ratio_atp_to_plain": results["atp"]["seconds_per_step"]
                / results["plain"]["seconds_per_step"],
                "merge_seconds": seconds,
                "merge_peak_rss_mb": rss,
                "max_abs_logit_diff": report["max_abs_logit_diff"],
                "params_after": report["params_after"],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
