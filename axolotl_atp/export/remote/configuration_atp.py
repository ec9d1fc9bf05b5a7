"""Config of a model pruned by axolotl-atp with per-layer widths (carried with the checkpoint).

Loads with `AutoConfig.from_pretrained(DIR, trust_remote_code=True)`; needs only transformers.
"""

from transformers.models.auto.configuration_auto import CONFIG_MAPPING

BASE_MODEL_TYPE = "llama"  # rewritten at export time

_BaseConfig = CONFIG_MAPPING[BASE_MODEL_TYPE]


class ATPPrunedConfig(_BaseConfig):
    """The base family's config plus the kept widths of every layer.

    `atp_layer_num_key_value_heads[i]`: KV heads kept in layer i (each with its query heads);
    `atp_layer_intermediate_sizes[i]`: MLP channels kept in layer i. The global head and width
    fields keep the unpruned values, which the rotary embedding and validation rely on.
    """

    model_type = "atp_" + BASE_MODEL_TYPE
