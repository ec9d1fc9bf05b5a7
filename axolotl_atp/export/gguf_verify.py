"""The GGUF check: next-token probabilities of the GGUF file in llama.cpp against the HF export's, at every position.

Both sides get the same token ids (the HF tokenizer's; llama.cpp adds no BOS), so the check compares
the models. Separately, llama.cpp's own tokenizer must give the HF tokenizer's ids for each text,
which checks the tokenizer metadata written into the file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from axolotl_atp.export.llama_cpp import LlamaCppUnavailableError, run_llama_cpp, softmax

# f32 must match to rounding: the largest |probability difference| at any position is at most 1e-3.
# f16, bf16 and Q8_0 carry the rounding (or quantization) of every weight, which moves single probabilities
# by up to ~0.1 on sharp tiny random models: they are held to the mean total variation distance
# (0.5 * sum |p - q|, averaged over positions) instead. Rounding keeps it at a few 1e-2 on those models;
# a structural error (e.g. a missing Q/K permutation) puts it near 0.7.
MAX_PROB_DIFF_F32 = 1e-3
MEAN_TOTAL_VARIATION = 0.1


@dataclass
class GGUFCheck:
    """The outcome of the check, as it goes into atp_report.json under `gguf.verification`."""

    status: str  # "passed", "failed" or "skipped"
    reason: str = ""
    max_abs_prob_diff: float | None = None
    tolerance: float | None = None  # on max_abs_prob_diff (f32) or on mean_total_variation (other types)
    mean_total_variation: float | None = None
    positions: int = 0
    tokenizer_matches: bool | None = None
    tokenizer_mismatches: list[dict[str, Any]] = field(default_factory=list)
    llama_cpp_release: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def hf_token_ids(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    return [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]


@torch.no_grad()
def hf_probabilities(hf_folder: Path, sequences: list[list[int]], trust_remote_code: bool) -> list[np.ndarray]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.eval()
    out = []
    for ids in sequences:
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        out.append(torch.softmax(logits, dim=-1).numpy())
    return out


def verify_gguf(
    hf_folder: Path,
    gguf_file: Path,
    texts: list[str],
    out_type: str,
    trust_remote_code: bool,
    max_length: int = 128,
) -> GGUFCheck:
    """Compare `gguf_file` in llama.cpp with `hf_folder` in transformers; `skipped` where llama.cpp cannot run."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_folder, trust_remote_code=trust_remote_code)
    sequences = hf_token_ids(tokenizer, texts, max_length)
    plain = [t[:400] for t in texts]  # llama.cpp's own tokenizer on plain text (no special tokens added)
    try:
        run = run_llama_cpp(gguf_file, tokenizer_vocab_size(hf_folder), sequences=sequences, texts=plain)
    except LlamaCppUnavailableError as err:
        return GGUFCheck(status="skipped", reason=f"llama.cpp is not available: {err}")
    reference = hf_probabilities(hf_folder, sequences, trust_remote_code)
    worst, distances = 0.0, []
    for ref, logits in zip(reference, run.logits, strict=True):
        if not np.isfinite(logits).all():
            worst, distances = float("inf"), [float("inf")]
            break
        diff = np.abs(softmax(logits) - ref)
        worst = max(worst, float(diff.max()))
        distances.extend((0.5 * diff.sum(axis=-1)).tolist())
    mean_tv = float(np.mean(distances)) if distances else 0.0
    mismatches = []
    for text, ids in zip(plain, run.tokenized, strict=True):
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids != expected:
            mismatches.append({"text": text[:80], "hf": expected[:16], "llama_cpp": ids[:16]})
    if out_type == "f32":
        tolerance, measured, what = MAX_PROB_DIFF_F32, worst, "largest probability difference"
    else:
        tolerance, measured, what = MEAN_TOTAL_VARIATION, mean_tv, "mean total variation distance"
    passed = measured <= tolerance and not mismatches
    problems = [] if measured <= tolerance else [f"{what} {measured:.3g} (tolerance {tolerance:g}, {out_type})"]
    if mismatches:
        problems.append(
            f"llama.cpp tokenizes {len(mismatches)} of {len(plain)} texts differently from the HF tokenizer"
        )
    return GGUFCheck(
        status="passed" if passed else "failed",
        reason="; ".join(problems),
        max_abs_prob_diff=worst,
        tolerance=tolerance,
        mean_total_variation=mean_tv,
        positions=sum(len(s) for s in sequences),
        tokenizer_matches=not mismatches,
        tokenizer_mismatches=mismatches,
        llama_cpp_release=run.release,
    )


def tokenizer_vocab_size(hf_folder: Path) -> int:
    """The model's vocab_size (rows of the embedding), which the logits have."""
    from axolotl_atp.export.gguf_layout import read_config

    return int(read_config(hf_folder)["vocab_size"])
