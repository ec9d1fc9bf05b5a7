"""Which llama.cpp architecture takes an HF export with per-layer widths, and the widths it reads.

llama.cpp builds every layer from per-layer `head_count`, `head_count_kv` and `feed_forward_length`
arrays in two architectures only: `deci` (Llama-style blocks, NORM rope, optional biases) and
`openelm` (fused QKV, per-head Q/K RMSNorm, NEOX rope, output always tied to the token embedding).
Everything here reads `config.json` alone, so a refusal comes before any weight is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from axolotl_atp.errors import ATPUserError

# model_type of the base family -> llama.cpp architecture
DECI_FAMILIES = ("llama", "mistral", "qwen2", "phi3")
OPENELM_FAMILIES = ("qwen3",)
# rope_type values the writer can express: none, linear scaling, Llama 3's frequency factors.
ROPE_TYPES = ("default", "linear", "llama3")
OUT_TYPES = ("f32", "f16", "bf16", "q8_0")  # GGUF tensor types the writer produces


class GGUFExportError(ATPUserError, ValueError):
    """An export llama.cpp cannot run per layer, or a GGUF that cannot be written; the message says why and the fix."""


UNIFORM_ALTERNATIVE = (
    "Fix: train (or re-freeze) with `atp: {layout: uniform}` and merge without --format gguf: a uniform export is a "
    "stock transformers model, which llama.cpp's own convert_hf_to_gguf.py converts."
)


@dataclass(frozen=True)
class GGUFLayout:
    """The llama.cpp architecture and geometry of one HF export folder."""

    arch: str  # "deci" or "openelm"
    family: str  # the base model_type (llama, mistral, qwen2, phi3, qwen3)
    num_layers: int
    hidden_size: int
    head_dim: int
    group_size: int  # query heads per KV head
    kv_heads: tuple[int, ...]  # per layer
    mlp_widths: tuple[int, ...]  # per layer, as in the HF export (0 = no MLP)
    vocab_size: int
    context_length: int
    rms_eps: float
    rope: dict[str, Any]  # rope_theta, rope_type and its parameters
    tied: bool

    @property
    def query_heads(self) -> tuple[int, ...]:
        return tuple(k * self.group_size for k in self.kv_heads)

    @property
    def permute_rotary(self) -> bool:
        """HF's rotate_half pairs dimension i with i + head_dim/2 (NEOX); `deci` uses NORM rope (adjacent pairs)."""
        return self.arch == "deci"


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise GGUFExportError(f"{path} does not exist. Fix: pass a folder written by `axolotl atp-merge`.")
    return json.loads(path.read_text())


def is_per_layer_export(config: dict[str, Any]) -> bool:
    """A per_layer export of `atp-merge`: its config and modeling classes are the code it carries (trust_remote_code)."""
    return str(config.get("model_type", "")).startswith("atp_") and "atp_layer_num_key_value_heads" in config


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5's `rope_parameters`, or the older `rope_theta` + `rope_scaling` keys."""
    if isinstance(config.get("rope_parameters"), dict):
        rope = dict(config["rope_parameters"])
    else:
        rope = dict(config.get("rope_scaling") or {})
        rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    return rope


def layout_of(config: dict[str, Any], has_lm_head: bool | None = None) -> GGUFLayout:
    """The llama.cpp layout of an export's config.json (a per-layer export, a uniform one, or a base model).

    `has_lm_head`: whether the weights hold `lm_head.weight` (None: unknown, the config decides).
    Raises GGUFExportError, naming the reason and the alternative, for what no llama.cpp architecture runs per layer.
    """
    family = str(config.get("model_type", "")).removeprefix("atp_")
    text = config
    tied = bool(config.get("tie_word_embeddings", False)) or has_lm_head is False
    if family in ("gemma2", "gemma3_text", "gemma3"):
        raise GGUFExportError(
            f"a {family} export cannot be written as GGUF with per-layer widths: no llama.cpp architecture builds "
            "Gemma's blocks (pre/post norms, GeGLU, soft-capping, (1+w) RMSNorm) from per-layer head and MLP counts. "
            + UNIFORM_ALTERNATIVE
        )
    if family in OPENELM_FAMILIES:
        if not tied:
            raise GGUFExportError(
                f"an untied {family} export (tie_word_embeddings: false) cannot be written as GGUF with per-layer "
                "widths: the only llama.cpp architecture with per-layer widths and Q/K RMSNorm (`openelm`) always "
                "ties the output to the token embedding. " + UNIFORM_ALTERNATIVE
            )
        if config.get("attention_bias"):
            raise GGUFExportError(
                f"{family} with attention_bias: true has no place for Q/K/V biases in llama.cpp's `openelm`. "
                + UNIFORM_ALTERNATIVE
            )
        arch = "openelm"
    elif family in DECI_FAMILIES:
        arch = "deci"
    else:
        raise GGUFExportError(
            f"model_type {config.get('model_type')!r} has no GGUF export. Supported: "
            f"{', '.join(DECI_FAMILIES + OPENELM_FAMILIES)} (Qwen3 with tied embeddings). " + UNIFORM_ALTERNATIVE
        )
    rope = rope_parameters(text)
    if rope["rope_type"] not in ROPE_TYPES:
        raise GGUFExportError(
            f"rope_type {rope['rope_type']!r} is not written by the GGUF export (it writes {', '.join(ROPE_TYPES)}). "
            "Fix: export without --format gguf."
        )
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise GGUFExportError(
            f"partial_rotary_factor {rope['partial_rotary_factor']} is not supported: llama.cpp's `{arch}` rotates "
            "the whole head. Fix: export without --format gguf."
        )
    num_heads = int(text["num_attention_heads"])
    num_kv = int(text.get("num_key_value_heads") or num_heads)
    head_dim = int(text.get("head_dim") or text["hidden_size"] // num_heads)
    num_layers = int(text["num_hidden_layers"])
    kv = [int(k) for k in text.get("atp_layer_num_key_value_heads") or [num_kv] * num_layers]
    mlp = [int(m) for m in text.get("atp_layer_intermediate_sizes") or [int(text["intermediate_size"])] * num_layers]
    if len(kv) != num_layers or len(mlp) != num_layers:
        raise GGUFExportError(
            f"config.json lists {len(kv)} head counts and {len(mlp)} MLP widths for {num_layers} layers. "
            "Fix: re-run `axolotl atp-merge`."
        )
    if kv[0] < 1:
        raise GGUFExportError(
            "layer 0 keeps no attention group, but llama.cpp reads the head size from layer 0's head count. "
            "Fix: train with `atp.min_heads_per_layer` >= 1 (the default)."
        )
    return GGUFLayout(
        arch=arch,
        family=family,
        num_layers=num_layers,
        hidden_size=int(text["hidden_size"]),
        head_dim=head_dim,
        group_size=num_heads // num_kv,
        kv_heads=tuple(kv),
        mlp_widths=tuple(mlp),
        vocab_size=int(text["vocab_size"]),
        context_length=int(text.get("max_position_embeddings") or 4096),
        rms_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope=rope,
        tied=tied,
    )


def sliding_window_note(config: dict[str, Any]) -> str | None:
    """A warning when the HF model limits attention to a window that the GGUF file (`deci`) does not carry."""
    window = config.get("sliding_window")
    family = str(config.get("model_type", "")).removeprefix("atp_")
    active = config.get("use_sliding_window", family in ("mistral", "phi3"))
    context = int(config.get("max_position_embeddings") or 0)
    if active and window and int(window) < context:
        return (
            f"the model attends within a sliding window of {window} tokens; llama.cpp's `deci` attends to the whole "
            f"context, so outputs agree only on inputs up to {window} tokens"
        )
    return None


def check_supported(folder_or_config: Path | dict[str, Any], tokenizer_dir: Path | None = None) -> GGUFLayout:
    """Refuse early (before any weights are read) what the GGUF export cannot write: the family from the
    config, and the tokenizer from `tokenizer_dir`/tokenizer.json where there is one."""
    from axolotl_atp.export.gguf_tokenizer import check_tokenizer_file

    config = folder_or_config if isinstance(folder_or_config, dict) else read_config(folder_or_config)
    layout = layout_of(config)
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file():
        check_tokenizer_file(Path(tokenizer_dir) / "tokenizer.json")
    return layout
