"""What the merge writes beside the weights (`export/report.py`): the model card's load instructions."""

from __future__ import annotations

import pytest

from axolotl_atp.export.report import model_card

REPORT = {
    "base_model": "tiny",
    "datasets": ["data.jsonl"],
    "prune_ratio": 0.3,
    "achieved_prune_ratio": 0.31,
    "params_before": 1000,
    "params_after": 800,
    "base_weights": "original",
    "max_abs_logit_diff": 1e-5,
}


@pytest.mark.parametrize(
    ("layout", "model_line", "tokenizer_line"),
    [
        ("uniform", "AutoModelForCausalLM.from_pretrained(path)\n", "AutoTokenizer.from_pretrained(path)\n"),
        (
            "per_layer",
            "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)\n",
            "AutoTokenizer.from_pretrained(path, trust_remote_code=False)",
        ),
    ],
)
def test_model_card_loads_the_model_and_a_tokenizer_without_remote_code(layout, model_line, tokenizer_line):
    card = model_card({**REPORT, "layout": layout})
    assert f"model = {model_line}" in card
    assert f"tokenizer = {tokenizer_line}" in card
