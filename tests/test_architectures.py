"""Family descriptions (`architectures.py`): unknown families, the multimodal Gemma 3 spec."""

from __future__ import annotations

import pytest

from axolotl_atp.architectures import UnsupportedArchitectureError, spec_for
from tests.tiny_models import geometry, tiny


def test_unknown_architecture_is_refused():
    with pytest.raises(UnsupportedArchitectureError, match=r"'gpt2' is not supported.*gemma3, gemma3_text.*llama"):
        spec_for("gpt2")


def test_gemma3_multimodal_spec_reads_the_text_config_and_checkpoint_names(tmp_path):
    """The geometry comes from `text_config`; every key transformers writes for the model maps to a module name."""
    from safetensors import safe_open

    model = tiny("gemma3")
    spec, geo = geometry(model)
    assert spec.text_config_of(model.config) is model.config.text_config
    assert (geo.num_layers, geo.num_heads, geo.num_kv_heads, geo.head_dim, geo.intermediate_size) == (2, 4, 2, 16, 96)
    assert len(model.get_submodule(spec.layers_path)) == geo.num_layers
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        saved = list(f.keys())
    assert any(k.startswith("language_model.model.layers.") for k in saved)  # the pre-5.0 names
    assert {spec.module_key(k) for k in saved} == set(model.state_dict())
