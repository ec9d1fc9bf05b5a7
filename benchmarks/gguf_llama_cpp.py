"""GGUF export in llama.cpp: probability match and generation speed of a pruned export against its dense base.

Usage: python benchmarks/gguf_llama_cpp.py EXPORT_DIR BASE_DIR [--tokens 64] [--repeats 2] [--threads 1]

Both folders are converted by the same writer (`axolotl_atp.export.gguf_writer`: the dense base as a
`deci` file with full widths). For each GGUF type it prints the check against the HF folder, and for
f16 the greedy-generation speed in llama.cpp (llama.cpp's defaults: f16 KV cache, flash attention auto;
the clock starts at the first generated token), the median of `--repeats` runs, pruned and dense alternating.
On a shared machine keep `--threads 1`: llama.cpp's worker threads spin at barriers, and with more threads
than free cores generation slows several-fold and the figures become noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from axolotl_atp.export.gguf_layout import is_per_layer_export, read_config
from axolotl_atp.export.gguf_verify import verify_gguf
from axolotl_atp.export.gguf_writer import write_gguf
from axolotl_atp.export.llama_cpp import run_llama_cpp
from axolotl_atp.export.verify import FALLBACK_TEXTS

PROMPT = "The patient was admitted to the hospital with"


def tokens_per_second(path: Path, vocab: int, prompt: list[int], tokens: int, threads: int) -> float:
    run = run_llama_cpp(path, vocab, generate=(prompt, tokens), threads=threads, kv_cache_f32=False)
    return float(run.tokens_per_second or 0.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("export", type=Path)
    parser.add_argument("base", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--types", default="f32,f16,q8_0")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    results: dict = {"threads": args.threads, "cpus": os.cpu_count(), "tokens": args.tokens}
    speed_inputs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in (("pruned", args.export), ("dense", args.base)):
            remote = is_per_layer_export(read_config(folder))
            vocab = int(read_config(folder)["vocab_size"])
            prompt = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)(PROMPT)["input_ids"]
            entry: dict = {"folder": str(folder)}
            for out_type in args.types.split(","):
                path = Path(tmp) / f"{name}-{out_type}.gguf"
                summary = write_gguf(folder, path, out_type)
                check = verify_gguf(folder, path, FALLBACK_TEXTS, out_type, trust_remote_code=remote)
                entry[out_type] = {
                    "bytes": summary.bytes_written,
                    "status": check.status,
                    "max_abs_prob_diff": check.max_abs_prob_diff,
                    "mean_total_variation": check.mean_total_variation,
                    "tokenizer_matches": check.tokenizer_matches,
                }
                if out_type == "f16":
                    speed_inputs[name] = (path, vocab, prompt)
                print(name, out_type, json.dumps(entry[out_type]), flush=True)
            results[name] = entry
        runs: dict[str, list[float]] = {name: [] for name in speed_inputs}
        for _ in range(args.repeats):
            for name, (path, vocab, prompt) in speed_inputs.items():
                runs[name].append(tokens_per_second(path, vocab, prompt, args.tokens, args.threads))
        for name, values in runs.items():
            results[name]["f16"]["tokens_per_second"] = statistics.median(values)
            results[name]["f16"]["tokens_per_second_runs"] = values
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
