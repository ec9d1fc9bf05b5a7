"""The rules of `args.py` one by one, without axolotl's config loading (tests/test_config.py runs them through it)."""

from __future__ import annotations

import re

import pytest

from axolotl_atp.args import AXOLOTL_CONFIG_RULES, check_axolotl_config

VALID = {"atp": {"prune_ratio": 0.3}, "adapter": "lora", "max_steps": 10}


@pytest.mark.parametrize("key", ["context_parallel_size", "tensor_parallel_size"])
def test_model_parallel_sizes_above_one_are_refused(key):
    for allowed in (None, 1):
        check_axolotl_config({**VALID, key: allowed})
    with pytest.raises(ValueError, match=rf"{key} = 2 is not supported with ATP. Fix: remove `{key}`"):
        check_axolotl_config({**VALID, key: 2})


def test_every_rule_is_a_small_named_function():
    assert all(rule.__name__.startswith(("require_", "refuse_")) for rule in AXOLOTL_CONFIG_RULES)
    check_axolotl_config(VALID)
    check_axolotl_config({**VALID, "adapter": "qlora", "merge_lora": True})  # the merge loads QLoRA unquantized


def test_default_importance_structures_do_not_refuse_a_heads_only_run():
    from axolotl_atp.args import ATPConfig

    # Only an explicit importance_structures entry that is not pruned is refused (tests/test_config.py).
    assert ATPConfig(prune_ratio=0.3, structures=["attention_heads"]).importance_structures == ["mlp_channels"]


def test_default_lora_steps_use_plain_hard_masks_and_the_lora_aware_forward_brings_its_group_lasso():
    from axolotl_atp.args import ATPConfig

    default = ATPConfig()
    assert (default.lora_aware, default.group_lasso) == (False, "off")
    assert ATPConfig(lora_aware=True).group_lasso == "prox"
    assert ATPConfig(lora_aware=True, group_lasso="loss").group_lasso == "loss"
    assert ATPConfig(group_lasso="prox").group_lasso == "prox"  # an explicit choice is kept


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"generator_init": "random"}, "generator_init = 'random'"),
        ({"structures": ["attention_heads"]}, "structures = ['attention_heads']"),
        ({"importance_structures": ["attention_heads"]}, "importance_structures = ['attention_heads']"),
    ],
)
def test_freeze_channels_importance_needs_the_importance_prior_on_mlp_channels(extra, named):
    from pydantic import ValidationError

    from axolotl_atp.args import ATPConfig

    assert ATPConfig(freeze_channels="importance").freeze_channels == "importance"
    with pytest.raises(
        ValidationError, match=rf"freeze_channels = 'importance'.*atp\.{re.escape(named)}.*Fix: set generator_init"
    ):
        ATPConfig(freeze_channels="importance", **extra)
