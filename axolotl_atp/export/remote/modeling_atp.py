"""Modeling of a model pruned by axolotl-atp with per-layer widths (carried with the checkpoint).

Each decoder layer is the base family's own layer class, built from a copy of the config with
that layer's head count and MLP width, so attention types, norms and RoPE stay the family's.
Loads with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`.
"""

import copy

import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .configuration_atp import BASE_MODEL_TYPE, ATPPrunedConfig

_BaseForCausalLM = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[BASE_MODEL_TYPE])


def layer_config(config: ATPPrunedConfig, layer_idx: int) -> ATPPrunedConfig:
    """A copy of `config` with the widths of one layer (the head size is unchanged)."""
    group_size = config.num_attention_heads // config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layer = copy.copy(config)
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
        layers = self.model.layers
        for i in range(len(layers)):
            layers[i] = type(layers[i])(layer_config(config, i), i)
        self.post_init()
