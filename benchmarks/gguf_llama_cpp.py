"""GGUF export in llama.cpp: probability match and generation speed of a pruned export against its dense base.

Usage: python benchmarks/gguf_llama_cpp.py EXPORT_DIR BASE_DIR [--tokens 128] [--repeats 3]

Both folders are converted by the same writer (`axolotl_atp.export.gguf_writer`: the dense base as a
`deci` file with full widths). For each GGUF type it prints the check against the HF folder, and for
f16 the greedy-generation speed in llama.cpp (llama.cpp's defaults: f16 KV cache, flash attention auto;
the clock starts at the first generated token), the median of `--repeats` runs.
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


def speed(path: Path, vocab: int, prompt: list[int], tokens: int, repeats: int) -> float:
    runs = [
        run_llama_cpp(path, vocab, generate=(prompt, tokens), kv_cache_f32=False).tokens_per_second
        for _ in range(repeats)
    ]
    return statistics.median(r for r in runs if r is not None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("export", type=Path)
    parser.add_argument("base", type=Path)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--types", default="f32,f16,q8_0")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    results: dict = {"threads": os.cpu_count()}
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
                    entry[out_type]["tokens_per_second"] = speed(path, vocab, prompt, args.tokens, args.repeats)
                print(name, out_type, json.dumps(entry[out_type]), flush=True)
            results[name] = entry
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
