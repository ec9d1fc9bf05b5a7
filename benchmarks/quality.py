"""Quality of the exported models: ATP against a two-stage baseline, dense LoRA and an ablation.

Every run trains the real SmolLM2-135M on the same PubMed abstracts for the same steps and tokens, with
`axolotl train`; every pruned model is written by `axolotl atp-merge` and evaluated as the exported
model (loaded with `from_pretrained`), on held-out PubMed and on general English (Wikipedia).

- base: no training.               - dense LoRA: plain LoRA, merged with peft.
- ATP at each ratio (per_layer), and at 0.4 also with `layout: uniform`.
- two-stage: a static Wanda-sp decision (benchmarks/static_importance.py) from calibration rows that
  are not training rows, then LoRA for the same steps on the pruned model (`atp.decision_file`, plain
  hard masks, no group lasso), exported through the same merge.
- ablation at 0.4: ATP's generator, without the LoRA-aware forward and the group lasso.

    python benchmarks/quality.py [--quick] [--no-record] [--work DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, assets, dump, pubmed_subset, record, run_cli, smollm2_config, train

TRAIN_ROWS = 1500


def atp_block(ratio: float, steps: int, **extra) -> dict:
    return {
        "prune_ratio": ratio,
        "control_steps": max(1, steps // 2),
        "generator_lr": 0.02,
        "mlp_round_to": 8,
        "calibration_size": 64,
        **extra,
    }


def plan(ratios: list[float], layouts_at: float | None, ablation_at: float) -> list[dict]:
    runs: list[dict] = [{"name": "dense-lora", "method": "dense LoRA", "ratio": 0.0, "layout": "-"}]
    for r in ratios:
        runs.append({"name": f"atp-{r}", "method": "ATP", "ratio": r, "layout": "per_layer"})
        runs.append(
            {"name": f"two-stage-{r}", "method": "two-stage (Wanda-sp, then LoRA)", "ratio": r, "layout": "per_layer"}
        )
    if layouts_at is not None:
        runs.append({"name": f"atp-{layouts_at}-uniform", "method": "ATP", "ratio": layouts_at, "layout": "uniform"})
    runs.append(
        {
            "name": f"ablation-{ablation_at}",
            "method": "ATP without LoRA-aware + group lasso",
            "ratio": ablation_at,
            "layout": "per_layer",
        }
    )
    return runs


def run_config(run: dict, model_dir: Path, data: Path, work: Path, steps: int, calibration: Path) -> dict:
    out = work / run["name"]
    # One prepared dataset for all runs (same data, tokenizer and length): tokenized once.
    common = {
        "max_steps": steps,
        "micro_batch_size": 2,
        "logging_steps": 4,
        "dataset_prepared_path": str(work / "prepared"),
    }
    if run["method"] == "dense LoRA":
        return smollm2_config(model_dir, data, out, atp=None, **common)
    if run["method"] == "ATP":
        atp = atp_block(run["ratio"], steps, layout=run["layout"])
    elif run["method"].startswith("ATP without"):
        atp = atp_block(run["ratio"], steps, layout=run["layout"], lora_aware=False, group_lasso="off")
    else:
        from benchmarks.static_importance import write_static_decision

        decision = write_static_decision(
            model_dir, calibration, out / "static_masks.json", ratio=run["ratio"], layout=run["layout"]
        )
        atp = {"decision_file": str(decision), "lora_aware": False, "group_lasso": "off", "mlp_round_to": 8}
    return smollm2_config(model_dir, data, out, atp=atp, **common)


def merged_dense(model_dir: Path, adapter: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="ratio 0.4, one layout, 4 steps, 1k eval tokens (minutes)")
    parser.add_argument("--no-record", action="store_true", help="do not write RESULTS.md")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "quality")
    args = parser.parse_args()
    if args.quick:
        steps, ratios, eval_tokens = 4, [0.4], 1024
    else:
        steps, ratios, eval_tokens = 40, [0.2, 0.3, 0.4, 0.5], 8192

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from devkit.assets import ensure_wikipedia
    from devkit.evaluation import perplexity, read_texts, token_stream

    model_dir, pubmed = assets()
    wiki = ensure_wikipedia()
    work = args.work
    data = pubmed_subset(pubmed, work / "train.jsonl", TRAIN_ROWS)
    # Calibration rows for the static criterion: PubMed training abstracts that no run trains on.
    rows = (pubmed / "train.jsonl").read_text().splitlines(keepends=True)[TRAIN_ROWS : TRAIN_ROWS + 32]
    calibration = work / "static-calibration.jsonl"
    calibration.write_text("".join(rows))

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    evals = {
        "PubMed": token_stream(tokenizer, read_texts(pubmed / "heldout.jsonl"), eval_tokens),
        "Wikipedia": token_stream(tokenizer, read_texts(wiki / "articles.jsonl"), eval_tokens),
    }

    def evaluate(model) -> dict:
        return {name: perplexity(model, ids) for name, ids in evals.items()} | {"params": model.num_parameters()}

    results = [{"name": "base", "method": "base (no training)", "ratio": 0.0, "layout": "-"}]
    results[0].update(evaluate(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)))
    # The quick mode skips the second layout (the tests merge both layouts on every family anyway).
    for run in plan(ratios, None if args.quick else 0.4, 0.4):
        started = time.time()
        cfg = run_config(run, model_dir, data, work, steps, calibration)
        _, metrics = train(cfg, run["name"])
        run_dir = Path(cfg["output_dir"])
        if run["method"] == "dense LoRA":
            model = merged_dense(model_dir, run_dir)
        else:
            export = work / run["name"] / "export"
            cfg_path = work / run["name"] / f"{run['name']}.yml"
            run_cli(
                ["axolotl", "atp-merge", str(cfg_path), "--output-dir", str(export), "--overwrite"],
                work / run["name"] / "merge.log",
            )
            model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, trust_remote_code=True)
        run.update(evaluate(model), train_loss=metrics.get("train_loss"), seconds=round(time.time() - started))
        print(run, flush=True)
        results.append(run)
        dump(work / "results.json", {"steps": steps, "eval_tokens": eval_tokens, "runs": results})

    table = format_table(results)
    print(table)
    plot = ROOT / "benchmarks" / ("quality-quick.png" if args.quick else "quality.png")
    plot_path = write_plot(results, work / "quality.png" if args.no_record else plot)
    if not args.no_record:
        mode = "quick" if args.quick else "full"
        tokens = steps * 2 * 256
        body = (
            f"SmolLM2-135M, LoRA r=16 on all seven projections, {steps} optimizer steps of 2x256 tokens "
            f"(up to {tokens:,} training tokens) of PubMed abstracts for every trained row; ATP's generator "
            f"trains for the first {max(1, steps // 2)} steps. Perplexity on {eval_tokens:,} held-out tokens "
            "of each set, measured on the exported models (`atp-merge`, loaded with `from_pretrained`). "
            "The ratio columns divide by the two-stage baseline at the same prune ratio (below 1: ATP "
            f"better).\n\n{table}\n\n![quality]({plot_path.name})"
        )
        record(f"Quality ({mode})", body, f"python benchmarks/quality.py{' --quick' if args.quick else ''}")


def format_table(results: list[dict]) -> str:
    two_stage = {r["ratio"]: r for r in results if r["method"].startswith("two-stage")}
    lines = [
        "| model | prune ratio | layout | parameters | PubMed PPL | Wikipedia PPL | PubMed / two-stage | Wikipedia / two-stage |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ref = two_stage.get(r["ratio"])
        rel = (
            (f"{r['PubMed'] / ref['PubMed']:.3f}", f"{r['Wikipedia'] / ref['Wikipedia']:.3f}")
            if ref and not r["method"].startswith("two-stage")
            else ("", "")
        )
        lines.append(
            f"| {r['method']} | {r['ratio']} | {r['layout']} | {r['params']:,} | {r['PubMed']:.2f} | "
            f"{r['Wikipedia']:.2f} | {rel[0]} | {rel[1]} |"
        )
    return "\n".join(lines)


def write_plot(results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("PubMed", "Wikipedia"), strict=True):
        for method, marker in (("ATP", "o"), ("two-stage (Wanda-sp, then LoRA)", "s")):
            pts = sorted(
                (r["ratio"], r[metric]) for r in results if r["method"] == method and r["layout"] == "per_layer"
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=marker, label=method)
        for r in results:
            if r["method"] in ("base (no training)", "dense LoRA"):
                ax.axhline(
                    r[metric],
                    linestyle="--",
                    linewidth=1,
                    color="grey" if r["name"] == "base" else "black",
                    label=f"{r['method']} (unpruned)",
                )
            elif r["method"].startswith("ATP without") or r["layout"] == "uniform":
                ax.scatter([r["ratio"]], [r[metric]], marker="x", label=f"{r['method']} ({r['layout']})")
        ax.set_xlabel("prune ratio (of prunable parameters)")
        ax.set_ylabel(f"{metric} perplexity (exported model)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
