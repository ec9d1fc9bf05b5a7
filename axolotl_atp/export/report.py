"""What the merge writes beside the weights: the report, a plot of kept widths, and a model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from axolotl_atp.export.pruned import widths

if TYPE_CHECKING:
    from axolotl_atp.export.merge import MergePlan, WrittenExport
    from axolotl_atp.export.verify import LogitCheck


def build_report(plan: MergePlan, written: WrittenExport, check: LogitCheck | None) -> dict[str, Any]:
    """`atp_report.json`: what was merged, the parameters before and after, the check, the cost, the widths."""
    stats, counter, geo = written.stats, plan.counter, plan.geo
    kv, mlp = widths(plan.decision, geo)
    prunable_after = counter.remaining_from_kept(plan.decision.kept)
    return {
        "base_model": str(plan.cfg.base_model),
        "adapter": str(plan.adapter_dir),
        "datasets": [str(d.get("path")) for d in plan.cfg.datasets or []],
        "qlora": plan.cfg.adapter == "qlora",
        "layout": plan.layout,
        "prune_ratio": plan.masks_data.get("prune_ratio"),
        "base_weights": plan.base_weights,
        "params_before": stats.params_before,
        "params_after": stats.params_after,
        "prunable_params_before": counter.prunable_total,
        "prunable_params_after": prunable_after,
        "achieved_prune_ratio": 1 - prunable_after / counter.prunable_total,
        "achieved_total_ratio": 1 - stats.params_after / stats.params_before,
        "max_abs_logit_diff": check.max_diff if check else None,
        "logit_tolerance": check.tolerance if check else None,
        "pruned_lora_slice_norm": stats.pruned_lora_norm,
        "bytes_written": stats.bytes_written,
        "merge_seconds": round(written.merge_seconds, 2),
        "merge_peak_rss_mb": round(written.peak_rss_mb, 1),
        "tokenizer_from": str(written.tokenizer_source),
        "layers": [
            {"kv_heads": k, "query_heads": k * geo.group_size, "mlp_channels": m} for k, m in zip(kv, mlp, strict=True)
        ],
    }


def plot_widths(kv_heads: list[int], mlp: list[int], geo: Any, path: Path) -> None:
    """Bar charts of kept attention heads and MLP channels per layer, against the original widths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(len(mlp)))
    heads = [k * geo.group_size for k in kv_heads]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, len(layers) * 0.3), 6), sharex=True)
    ax1.bar(layers, [geo.num_heads] * len(layers), color="#dddddd", label="original")
    ax1.bar(layers, heads, color="#3b75af", label="kept")
    ax1.set_ylabel("query heads")
    ax1.legend(loc="lower right")
    ax2.bar(layers, [geo.intermediate_size] * len(layers), color="#dddddd", label="original")
    ax2.bar(layers, mlp, color="#ef8636", label="kept")
    ax2.set_ylabel("MLP channels")
    ax2.set_xlabel("decoder layer")
    fig.suptitle("axolotl-atp: kept widths per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def gguf_row(report: dict[str, Any]) -> str:
    """The model card's line on the GGUF file of `--format gguf` (empty without one)."""
    entry = report.get("gguf")
    if not entry:
        return ""
    check = entry["verification"]
    return (
        f"| GGUF for llama.cpp / ollama | `{entry['file']}` ({entry['llama_cpp_arch']}, {entry['type']}); check in "
        f"llama.cpp: {check['status']}, max abs probability difference {entry['max_abs_prob_diff']} |\n"
    )


def model_card(report: dict[str, Any]) -> str:
    uniform = report["layout"] == "uniform"
    loader = (
        "AutoModelForCausalLM.from_pretrained(path)"
        if uniform
        else "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)"
    )
    # compat(transformers 5.16): the tokenizer is a stock one, but AutoTokenizer reads config.json first;
    # trust_remote_code=False skips the per_layer config's remote class instead of asking whether to run it.
    tokenizer_loader = (
        "AutoTokenizer.from_pretrained(path)"
        if uniform
        else "AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # the tokenizer needs no remote code"
    )
    datasets = ", ".join(report.get("datasets") or []) or "see the training config"
    return f"""---
library_name: transformers
tags: [axolotl, axolotl-atp, pruning, lora]
base_model: {report["base_model"]}
---

# Pruned with axolotl-atp

This model is `{report["base_model"]}` fine-tuned with LoRA{" (QLoRA)" if report.get("qlora") else ""} and
structurally pruned in the same run by ATP (All-in-One Tuning and Structural Pruning), then merged
and physically sliced by `axolotl atp-merge`.

| | value |
|---|---|
| training data | {datasets} |
| target prune ratio (prunable decoder-linear parameters) | {report["prune_ratio"]} |
| achieved prune ratio (prunable) | {report["achieved_prune_ratio"]:.4f} |
| parameters before / after | {report["params_before"]:,} / {report["params_after"]:,} |
| fraction of all parameters removed | {1 - report["params_after"] / report["params_before"]:.4f} |
| layout | {report["layout"]} |
| base weights merged into | {report["base_weights"]} |
| max abs logit difference vs. the trained masked model | {report["max_abs_logit_diff"]} |
{gguf_row(report)}
Kept widths per layer are in `atp_report.json` and `atp_widths.png`; the kept indices (original
indexing) in `atp_masks.json`. The tokenizer is the training run's, unchanged.

## Load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = {loader}
tokenizer = {tokenizer_loader}
```
"""


def write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "atp_report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "README.md").write_text(model_card(report))
