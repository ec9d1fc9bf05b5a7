"""`atp_masks.json`: the frozen decision, written by training and read (strictly) by the merge."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from axolotl_atp.decision import Decision
from axolotl_atp.errors import ATPUserError
from axolotl_atp.groups import HEADS, MLP, ModelGeometry, ParameterCounter, Structure

FORMAT = "axolotl-atp/masks"
VERSION = 1


class MasksFileError(ATPUserError, ValueError):
    """The masks file is missing, unreadable, or does not fit the model."""


def decision_to_json(
    decision: Decision,
    *,
    model_type: str,
    prune_ratio: float,
    layout: str,
    structures: list[Structure],
    counter: ParameterCounter,
    total_params_before: int | None = None,
    base_model: str | None = None,
    group_lasso: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The masks file's content; `group_lasso` (mode and the pruned slices' final norm) is recorded when given."""
    geo = decision.geo
    layers = []
    for kv, mlp in zip(decision.kept_groups(HEADS), decision.kept_groups(MLP), strict=True):
        heads = [kv_head * geo.group_size + j for kv_head in kv for j in range(geo.group_size)]
        layers.append({"heads": heads, "kv_heads": list(kv), "mlp": list(mlp)})
    prunable_after = counter.remaining_from_kept(decision.kept)
    params: dict[str, Any] = {
        "prunable_before": counter.prunable_total,
        "prunable_after": prunable_after,
        "achieved_prune_ratio": 1.0 - prunable_after / counter.prunable_total,
    }
    if total_params_before is not None:
        total_after = total_params_before - (counter.prunable_total - prunable_after)
        params.update(
            total_before=total_params_before,
            total_after=total_after,
            achieved_total_ratio=1.0 - total_after / total_params_before,
        )
    data = {
        "format": FORMAT,
        "version": VERSION,
        "model_type": model_type,
        "base_model": base_model,
        "prune_ratio": prune_ratio,
        "layout": layout,
        "structures": structures,
        "geometry": asdict(geo),
        "notes": decision.notes,
        "params": params,
        "layers": layers,
    }
    if group_lasso is not None:
        data["group_lasso"] = group_lasso
    return data


def _index_list(value: Any, size: int, where: str, path: Path) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise MasksFileError(f"{path}: {where} must be a list of integers. Fix: re-run training to rewrite the file.")
    if not value:
        raise MasksFileError(f"{path}: {where} is empty: a layer must keep at least one. Fix: re-run training.")
    if len(set(value)) != len(value):
        raise MasksFileError(f"{path}: {where} has duplicate indices. Fix: re-run training to rewrite the file.")
    if min(value) < 0 or max(value) >= size:
        raise MasksFileError(f"{path}: {where} has an index outside 0..{size - 1}. Fix: re-run training.")
    return sorted(value)


def peek_masks_header(path: Path) -> dict[str, Any]:
    """The layout and prune_ratio of a masks file, checked before any model is loaded."""
    data = _load(path)
    layout, ratio = data.get("layout"), data.get("prune_ratio")
    if layout not in ("per_layer", "uniform") or not isinstance(ratio, int | float) or not 0 < ratio < 1:
        raise MasksFileError(
            f"{path}: layout {layout!r} / prune_ratio {ratio!r} are not valid. Fix: point at the `atp_masks.json` "
            "of a run."
        )
    return {"layout": layout, "prune_ratio": float(ratio)}


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MasksFileError(
            f"{path} not found. It is written at the end of `axolotl train` with the ATP plugin. Fix: train "
            "with this config first, or point `output_dir` at the run that has it."
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise MasksFileError(f"{path} is not valid JSON ({err}). Fix: re-run training to rewrite it.") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise MasksFileError(f"{path} is not an axolotl-atp masks file. Fix: point at the `atp_masks.json` of a run.")
    return data


def read_masks(path: Path, geo: ModelGeometry, model_type: str) -> tuple[Decision, dict[str, Any]]:
    """Read and validate a masks file against the model it will be applied to."""
    data = _load(path)
    if data.get("model_type") != model_type:
        raise MasksFileError(
            f"{path} was made for model_type {data.get('model_type')!r}, not {model_type!r}. Fix: merge with "
            "the base model the run was trained on."
        )
    layers = data.get("layers")
    if not isinstance(layers, list) or len(layers) != geo.num_layers:
        n = len(layers) if isinstance(layers, list) else "no"
        raise MasksFileError(
            f"{path} has {n} layers but the model has {geo.num_layers}. Fix: merge with the base model the "
            "run was trained on."
        )
    saved_geo = data.get("geometry") if isinstance(data.get("geometry"), dict) else {}
    for key in ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size"):
        if saved_geo.get(key) != getattr(geo, key):
            raise MasksFileError(
                f"{path}: {key} = {saved_geo.get(key)} but the model has {getattr(geo, key)}. Fix: merge with "
                "the base model the run was trained on."
            )
    kept: dict[str, list[list[int]]] = {HEADS: [], MLP: []}
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise MasksFileError(f"{path}: layers[{i}] is not an object. Fix: re-run training.")
        kv = _index_list(layer.get("kv_heads"), geo.num_kv_heads, f"layers[{i}].kv_heads", path)
        heads = _index_list(layer.get("heads"), geo.num_heads, f"layers[{i}].heads", path)
        expected = [k * geo.group_size + j for k in kv for j in range(geo.group_size)]
        if heads != expected:
            raise MasksFileError(
                f"{path}: layers[{i}].heads {heads} are not the query heads of kv_heads {kv}. Fix: re-run training."
            )
        kept[HEADS].append(kv)
        kept[MLP].append(_index_list(layer.get("mlp"), geo.intermediate_size, f"layers[{i}].mlp", path))
    return Decision(kept=kept, geo=geo), data
