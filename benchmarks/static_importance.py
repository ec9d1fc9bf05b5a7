"""The two-stage baseline's first stage: a static, activation-weighted magnitude criterion (Wanda-sp).

The scores are those of ATP's importance prior (axolotl_atp/training/importance.py): for each group,
sum |W_ij| * ||X_j||_2 over the group's input columns of o_proj (a KV head with its query heads) or
down_proj (an MLP channel), standardized within each layer and structure, so the removal spreads evenly
over the layers as in Wanda-sp (raw or globally standardized scores strip the early layers, whose
activations are small, almost bare); the decision then goes through the same exact-budget freeze as
ATP's generator scores, so both methods prune the same structures at the same budget and layout.

    python benchmarks/static_importance.py MODEL_DIR CALIBRATION.jsonl OUT.json --ratio 0.4 [--layout per_layer]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from axolotl_atp.architectures import spec_for
from axolotl_atp.atomic_files import write_json_atomically
from axolotl_atp.groups import HEADS, MLP, ModelGeometry
from axolotl_atp.training.importance import wanda_sp_scores
from benchmarks.synthetic import write_decision
from devkit.evaluation import read_texts


def calibration_batches(tokenizer, path: Path, rows: int, seq_len: int, batch_size: int = 4) -> list[torch.Tensor]:
    texts = read_texts(path, limit=rows)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:seq_len] for t in texts]
    ids = [x for x in ids if len(x) >= 8]
    batches = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        width = min(len(x) for x in chunk)  # equal lengths: no padding inside the statistics
        batches.append(torch.tensor([x[:width] for x in chunk]))
    return batches


def write_static_decision(
    model_dir: Path,
    calibration: Path,
    out: Path,
    *,
    ratio: float,
    layout: str,
    rows: int = 32,
    seq_len: int = 256,
    mlp_round_to: int = 8,
    structures: tuple[str, ...] = (HEADS, MLP),
) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = spec_for(model.config.model_type)
    geo = ModelGeometry.from_config(model.config, spec)
    inputs = [{"input_ids": ids} for ids in calibration_batches(tokenizer, calibration, rows, seq_len)]
    scores = wanda_sp_scores(model, spec, geo, inputs, list(structures))
    data = write_decision(
        model.config, scores, out, ratio, layout, mlp_round_to=mlp_round_to, base_model=str(model_dir)
    )
    data["notes"].append(
        f"static Wanda-sp decision over {', '.join(structures)} from {rows} calibration rows of {calibration.name}"
    )
    write_json_atomically(data, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("calibration", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--ratio", type=float, required=True)
    parser.add_argument("--layout", default="per_layer", choices=["per_layer", "uniform"])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--structures", nargs="+", default=[HEADS, MLP], choices=[HEADS, MLP])
    args = parser.parse_args()
    write_static_decision(
        args.model_dir,
        args.calibration,
        args.out,
        ratio=args.ratio,
        layout=args.layout,
        rows=args.rows,
        structures=tuple(args.structures),
    )
    print(args.out)


if __name__ == "__main__":
    main()
