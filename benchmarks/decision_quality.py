"""Decision quality without training: held-out PubMed and Wikipedia perplexity of the *base* SmolLM2-135M with a
decision's groups removed (no LoRA), for static importance criteria and for the decisions in masks files (a run's
atp_masks.json), at one budget. Minutes instead of the hours of a training row: the quick check of whether
a generator's choices beat simple importance scores.

Rows, at prune ratio r:
- base;
- Wanda-sp over both structures, and over MLP channels only (the two-stage baseline's decision);
- per masks file: its decision; its MLP part alone and its heads part alone (the other structure whole);
  and Wanda-sp's choice of the same number of groups per layer and structure (the file's allocation, the
  static criterion's choice of which groups within each layer).

Removing a group is exact here: the plugin's hard masks on the o_proj input columns of a KV head's query heads
and on the down_proj input column of an MLP channel, which is what the export computes without them.

    python benchmarks/decision_quality.py [--ratio 0.2] [--masks NAME=PATH ...] [--eval-tokens 4096]
                                          [--quick] [--no-record] [--work DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, assets, dump, held_out_evals, record

Kept = dict[str, list[list[int]]]


def top_by_score(scores: torch.Tensor, counts: list[int]) -> list[list[int]]:
    """Per layer, the `counts[i]` highest-scoring groups."""
    return [
        sorted(torch.argsort(row, descending=True, stable=True)[:k].tolist())
        for row, k in zip(scores, counts, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument(
        "--masks", nargs="+", action="extend", default=[], help="NAME=PATH of masks files (atp_masks.json), repeatable"
    )
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--calibration-rows", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="1,024 eval tokens, 8 calibration rows (a minute)")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "decision-quality")
    args = parser.parse_args()
    if args.quick:
        args.eval_tokens, args.calibration_rows = 1024, 8

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_atp.architectures import spec_for
    from axolotl_atp.decision import Decision, freeze_decision
    from axolotl_atp.groups import HEADS, MLP, ModelGeometry, ParameterCounter, slice_refs
    from axolotl_atp.masking import MaskedModel, MaskMode
    from axolotl_atp.masks_file import read_masks
    from axolotl_atp.training.importance import wanda_sp_scores
    from benchmarks.static_importance import calibration_batches
    from devkit.evaluation import perplexity

    model_dir, pubmed = assets()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    spec = spec_for(model.config.model_type)
    geo = ModelGeometry.from_config(model.config, spec)
    counter = ParameterCounter(geo, slice_refs(spec, geo))
    evals = held_out_evals(tokenizer, pubmed, args.eval_tokens)  # Wikipedia: what a decision costs outside the domain
    # Calibration rows no benchmark trains on (the quality benchmark trains on the first 4,000).
    args.work.mkdir(parents=True, exist_ok=True)
    calibration = args.work / "calibration.jsonl"
    lines = (pubmed / "train.jsonl").read_text().splitlines(keepends=True)
    calibration.write_text("".join(lines[4000 : 4000 + args.calibration_rows]))
    inputs = [{"input_ids": b} for b in calibration_batches(tokenizer, calibration, args.calibration_rows, 256)]
    scores = wanda_sp_scores(model, spec, geo, inputs, [HEADS, MLP])
    whole = {
        HEADS: [list(range(geo.num_kv_heads))] * geo.num_layers,
        MLP: [list(range(geo.intermediate_size))] * geo.num_layers,
    }

    def freeze(structures: list[str]) -> Kept:
        decision = freeze_decision(
            {s: scores[s] for s in structures},
            geo,
            counter,
            args.ratio,
            "per_layer",
            round_to={HEADS: 1, MLP: 8},
            minimum={HEADS: 1, MLP: 1},
        )
        return {**whole, **decision.kept}

    candidates: list[tuple[str, Kept]] = [
        ("Wanda-sp, both structures", freeze([HEADS, MLP])),
        ("Wanda-sp, MLP channels only (two-stage's decision)", freeze([MLP])),
    ]
    for item in args.masks:
        name, path = item.split("=", 1)
        decision, _ = read_masks(Path(path), geo, model.config.model_type)
        kept = {**whole, **decision.kept}
        counts = {s: [len(k) for k in kept[s]] for s in (HEADS, MLP)}
        candidates += [
            (f"{name}", kept),
            (f"{name}: its MLP part only", {**whole, MLP: kept[MLP]}),
            (f"{name}: its heads part only", {**whole, HEADS: kept[HEADS]}),
            (f"Wanda-sp at {name}'s per-layer counts", {s: top_by_score(scores[s], counts[s]) for s in (HEADS, MLP)}),
            (
                f"Wanda-sp at {name}'s per-layer head counts (MLP whole)",
                {**whole, HEADS: top_by_score(scores[HEADS], counts[HEADS])},
            ),
            (
                f"Wanda-sp at {name}'s per-layer MLP counts (heads whole)",
                {**whole, MLP: top_by_score(scores[MLP], counts[MLP])},
            ),
        ]

    rows = [
        {
            "decision": "base (nothing removed)",
            "kv_heads_kept": 1.0,
            "mlp_kept": 1.0,
            "removed": 0.0,
            **{name: perplexity(model, ids) for name, ids in evals.items()},
        }
    ]
    # Hard masks on the inputs of o_proj and down_proj: exactly the model without those groups (masking.py).
    masked = MaskedModel(model, spec, geo)
    for name, kept in candidates:
        masks = Decision(kept=kept, geo=geo).masks()
        masked.set_masks(masks, MaskMode.FULL)
        rows.append(
            {
                "decision": name,
                "kv_heads_kept": float(masks[HEADS].mean()),
                "mlp_kept": float(masks[MLP].mean()),
                "removed": 1.0 - float(counter.remaining_ratio(masks)),
                **{e: perplexity(model, ids, desc=f"{e} {name[:30]}") for e, ids in evals.items()},
            }
        )
        print(rows[-1], flush=True)
    dump(args.work / "results.json", {"ratio": args.ratio, "eval_tokens": args.eval_tokens, "rows": rows})
    body = report(rows, args)
    print(body)
    if not args.no_record:
        masks = " ".join(f"--masks {m}" for m in args.masks)
        record(
            f"Decision quality (zero-shot, prune {args.ratio})",
            body,
            f"python benchmarks/decision_quality.py --ratio {args.ratio} {masks}".strip(),
        )


def report(rows: list[dict], args: argparse.Namespace) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    lines = [
        f"SmolLM2-135M base weights (no LoRA, no training) with each decision's groups removed; perplexity on "
        f"{args.eval_tokens:,} held-out PubMed tokens and as many Wikipedia tokens; Wanda-sp from "
        f"{args.calibration_rows} PubMed rows that no benchmark trains on. Commit {commit.strip()}. Removed = fraction "
        "of the prunable parameters.",
        "",
        "| decision | KV heads kept | MLP channels kept | removed | PubMed PPL | Wikipedia PPL |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['decision']} | {r['kv_heads_kept']:.3f} | {r['mlp_kept']:.3f} | {r['removed']:.3f} "
            f"| {r['PubMed']:.2f} | {r['Wikipedia']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
