"""What the merge writes beside the weights: the report, a plot of kept widths, and a model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
    loader = (
        "AutoModelForCausalLM.from_pretrained(path)"
        if report["layout"] == "uniform"
        else "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)"
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
tokenizer = AutoTokenizer.from_pretrained(path)
```
"""


def write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "atp_report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "README.md").write_text(model_card(report))
