"""The two-stage baseline's first stage: a static, activation-weighted magnitude criterion (Wanda-sp).

For each group, the score is sum |W_ij| * ||X_j||_2 over the group's input columns of o_proj (a KV head
with its query heads) or down_proj (an MLP channel), with ||X_j|| the norm of input column j over the
calibration tokens. Scores are standardized within each layer and structure, so the removal spreads
evenly over the layers as in Wanda-sp (raw or globally standardized scores strip the early layers, whose
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
from axolotl_atp.groups import HEADS, MLP, Masks, ModelGeometry
from benchmarks.synthetic import write_decision
from devkit.evaluation import read_texts


@torch.no_grad()
def wanda_sp_scores(model: torch.nn.Module, spec, geo: ModelGeometry, batches: list[torch.Tensor]) -> Masks:
    """Raw per-group scores {structure: [layers, groups]} from calibration activations."""
    layers = model.get_submodule(spec.layers_path)
    sq_norms = {(s, i): None for s in (HEADS, MLP) for i in range(geo.num_layers)}
    handles = []
    for i, layer in enumerate(layers):
        for structure, name in ((HEADS, spec.o), (MLP, spec.down)):

            def hook(_m, inputs, key=(structure, i)):
                x = inputs[0].float().reshape(-1, inputs[0].shape[-1])
                add = (x * x).sum(0)
                sq_norms[key] = add if sq_norms[key] is None else sq_norms[key] + add

            handles.append(layer.get_submodule(name).register_forward_pre_hook(hook))
    for ids in batches:
        model(input_ids=ids)
    for h in handles:
        h.remove()
    scores: Masks = {HEADS: torch.zeros(geo.num_layers, geo.num_kv_heads), MLP: torch.zeros(geo.num_layers, 0)}
    mlp_rows = []
    for i, layer in enumerate(layers):
        o = layer.get_submodule(spec.o).weight.float().abs() * sq_norms[(HEADS, i)].sqrt()
        per_column = o.sum(0)  # [num_heads * head_dim]
        per_kv = per_column.view(geo.num_kv_heads, geo.group_size * geo.head_dim).sum(1)
        scores[HEADS][i] = per_kv
        down = layer.get_submodule(spec.down).weight.float().abs() * sq_norms[(MLP, i)].sqrt()
        mlp_rows.append(down.sum(0))
    scores[MLP] = torch.stack(mlp_rows)
    # Standardized within each layer and structure: Wanda-sp allocates the sparsity evenly over the layers
    # (raw scores would strip the early layers, whose activations are small, almost bare).
    return {s: (v - v.mean(1, keepdim=True)) / v.std(1, keepdim=True).clamp_min(1e-12) for s, v in scores.items()}


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
) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = spec_for(model.config.model_type)
    geo = ModelGeometry.from_config(model.config, spec)
    scores = wanda_sp_scores(model, spec, geo, calibration_batches(tokenizer, calibration, rows, seq_len))
    data = write_decision(
        model.config, scores, out, ratio, layout, mlp_round_to=mlp_round_to, base_model=str(model_dir)
    )
    data["notes"].append(f"static Wanda-sp decision from {rows} calibration rows of {calibration.name}")
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
    args = parser.parse_args()
    write_static_decision(
        args.model_dir, args.calibration, args.out, ratio=args.ratio, layout=args.layout, rows=args.rows
    )
    print(args.out)


if __name__ == "__main__":
    main()
