"""Declarative descriptions of where each model family keeps its heads and MLP channels.

Adding a family means adding an `ArchitectureSpec` here (and a test), not editing the core: the
masks, the group lasso, the parameter count and the export all read these descriptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from axolotl_atp.errors import ATPUserError


@dataclass(frozen=True)
class ArchitectureSpec:
    """Module names (relative to a decoder layer) and bias rules of one model family.

    A fused projection (`qkv`, `gate_up`) replaces its separate parts when it is set.

    A multimodal wrapper names where its language model is: `layers_path` (module path of the
    decoder layers), `text_config` (the attribute of the top-level config that holds the decoder's
    geometry), `keep_whole` (module prefixes that are never pruned nor given LoRA: vision tower,
    projector) and `checkpoint_renames` (checkpoint key prefix -> module prefix, for checkpoints
    whose keys are not the module names, as transformers writes them for these models).
    """

    family: str
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    text_config: str | None = None
    keep_whole: tuple[str, ...] = ()
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    qkv: str | None = None
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    gate_up: str | None = None
    # A bias rule is a config attribute to read (missing = no bias) or a constant.
    qkv_bias: str | bool = "attention_bias"
    o_bias: str | bool = "attention_bias"
    mlp_bias: str | bool = "mlp_bias"

    @staticmethod
    def has_bias(rule: str | bool, config: Any) -> bool:
        return rule if isinstance(rule, bool) else bool(getattr(config, rule, False))

    def text_config_of(self, config: Any) -> Any:
        """The config that holds the decoder's geometry (the config itself for a text-only model)."""
        return getattr(config, self.text_config) if self.text_config else config

    def module_key(self, checkpoint_key: str) -> str:
        """The module-path name of a checkpoint tensor key (the key itself unless a rename applies)."""
        for old, new in self.checkpoint_renames:
            if checkpoint_key.startswith(old):
                return new + checkpoint_key[len(old) :]
        return checkpoint_key

    def attention_out_modules(self) -> tuple[str, ...]:
        return (self.qkv,) if self.qkv else (self.q, self.k, self.v)

    def mlp_out_modules(self) -> tuple[str, ...]:
        return (self.gate_up,) if self.gate_up else (self.gate, self.up)


SPECS: tuple[ArchitectureSpec, ...] = (
    ArchitectureSpec(family="llama", model_types=("llama",)),
    ArchitectureSpec(family="mistral", model_types=("mistral",), qkv_bias=False, o_bias=False, mlp_bias=False),
    # Qwen2 always has q/k/v biases and never an o_proj bias.
    ArchitectureSpec(family="qwen2", model_types=("qwen2",), qkv_bias=True, o_bias=False, mlp_bias=False),
    # Qwen3's per-head q/k RMSNorm acts on head_dim, shared by all heads: it stays whole.
    ArchitectureSpec(family="qwen3", model_types=("qwen3",), mlp_bias=False),
    # Phi-3: fused qkv_proj (q rows, then k, then v) and fused gate_up_proj (gate rows, then up).
    ArchitectureSpec(
        family="phi3",
        model_types=("phi3",),
        qkv="self_attn.qkv_proj",
        gate_up="mlp.gate_up_proj",
        qkv_bias=False,
        o_bias=False,
        mlp_bias=False,
    ),
    # Gemma 2 / 3: explicit head_dim, extra pre/post norms (hidden-sized, untouched), GeGLU MLP.
    ArchitectureSpec(family="gemma2", model_types=("gemma2",), mlp_bias=False),
    ArchitectureSpec(family="gemma3_text", model_types=("gemma3_text",), mlp_bias=False),
    # Multimodal Gemma 3 (4B and up): the Gemma 3 text decoder under `model.language_model`, its
    # geometry in `config.text_config`; the SigLIP vision tower and the projector are copied whole.
    # compat(transformers 5.16): checkpoints (the Hub's, and what transformers 5 writes) use the pre-5.0 key names.
    ArchitectureSpec(
        family="gemma3",
        model_types=("gemma3",),
        layers_path="model.language_model.layers",
        text_config="text_config",
        keep_whole=("model.vision_tower", "model.multi_modal_projector"),
        checkpoint_renames=(
            ("language_model.lm_head.", "lm_head."),
            ("language_model.model.", "model.language_model."),
            ("vision_tower.", "model.vision_tower."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
        ),
        mlp_bias=False,
    ),
)


class UnsupportedArchitectureError(ATPUserError, ValueError):
    """The model family has no `ArchitectureSpec`."""


def supported_model_types() -> list[str]:
    return sorted(t for spec in SPECS for t in spec.model_types)


def spec_for(model_type: str) -> ArchitectureSpec:
    """The spec of `config.model_type`, or a clear error listing the supported types."""
    for spec in SPECS:
        if model_type in spec.model_types:
            return spec
    raise UnsupportedArchitectureError(
        f"model_type = {model_type!r} is not supported by axolotl-atp. Supported model types: "
        f"{', '.join(supported_model_types())}. Fix: use a model of a supported family."
    )
