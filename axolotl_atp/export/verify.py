"""The export check: the written model's logits against the in-memory merged, masked model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from axolotl_atp.architectures import ArchitectureSpec
from axolotl_atp.decision import Decision
from axolotl_atp.errors import MergeError
from axolotl_atp.export.pruned import ExportStats
from axolotl_atp.export.sources import nf4_roundtrip
from axolotl_atp.groups import ModelGeometry
from axolotl_atp.log import get_logger
from axolotl_atp.masking import MaskedModel, MaskMode

if TYPE_CHECKING:
    from axolotl_atp.export.merge import MergePlan

LOG = get_logger(__name__)

# The check compares float32 logits; 16-bit exports also carry the rounding of the merged weights.
TOLERANCE_FP32 = 1e-3
# fp32 rounding (summation order differs once rows are removed) grows with the hidden states' magnitude:
# heavily pruned models can carry "massive activations" in the tens of thousands.
TOLERANCE_FP32_PER_ACTIVATION = 1e-5
TOLERANCE_16BIT_RELATIVE = 0.05


@dataclass(frozen=True)
class LogitCheck:
    """The export check's result: the largest logit difference and the tolerance it passed."""

    max_diff: float
    tolerance: float


def logit_tolerance(dtype: torch.dtype, scale: float, activations: float) -> float:
    """How far the export's logits may differ: fp32 rounding for fp32 exports (growing with the largest
    hidden state), and a fraction of the logit scale for 16-bit ones."""
    if dtype == torch.float32:
        return max(TOLERANCE_FP32, TOLERANCE_FP32_PER_ACTIVATION * activations)
    return TOLERANCE_16BIT_RELATIVE * max(scale, 1.0)


def verify_export(plan: MergePlan, folder: Path, stats: ExportStats) -> LogitCheck:
    """Load the export in `folder` and compare its logits with the merged, masked model's; raise if they differ."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # compat(transformers 5.16): the tokenizer needs no remote code, but transformers reads config.json first; with
    # trust_remote_code=False it skips the per_layer config's remote class instead of asking.
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    batches = tokenize_batches(tokenizer, sample_texts(plan.cfg.datasets))
    reference, _ = reference_model(plan.base_dir, plan.adapter_dir, plan.spec, plan.geo, plan.decision, plan.nf4_dtype)
    exported = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, trust_remote_code=plan.remote_code
    ).eval()
    if exported.num_parameters() != stats.params_after:
        raise MergeError(
            f"the exported model has {exported.num_parameters()} parameters but {stats.params_after} were "
            "written: the config does not describe the weights."
        )
    max_diff, scale, activations = compare_logits(reference, exported, batches)
    tolerance = logit_tolerance(stats.dtype, scale, activations)
    del reference, exported
    if max_diff > tolerance:
        raise MergeError(
            f"the exported model's logits differ from the merged, masked model's by {max_diff:.3g} (tolerance "
            f"{tolerance:.3g}). The export is not written. Please report this with the config and masks file."
        )
    LOG.info("axolotl-atp: export verified: max |logit difference| %.3g (tolerance %.3g)", max_diff, tolerance)
    return LogitCheck(max_diff, tolerance)


FALLBACK_TEXTS = [
    "The patient was admitted to the hospital with chest pain and shortness of breath. An electrocardiogram "
    "showed ST elevation in the anterior leads, and the patient was taken for urgent catheterization.",
    "Paris is the capital and most populous city of France. Since the 17th century it has been one of the "
    "major centres of finance, diplomacy, commerce, culture, fashion and gastronomy.",
]


def sample_texts(datasets: list[dict] | None, count: int = 4) -> list[str]:
    """Up to `count` rows of the run's first local JSON-lines dataset; fixed English text otherwise."""
    for ds in datasets or []:
        path = Path(str(ds.get("path", "")))
        if path.is_file() and path.suffix in (".jsonl", ".json"):
            field = ds.get("field") or "text"
            texts = []
            with path.open() as f:
                for line in f:
                    row = json.loads(line) if line.strip() else {}
                    if isinstance(row.get(field), str) and row[field].strip():
                        texts.append(row[field])
                    if len(texts) >= count:
                        break
            if texts:
                return texts
    return FALLBACK_TEXTS


def reference_model(
    base_dir: Path,
    adapter_dir: Path,
    spec: ArchitectureSpec,
    geo: ModelGeometry,
    decision: Decision,
    nf4_dtype: torch.dtype | None,
) -> tuple[Any, MaskedModel]:
    """Base (fp32) + merged LoRA, with the hard masks on o_proj/down_proj inputs: the trained model's function."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if nf4_dtype is not None:
        layers = model.get_submodule(spec.layers_path)
        with torch.no_grad():
            for module in layers.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(nf4_roundtrip(module.weight, nf4_dtype))
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().eval()
    masked = MaskedModel(model, spec, geo)
    masked.set_masks(decision.masks(), MaskMode.FULL)
    return model, masked


@torch.no_grad()
def compare_logits(reference: Any, exported: Any, batches: list[dict[str, torch.Tensor]]) -> tuple[float, float, float]:
    """(largest absolute logit difference over the real-token positions of `batches`; largest absolute
    reference logit of the first batch, the scale a 16-bit export's tolerance is relative to; largest
    absolute hidden state of the reference, which sets how far fp32 rounding can move the logits)."""
    worst, scale, activations = 0.0, 0.0, 0.0
    for i, batch in enumerate(batches):
        out = reference(**batch, output_hidden_states=True)
        a = out.logits.float()
        b = exported(**batch).logits.float()
        keep = batch["attention_mask"].bool()
        worst = max(worst, float((a - b).abs()[keep].max()))
        activations = max(activations, max(float(h[keep].abs().max()) for h in out.hidden_states))
        if i == 0:
            scale = float(a.abs().max())
    return worst, scale, activations


def tokenize_batches(tokenizer: Any, texts: list[str], batch_size: int = 2, max_length: int = 128) -> list[dict]:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches
