"""Modeling of a model pruned by axolotl-atp with per-layer widths (carried with the checkpoint).

Each decoder layer is the base family's own layer class, built from a copy of the decoder's config
with that layer's head count and MLP width, so attention types, norms and RoPE stay the family's.
A multimodal model (e.g. Gemma 3) keeps its vision tower and projector as they are.
Loads with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`.
"""

import copy

import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .configuration_atp import BASE_MODEL_TYPE, ATPPrunedConfig

_BaseForCausalLM = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[BASE_MODEL_TYPE])


def text_config_of(config: ATPPrunedConfig):
    """The sub-config holding the decoder geometry (`atp_text_config`), or the config itself."""
    name = getattr(config, "atp_text_config", None)
    return getattr(config, name) if name else config


def layer_config(config: ATPPrunedConfig, layer_idx: int):
    """A copy of the decoder's config with the widths of one layer (the head size is unchanged)."""
    text = text_config_of(config)
    group_size = text.num_attention_heads // text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    layer = copy.copy(text)
    kv_heads = config.atp_layer_num_key_value_heads[layer_idx]
    layer.num_key_value_heads = kv_heads
    layer.num_attention_heads = kv_heads * group_size
    layer.head_dim = head_dim
    layer.intermediate_size = config.atp_layer_intermediate_sizes[layer_idx]
    return layer


class ATPPrunedForCausalLM(_BaseForCausalLM):
    config_class = ATPPrunedConfig

    def __init__(self, config: ATPPrunedConfig):
        super().__init__(config)
        layers = self.get_submodule(getattr(config, "atp_layers_path", None) or "model.layers")
        for i in range(len(layers)):
            layers[i] = type(layers[i])(layer_config(config, i), i)
        self.post_init()
