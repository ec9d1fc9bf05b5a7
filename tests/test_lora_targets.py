"""LoRA targets of a multimodal model stay inside its language model (`lora_targets.py`)."""

from __future__ import annotations

import pytest

from axolotl_atp.architectures import spec_for
from tests.kit import GEMMA3_LORA_TARGETS, tiny_config


def test_lora_on_the_vision_tower_is_refused():
    from axolotl_atp.lora_targets import check_lora_targets, decoder_lora_regex

    config = tiny_config("gemma3", 64)
    spec = spec_for("gemma3")
    with pytest.raises(ValueError, match=r"lora_target_modules = \['q_proj', 'o_proj'\] puts LoRA on .*vision_tower"):
        check_lora_targets({"lora_target_modules": ["q_proj", "o_proj"]}, config, spec)
    with pytest.raises(ValueError, match=r"lora_target_linear = true .*Fix: set `lora_target_linear: false`"):
        check_lora_targets({"lora_target_linear": True}, config, spec)
    check_lora_targets({"lora_target_modules": GEMMA3_LORA_TARGETS}, config, spec)
    check_lora_targets({"lora_target_modules": decoder_lora_regex(spec)}, config, spec)  # the suggested fix
    check_lora_targets({"lora_target_modules": ["o_proj", "down_proj"]}, config, spec)  # not in SigLIP
    check_lora_targets({"lora_target_linear": True}, tiny_config("gemma3_text", 64), spec_for("gemma3_text"))
