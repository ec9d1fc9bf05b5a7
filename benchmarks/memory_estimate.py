"""What a Llama-3.1-8B QLoRA + ATP run needs on one GPU: an estimate, itemised, from the model's shapes.

No GPU was available to measure this. The estimate adds up the memory that the shapes fix (NF4
weights with double quantization, bf16 embeddings, LoRA with fp32 AdamW, ATP's generator with its
AdamW, checkpointed activations, the logits and the loss) and scales the training-state part by the
largest ATP/plain peak-memory ratio measured on the CPU (`benchmarks/training_overhead.py`).

    python benchmarks/memory_estimate.py [--seq 2048] [--micro-batch 1] [--ratio 1.09] [--no-record]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import record

GB = 1e9
# Llama-3.1-8B (config.json of meta-llama/Llama-3.1-8B).
LLAMA_31_8B = {
    "hidden": 4096,
    "intermediate": 14336,
    "layers": 32,
    "heads": 32,
    "kv_heads": 8,
    "head_dim": 128,
    "vocab": 128256,
}


def estimate(seq: int, micro_batch: int, lora_r: int, ratio: float, m: dict = LLAMA_31_8B) -> list[tuple[str, float]]:
    from axolotl_atp.training.generator import PruningDecisionGenerator

    h, i, n_layers = m["hidden"], m["intermediate"], m["layers"]
    q_out, kv_out = m["heads"] * m["head_dim"], m["kv_heads"] * m["head_dim"]
    shapes = [(h, q_out), (h, kv_out), (h, kv_out), (q_out, h), (h, i), (h, i), (i, h)]  # (in, out)
    linear = n_layers * sum(a * b for a, b in shapes)
    lora = n_layers * sum(lora_r * (a + b) for a, b in shapes)
    generator = sum(
        p.numel()
        for p in PruningDecisionGenerator(n_layers, {"attention_heads": m["kv_heads"], "mlp_channels": i}).parameters()
    )
    tokens = seq * micro_batch
    rows = [
        # 4 bits per weight, plus double-quantized absmax (8 bits per 64 weights, then 32-bit per 256 blocks).
        ("NF4 decoder weights", linear * (0.5 + 1 / 64 + 4 / (64 * 256))),
        ("embeddings and lm_head, bf16 (untied)", 2 * m["vocab"] * h * 2),
        ("LoRA weights + grads + AdamW states (fp32)", lora * 16),
        ("ATP generator + grads + AdamW states (fp32)", generator * 16),
        ("checkpointed layer inputs (bf16)", n_layers * tokens * h * 2),
        ("one layer recomputed in backward (bf16, ~6 tensors of the MLP width)", tokens * i * 2 * 6),
        ("logits and their gradient (fp32)", 2 * tokens * m["vocab"] * 4),
    ]
    training = sum(v for _, v in rows[2:])
    rows.append(
        (f"ATP extra: training state x {ratio} (largest measured ATP/plain peak ratio)", training * (ratio - 1))
    )
    rows.append(("CUDA context and allocator slack (typical)", 1.5 * GB))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--ratio", type=float, default=1.09, help="ATP/plain peak-memory ratio (RESULTS.md)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    lines = ["| item | GB |", "|---|---|"]
    total = 0.0
    for seq in (args.seq, 2 * args.seq):
        rows = estimate(seq, args.micro_batch, args.lora_r, args.ratio)
        total = sum(v for _, v in rows)
        if seq == args.seq:
            lines += [f"| {name} | {value / GB:.2f} |" for name, value in rows]
            lines.append(
                f"| **total, sequence_len {seq}, micro_batch_size {args.micro_batch}** | **{total / GB:.1f}** |"
            )
        else:
            lines.append(f"| total with sequence_len {seq} | {total / GB:.1f} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        body = (
            f"An estimate, not a measurement (no GPU was lent to this project yet): Llama-3.1-8B, QLoRA r={args.lora_r} "
            "on all seven projections, bf16 compute, gradient checkpointing, ATP with default generator settings. "
            "The generator's calibration step runs before the LoRA step, not alongside it, so its activations do not add to "
            f"the LoRA step's peak; the measured ATP/plain ratio ({args.ratio}) covers the masks and hooks.\n\n" + table
        )
        record("Memory estimate: Llama-3.1-8B QLoRA + ATP on one GPU", body, "python benchmarks/memory_estimate.py")


if __name__ == "__main__":
    main()
