"""Forward speed and memory of exported models against the dense model, and the FLOP bound.

Exports of the real SmolLM2-135M at each prune ratio and both layouts are written by the real
`axolotl atp-merge`, from synthetic runs (benchmarks/synthetic.py: speed depends on shapes only).
Each model is then measured in a fresh process, one after the other (dense first and last, to show
drift): forward tokens/s at batch 1 and batch 8 of 256 tokens (fp32, CPU, no grad), peak resident
memory above the process's baseline, and forward FLOPs per token from the loaded modules.

    python benchmarks/export_speed.py [--quick] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import OFFLINE, ROOT, assets, dump, pubmed_subset, record, run_cli

SEQ = 256


def forward_flops_per_token(model, seq: int) -> float:
    """2 x (decoder Linear weights + lm_head) + causal attention (QK^T and AV) per token."""
    from torch import nn

    flops = 0.0
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    for layer in model.model.layers:
        flops += 2 * sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
        q_width = layer.self_attn.o_proj.in_features  # kept query heads x head_dim
        flops += 2 * 2 * q_width * (seq + 1) / 2
        assert q_width % head_dim == 0
    flops += 2 * model.lm_head.weight.numel()
    return flops


def measure(model_dir: Path, repeats: int) -> dict:
    """Runs in its own process: load, warm up, time forward passes; report speed and memory."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=True).eval()
    out = {"params": model.num_parameters(), "flops_per_token": forward_flops_per_token(model, SEQ)}
    vocab = model.config.vocab_size
    with torch.no_grad():
        for batch in (1, 8):
            ids = torch.randint(0, vocab, (batch, SEQ))
            model(input_ids=ids)  # warm-up
            times = []
            for _ in range(repeats if batch == 8 else 2 * repeats):
                started = time.perf_counter()
                model(input_ids=ids)
                times.append(time.perf_counter() - started)
            out[f"tokens_per_s_b{batch}"] = batch * SEQ / statistics.median(times)
    out["peak_rss_above_baseline_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb) / 1024
    return out


def measure_in_subprocess(model_dir: Path, repeats: int) -> dict:
    import os

    env = {**os.environ, **OFFLINE}
    proc = subprocess.run(
        [sys.executable, __file__, "--measure", str(model_dir), "--repeats", str(repeats)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {model_dir} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="ratio 0.4 only, fewer repeats (minutes)")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "export-speed")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.repeats)))
        return
    ratios, repeats = ([0.4], 2) if args.quick else ([0.2, 0.3, 0.4, 0.5], 5)

    from benchmarks.synthetic import synthetic_run

    model_dir, pubmed = assets()
    data = pubmed_subset(pubmed, args.work / "data.jsonl", 20)
    models: list[tuple[str, float, Path]] = [("dense", 0.0, model_dir)]
    for layout in ("per_layer", "uniform"):
        for ratio in ratios:
            work = args.work / f"{layout}-{ratio}"
            cfg = synthetic_run(model_dir, work, data, ratio, layout)
            export = work / "export"
            # No logit check: it is the merge tests' job, and speed depends on the exported shapes only.
            run_cli(
                ["axolotl", "atp-merge", str(cfg), "--output-dir", str(export), "--overwrite", "--no-verify"],
                work / "merge.log",
            )
            models.append((layout, ratio, export))
    models.append(("dense (again)", 0.0, model_dir))

    rows = []
    for layout, ratio, path in models:
        row = {"layout": layout, "ratio": ratio, **measure_in_subprocess(path, repeats)}
        print(row, flush=True)
        rows.append(row)
    dense = [r for r in rows if r["layout"].startswith("dense")]
    ref = {
        k: statistics.mean(r[k] for r in dense)
        for k in ("tokens_per_s_b1", "tokens_per_s_b8", "peak_rss_above_baseline_mb", "flops_per_token")
    }
    lines = [
        "| model | prune ratio | parameters | tokens/s b1 | speed-up b1 | tokens/s b8 | speed-up b8 | "
        "FLOP ratio (dense/export) | peak RSS above baseline MB | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {r['ratio']} | {r['params']:,} | {r['tokens_per_s_b1']:.0f} | "
            f"{r['tokens_per_s_b1'] / ref['tokens_per_s_b1']:.2f} | {r['tokens_per_s_b8']:.0f} | "
            f"{r['tokens_per_s_b8'] / ref['tokens_per_s_b8']:.2f} | {ref['flops_per_token'] / r['flops_per_token']:.2f} | "
            f"{r['peak_rss_above_baseline_mb']:.0f} | {r['peak_rss_above_baseline_mb'] / ref['peak_rss_above_baseline_mb']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    dump(args.work / "results.json", rows)
    if not args.no_record:
        mode = "quick" if args.quick else "full"
        body = (
            f"Forward passes of {SEQ} tokens, fp32 on the CPU, no grad; median of {repeats} (batch 8) or "
            f"{2 * repeats} (batch 1) timed passes after a warm-up, each model in a fresh process, one after the "
            "other. Speed-ups and ratios are against the mean of the two dense measurements (first and last "
            "row). The FLOP ratio is the physical bound: decoder Linear weights, causal attention and the "
            "unpruned lm_head (28M of SmolLM2's 135M parameters are the tied embedding). Exports made by "
            "`atp-merge` from synthetic runs (random decision and adapter; speed depends on shapes only)."
            f"\n\n{table}"
        )
        record(f"Export speed ({mode})", body, f"python benchmarks/export_speed.py{' --quick' if args.quick else ''}")


if __name__ == "__main__":
    main()
