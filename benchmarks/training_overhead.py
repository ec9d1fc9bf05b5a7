"""Training overhead of ATP against plain LoRA and plain QLoRA on the same config (real SmolLM2-135M).

Per adapter, three runs of N optimizer steps, one after the other: plain; ATP with the generator training
for N-1 steps (control phase); ATP frozen after 1 step. Solving the two ATP runs for the per-step time of
each phase gives the control-phase and after-freeze step times, reported as ratios to the plain run.

    python benchmarks/training_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, assets, dump, pubmed_subset, record, smollm2_config, train

# Variants of the default ATP block (distillation from the base model, group_lasso prox), LoRA only.
LORA_MODES: dict[str, dict] = {
    "loss": {"group_lasso": "loss", "group_lasso_strength": 0.01},
    "nokd": {"kd_weight": 0.0},
    "interval2": {"generator_interval": 2},
}
MODE_LABELS = {
    "": "defaults",
    "loss": "group_lasso loss",
    "nokd": "no distillation",
    "interval2": "generator_interval 2",
}


def phase_times(total_control: float, total_frozen: float, steps: int) -> tuple[float, float]:
    """Per-step seconds (control, frozen) from T_c = (N-1)c + f and T_f = c + (N-1)f."""
    m = steps - 1
    det = m * m - 1
    return (m * total_control - total_frozen) / det, (m * total_frozen - total_control) / det


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="6 steps of 2x128 tokens instead of 12 of 2x256")
    parser.add_argument("--no-record", action="store_true", help="print only; do not write RESULTS.md")
    args = parser.parse_args()
    steps = 6 if args.quick else 12
    shape = {"micro_batch_size": 2, "sequence_len": 128 if args.quick else 256}
    model, pubmed = assets()
    work = ROOT / "benchmarks" / "work" / "overhead"
    data = pubmed_subset(pubmed, work / "data.jsonl", 1500)
    atp = {"prune_ratio": 0.4, "calibration_size": 32, "mlp_round_to": 8}
    runs = {}
    variants = [("lora", {}), ("qlora", {"adapter": "qlora", "load_in_4bit": True})]
    for adapter, extra in variants:
        plans = {
            "plain": None,
            "atp_control": {**atp, "control_steps": steps - 1},
            "atp_frozen": {**atp, "control_steps": 1},
        }
        if adapter == "lora":
            # The other group-lasso mode, no distillation (the frozen phase is then a plain LoRA step on hard
            # masks), and a generator step every second optimizer step.
            for mode, extra_atp in LORA_MODES.items():
                plans[f"atp_control_{mode}"] = {**atp, **extra_atp, "control_steps": steps - 1}
                plans[f"atp_frozen_{mode}"] = {**atp, **extra_atp, "control_steps": 1}
        for name, plan in plans.items():
            key = f"{adapter}_{name}"
            cfg = smollm2_config(model, data, work / key, atp=plan, max_steps=steps, **shape, **extra)
            _, metrics = train(cfg, key)
            runs[key] = {"train_runtime": metrics["train_runtime"], "peak_rss_mb": metrics["peak_rss_mb"]}
            print(key, runs[key], flush=True)

    lines = ["| run | per-step s | ratio to plain | peak RSS MB | RSS ratio |", "|---|---|---|---|---|"]
    summary = {}
    for adapter, _ in variants:
        plain = runs[f"{adapter}_plain"]
        base_step = plain["train_runtime"] / steps
        lines.append(f"| {adapter} plain | {base_step:.2f} | 1.00 | {plain['peak_rss_mb']:.0f} | 1.00 |")
        for mode in ("", *LORA_MODES):
            suffix = f"_{mode}" if mode else ""
            if f"{adapter}_atp_control{suffix}" not in runs:
                continue
            c_run, f_run = runs[f"{adapter}_atp_control{suffix}"], runs[f"{adapter}_atp_frozen{suffix}"]
            control, frozen = phase_times(c_run["train_runtime"], f_run["train_runtime"], steps)
            summary[f"{adapter}_{mode or 'defaults'}"] = {
                "control_ratio": control / base_step,
                "frozen_ratio": frozen / base_step,
            }
            for label, step_s, run in (("control phase", control, c_run), ("after freeze", frozen, f_run)):
                lines.append(
                    f"| {adapter} ATP ({MODE_LABELS[mode]}), {label} | {step_s:.2f} | {step_s / base_step:.2f} | "
                    f"{run['peak_rss_mb']:.0f} | {run['peak_rss_mb'] / plain['peak_rss_mb']:.2f} |"
                )
    table = "\n".join(lines)
    print(table)
    dump(work / "results.json", {"steps": steps, "runs": runs, "summary": summary})
    if not args.no_record:
        mode = "quick" if args.quick else "full"
        body = (
            f"{steps} optimizer steps per run (2x{shape['sequence_len']} tokens per step), LoRA r=16 on all "
            "seven projections, prune_ratio 0.4, CPU fp32. Peak RSS is the training process's resident memory "
            "(CPU runs have no GPU memory to report). The per-phase step times are solved from two runs (N-1 control steps + 1 frozen, and 1 + N-1), so differences of about 10% are within run-to-run noise on these shared machines. ATP runs with its defaults "
            "(distillation from the base model: one teacher forward per micro-batch; the importance prior; group_lasso "
            "prox) unless the row names a change. A control-phase step adds a generator step (a forward and backward "
            "pass over a calibration batch the size of a micro-batch, plus its teacher forward when `kd_calibration` "
            "is on); `generator_interval: 2` runs it every second step.\n\n" + table
        )
        record(
            f"Training overhead ({mode})",
            body,
            f"python benchmarks/training_overhead.py{' --quick' if args.quick else ''}",
        )


if __name__ == "__main__":
    main()
