"""QLoRA merge: into the original weights or into the NF4-dequantized ones? Measured on the real SmolLM2-135M.

Trains QLoRA + ATP (prune_ratio 0.4), then compares held-out PubMed perplexity of the trained masked model
(4-bit base + adapter + hard masks, exactly what training optimised) with the two exports of
`axolotl atp-merge --base-weights nf4|original`. The default of `--base-weights auto` for QLoRA runs is
the one closer to the trained model.

    python benchmarks/qlora_merge_base.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, assets, dump, pubmed_subset, record, run_cli, smollm2_config, train


def masked_qlora_model(model_dir: Path, run: Path):
    """The trained function: NF4 base (as axolotl loads it) + LoRA + the frozen hard masks."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    from axolotl_atp.architectures import spec_for
    from axolotl_atp.groups import ModelGeometry
    from axolotl_atp.masking import MaskedModel, MaskMode
    from axolotl_atp.masks_file import read_masks

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.bfloat16,
    )
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=bnb, dtype=torch.float32, device_map="cpu"
    )
    model = PeftModel.from_pretrained(base, str(run)).eval()
    config = AutoConfig.from_pretrained(model_dir)
    spec = spec_for(config.model_type)
    geo = ModelGeometry.from_config(config, spec)
    decision, _ = read_masks(run / "atp_masks.json", geo, config.model_type)
    masked = MaskedModel(model, spec, geo)
    masked.set_masks(decision.masks(), MaskMode.FULL)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    steps, eval_tokens = (12, 4096) if args.quick else (60, 16384)
    model_dir, pubmed = assets()
    work = ROOT / "benchmarks" / "work" / "qlora-merge"
    data = pubmed_subset(pubmed, work / "data.jsonl", 1500)
    atp = {
        "prune_ratio": 0.4,
        "control_steps": steps // 2,
        "generator_lr": 0.01,
        "calibration_size": 32,
        "mlp_round_to": 8,
    }
    cfg = smollm2_config(
        model_dir, data, work, atp=atp, adapter="qlora", load_in_4bit=True, max_steps=steps, micro_batch_size=2
    )
    train(cfg, "qlora")
    cfg_path = work / "qlora.yml"
    run = Path(cfg["output_dir"])
    exports = {}
    for choice in ("nf4", "original"):
        out = work / f"export-{choice}"
        run_cli(
            ["axolotl", "atp-merge", str(cfg_path), "--base-weights", choice, "--output-dir", str(out), "--overwrite"],
            work / f"merge-{choice}.log",
        )
        exports[choice] = out

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from devkit.evaluation import perplexity, read_texts, token_stream

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = token_stream(tokenizer, read_texts(pubmed / "heldout.jsonl"), eval_tokens)
    ppl = {"trained masked model (NF4 base + LoRA + masks)": perplexity(masked_qlora_model(model_dir, run), ids)}
    for choice, out in exports.items():
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True)
        ppl[f"export, merged into {choice} weights"] = perplexity(model, ids)
    reference = ppl["trained masked model (NF4 base + LoRA + masks)"]
    lines = ["| model | held-out PubMed PPL | ratio to trained masked model |", "|---|---|---|"]
    lines += [f"| {name} | {value:.3f} | {value / reference:.4f} |" for name, value in ppl.items()]
    table = "\n".join(lines)
    print(table)
    closer = min(("nf4", "original"), key=lambda c: abs(ppl[f"export, merged into {c} weights"] - reference))
    print("closer to the trained model:", closer)
    dump(work / "results.json", {"ppl": ppl, "closer": closer, "steps": steps, "eval_tokens": int(ids.numel())})
    if not args.no_record:
        mode = "quick" if args.quick else "full"
        body = (
            f"QLoRA + ATP on SmolLM2-135M, {steps} steps, prune_ratio 0.4, then `atp-merge` both ways; "
            f"{int(ids.numel())} held-out PubMed tokens. Closer to the trained model: **{closer}**.\n\n" + table
        )
        record(
            f"QLoRA merge base weights ({mode})",
            body,
            f"python benchmarks/qlora_merge_base.py{' --quick' if args.quick else ''}",
        )


if __name__ == "__main__":
    main()
