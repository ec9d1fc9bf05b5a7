"""Training overhead of ATP against plain LoRA and plain QLoRA on the same config (real SmolLM2-135M).

Per adapter, three runs of N optimizer steps, one after the other: plain; ATP with the generator training
for N-1 steps (control phase); ATP frozen after 1 step. Per-step times come from the progress bar's elapsed
time in each run's log, over the steps of one phase only: the control run's steps 2..N-1, the frozen run's
steps 3..N, the plain run's steps 2..N. The first step of a run and the freeze step are left out, so the
one-off work at the start (the importance prior's calibration forwards, the teacher's set-up) and the freeze's
decision are not spread over the steps; the start's cost is reported on its own.

    python benchmarks/training_overhead.py [--quick] [--reuse] [--lora-defaults [--modes MODE ...]]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, assets, dump, pubmed_subset, record, smollm2_config, train

# Variants of the default ATP block (distillation from the base model, plain hard masks in the LoRA step), LoRA only.
LORA_MODES: dict[str, dict] = {
    "nokd": {"kd_weight": 0.0},
    "interval2": {"generator_interval": 2},
    "lean": {"generator_interval": 2, "calibration_batch_size": 1},
}
MODE_LABELS = {
    "": "defaults",
    "nokd": "no distillation",
    "interval2": "generator_interval 2",
    "lean": "generator_interval 2, calibration_batch_size 1",
}


def step_elapsed(log: str) -> dict[int, float]:
    """Seconds since the progress bar started at each finished step (`k/N [mm:ss<` or `[h:mm:ss<`)."""
    elapsed: dict[int, float] = {}
    for match in re.finditer(r"(\d+)/\d+ \[(?:(\d+):)?(\d+):(\d+)<", log):
        hours = int(match.group(2) or 0)
        elapsed[int(match.group(1))] = 3600 * hours + 60 * int(match.group(3)) + int(match.group(4))
    return elapsed


def mean_step(elapsed: dict[int, float], first: int, last: int) -> float:
    """Mean seconds of steps first+1..last (1-based step counts, as the progress bar shows them)."""
    return (elapsed[last] - elapsed[first]) / (last - first)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="6 steps of 2x128 tokens instead of 12 of 2x256")
    parser.add_argument("--no-record", action="store_true", help="print only; do not write RESULTS.md")
    parser.add_argument(
        "--reuse", action="store_true", help="keep the runs already measured (same code); train only the missing ones"
    )
    parser.add_argument(
        "--lora-defaults",
        action="store_true",
        help="only plain LoRA and LoRA ATP with its defaults (three runs), recorded in a section of its own",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=list(LORA_MODES),
        default=[],
        help="with --lora-defaults: also these LoRA variants of the ATP block (two runs each), side by side",
    )
    args = parser.parse_args()
    if args.modes and not args.lora_defaults:
        parser.error("--modes goes with --lora-defaults (without it every mode runs)")
    steps = 6 if args.quick else 12
    shape = {"micro_batch_size": 2, "sequence_len": 128 if args.quick else 256}
    model, pubmed = assets()
    work = ROOT / "benchmarks" / "work" / "overhead"
    data = pubmed_subset(pubmed, work / "data.jsonl", 1500)
    atp = {"prune_ratio": 0.4, "calibration_size": 32, "mlp_round_to": 8}
    runs = {}
    variants = [("lora", {}), ("qlora", {"adapter": "qlora", "load_in_4bit": True})]
    if args.lora_defaults:
        variants = variants[:1]
    for adapter, extra in variants:
        plans = {
            "plain": None,
            "atp_control": {**atp, "control_steps": steps - 1},
            "atp_frozen": {**atp, "control_steps": 1},
        }
        if adapter == "lora":
            modes = args.modes if args.lora_defaults else list(LORA_MODES)
            for mode in modes:
                extra_atp = LORA_MODES[mode]
                plans[f"atp_control_{mode}"] = {**atp, **extra_atp, "control_steps": steps - 1}
                plans[f"atp_frozen_{mode}"] = {**atp, **extra_atp, "control_steps": 1}
        for name, plan in plans.items():
            key = f"{adapter}_{name}"
            measured = work / "runs" / f"{key}.json"
            if args.reuse and measured.is_file():
                runs[key] = json.loads(measured.read_text())
                log = (work / key / f"{key}.log").read_text()
            else:
                cfg = smollm2_config(model, data, work / key, atp=plan, max_steps=steps, **shape, **extra)
                log, metrics = train(cfg, key)
                runs[key] = {"train_runtime": metrics["train_runtime"], "peak_rss_mb": metrics["peak_rss_mb"]}
                dump(measured, runs[key])
            elapsed = step_elapsed(log)
            runs[key]["first_step_s"] = elapsed[1]
            if plan is None:
                runs[key]["step_s"] = mean_step(elapsed, 1, steps)
            elif plan["control_steps"] > 1:
                runs[key]["step_s"] = mean_step(elapsed, 1, steps - 1)
            else:
                runs[key]["step_s"] = mean_step(elapsed, 2, steps)
            print(key, runs[key], flush=True)

    lines = [
        "| run | per-step s | ratio to plain | first step s | peak RSS MB | RSS ratio |",
        "|---|---|---|---|---|---|",
    ]
    summary = {}
    for adapter, _ in variants:
        plain = runs[f"{adapter}_plain"]
        base_step = plain["step_s"]
        lines.append(
            f"| {adapter} plain | {base_step:.2f} | 1.00 | {plain['first_step_s']:.0f} | {plain['peak_rss_mb']:.0f} "
            "| 1.00 |"
        )
        for mode in ("", *LORA_MODES):
            suffix = f"_{mode}" if mode else ""
            if f"{adapter}_atp_control{suffix}" not in runs:
                continue
            c_run, f_run = runs[f"{adapter}_atp_control{suffix}"], runs[f"{adapter}_atp_frozen{suffix}"]
            summary[f"{adapter}_{mode or 'defaults'}"] = {
                "control_ratio": c_run["step_s"] / base_step,
                "frozen_ratio": f_run["step_s"] / base_step,
            }
            for label, run in (("control phase", c_run), ("after freeze", f_run)):
                lines.append(
                    f"| {adapter} ATP ({MODE_LABELS[mode]}), {label} | {run['step_s']:.2f} | "
                    f"{run['step_s'] / base_step:.2f} | {run['first_step_s']:.0f} | {run['peak_rss_mb']:.0f} | "
                    f"{run['peak_rss_mb'] / plain['peak_rss_mb']:.2f} |"
                )
    table = "\n".join(lines)
    print(table)
    dump(work / "results.json", {"steps": steps, "runs": runs, "summary": summary})
    if not args.no_record:
        resolution_base = min(runs[f"{adapter}_plain"]["step_s"] for adapter, _ in variants)
        mode = ("quick" if args.quick else "full") + (", LoRA defaults" if args.lora_defaults else "")
        body = (
            f"{steps} optimizer steps per run (2x{shape['sequence_len']} tokens per step), LoRA r=16 on all "
            "seven projections, prune_ratio 0.4, CPU fp32. Peak RSS is the training process's resident memory "
            "(CPU runs have no GPU memory to report). Per-step times are means over one phase's steps, from the progress "
            f"bar (1 s resolution: over a phase's {steps - 2}-{steps - 1} steps about +-{1 / (steps - 2):.2f} s a "
            f"step, {100 / (steps - 2) / resolution_base:.0f}% of the plain step here); the first step, with the "
            "run's one-off start (for ATP: the "
            "importance prior's calibration forwards and the teacher's set-up), is its own column. ATP runs with its defaults "
            "(distillation from the base model: one teacher forward per micro-batch; the importance prior; the LoRA step "
            "through plain hard masks, no group lasso) unless the row names a change. A control-phase step adds a generator step (a forward and backward "
            "pass over a calibration batch the size of a micro-batch, plus its teacher forward when `kd_calibration` "
            "is on); `generator_interval: 2` runs it every second step.\n\n" + table
        )
        record(
            f"Training overhead ({mode})",
            body,
            f"python benchmarks/training_overhead.py{' --quick' if args.quick else ''}"
            f"{' --lora-defaults' if args.lora_defaults else ''}"
            f"{' --modes ' + ' '.join(args.modes) if args.modes else ''}",
        )


if __name__ == "__main__":
    main()
