"""Time and peak memory of `axolotl atp-merge` against the size of the model.

Two models: the real SmolLM2-135M, and a random-weight Llama of about 1.1B parameters written by the
benchmark in several bf16 shards. Each gets a synthetic run (benchmarks/synthetic.py: a LoRA adapter
on all seven projections and a per_layer decision at 0.4), merged with and without the verification
pass. Peak memory is the merge process tree's resident memory, sampled every 0.1 s; the process's
own floor (the same command on a tiny random model of a few MB: Python, torch, axolotl and the config
loaded) is measured the same way and subtracted.

    python benchmarks/merge_cost.py [--quick] [--no-record]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, assets, dump, pubmed_subset, record, run_cli

# About 1.1B parameters (TinyLlama-like widths), SmolLM2's vocabulary so its tokenizer fits.
LARGE = {"hidden": 2048, "layers": 22, "intermediate": 5632, "heads": 32, "kv_heads": 4}
TINY = {"hidden": 64, "layers": 2, "intermediate": 128, "heads": 4, "kv_heads": 2}
QUICK = {"hidden": 512, "layers": 4, "intermediate": 1408, "heads": 8, "kv_heads": 4}


def model_facts(model_dir: Path) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    from safetensors import safe_open

    shards = sorted(model_dir.glob("*.safetensors"))
    params = 0
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            params += sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    head_dim = config.hidden_size // config.num_attention_heads
    layer = (
        2 * config.hidden_size * config.num_attention_heads * head_dim
        + 2 * config.hidden_size * config.num_key_value_heads * head_dim
        + 3 * config.hidden_size * config.intermediate_size
    )
    return {"params": params, "shards": len(shards), "fp32_mb": params * 4 / 2**20, "layer_fp32_mb": layer * 4 / 2**20}


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a ~35M random model instead of ~1.1B (minutes)")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "merge-cost")
    args = parser.parse_args()

    from benchmarks.synthetic import random_llama, synthetic_run

    smollm2, pubmed = assets()
    data = pubmed_subset(pubmed, args.work / "data.jsonl", 20)
    dims = QUICK if args.quick else LARGE
    random_dir = args.work / "random-llama"
    if random_dir.exists():
        shutil.rmtree(random_dir)
    random_llama(random_dir, smollm2, shard_bytes=(20 if args.quick else 700) * 2**20, **dims)

    # The floor: the same command on a tiny model (a few MB), i.e. Python, torch, axolotl and the config.
    tiny_dir = args.work / "tiny-llama"
    shutil.rmtree(tiny_dir, ignore_errors=True)
    random_llama(tiny_dir, smollm2, shard_bytes=2**30, **TINY)
    tiny_cfg = synthetic_run(tiny_dir, args.work / "tiny", data, 0.4, "per_layer")
    _, _, floor_mb = run_cli(
        [
            "axolotl",
            "atp-merge",
            str(tiny_cfg),
            "--output-dir",
            str(args.work / "tiny" / "export"),
            "--overwrite",
            "--no-verify",
        ],
        args.work / "floor.log",
    )
    rows = []
    for name, model_dir in (("SmolLM2-135M (real, 1 fp32 file)", smollm2), ("random Llama (bf16 shards)", random_dir)):
        facts = model_facts(model_dir)
        work = args.work / model_dir.name
        cfg = synthetic_run(model_dir, work, data, 0.4, "per_layer")
        for verify in (False, True):
            out = work / "export"
            flags = [] if verify else ["--no-verify"]
            _, seconds, peak = run_cli(
                ["axolotl", "atp-merge", str(cfg), "--output-dir", str(out), "--overwrite", *flags],
                work / f"merge-verify-{verify}.log",
            )
            row = {"model": name, "verify": verify, **facts, "seconds": seconds, "peak_rss_mb": peak}
            row["bound_mb"] = facts["fp32_mb"] + facts["layer_fp32_mb"]
            print(row, flush=True)
            rows.append(row)
    lines = [
        "| model | parameters | shards | verification | merge s | peak RSS MB | peak RSS above floor MB | "
        "fp32 model + one layer MB | above-floor / bound |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        above = r["peak_rss_mb"] - floor_mb
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['shards']} | {'on' if r['verify'] else 'off'} | {r['seconds']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {above:.0f} | {r['bound_mb']:.0f} | {above / r['bound_mb']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    dump(args.work / "results.json", {"floor_mb": floor_mb, "rows": rows})
    if not args.no_record:
        mode = "quick" if args.quick else "full"
        body = (
            "`axolotl atp-merge` on synthetic runs (LoRA r=16 on all seven projections, per_layer decision at "
            f"0.4). The floor is the same command's peak on a tiny random model (imports and config only): "
            f"{floor_mb:.0f} MB. Without verification the merge streams one decoder layer at a time; "
            "verification loads the merged reference and the export to compare their logits, so its peak "
            "holds both models.\n\n" + table
        )
        record(f"Merge cost ({mode})", body, f"python benchmarks/merge_cost.py{' --quick' if args.quick else ''}")


if __name__ == "__main__":
    main()
