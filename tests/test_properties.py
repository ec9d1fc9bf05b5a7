"""Property tests: any `atp:` block and any masks file is either accepted and works, or refused with a
message of our own, never a traceback from deep inside pydantic, torch or json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from axolotl_atp.architectures import spec_for
from axolotl_atp.args import ATPConfig
from axolotl_atp.decision import BudgetError, Decision, freeze_decision, stock_config_accepts_heads
from axolotl_atp.groups import HEADS, MLP, ModelGeometry, ParameterCounter, slice_refs
from axolotl_atp.masks_file import MasksFileError, decision_to_json, read_masks
from tests.kit import tiny_config

SPEC = spec_for("llama")
GEO = ModelGeometry.from_config(tiny_config("llama", 64), SPEC)
COUNTER = ParameterCounter(GEO, slice_refs(SPEC, GEO))

anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 300),
    st.floats(allow_nan=True),
    st.text(max_size=6),
    st.lists(st.sampled_from(["attention_heads", "mlp_channels", "layers"]), max_size=3),
)
atp_blocks = st.dictionaries(
    st.sampled_from(
        [
            "prune_ratio",
            "structures",
            "layout",
            "control_steps",
            "temperature",
            "mlp_round_to",
            "heads_round_to",
            "min_heads_per_layer",
            "min_mlp_channels_per_layer",
            "calibration_size",
            "group_lasso",
            "typo_key",
        ]
    ),
    st.one_of(anything, st.sampled_from(["per_layer", "uniform", "prox", "loss", "off"]), st.floats(0.01, 0.95)),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(block=atp_blocks, seed=st.integers(0, 2**16))
def test_any_atp_block_is_accepted_and_freezes_or_refused_with_a_message(block, seed):
    try:
        cfg = ATPConfig(**block)
    except ValidationError as err:
        assert "atp" in str(err) or any(key in str(err) for key in block), str(err)
        return
    g = torch.Generator().manual_seed(seed)
    scores = {s: torch.randn(GEO.num_layers, GEO.num_groups(s), generator=g) for s in cfg.structures}
    try:
        decision = freeze_decision(
            scores,
            GEO,
            COUNTER,
            cfg.prune_ratio,
            cfg.layout,
            {HEADS: cfg.heads_round_to, MLP: cfg.mlp_round_to},
            {HEADS: cfg.min_heads_per_layer, MLP: cfg.min_mlp_channels_per_layer},
            stock_config_accepts_heads(GEO) if cfg.layout == "uniform" else None,
        )
    except BudgetError as err:
        assert "cannot be met" in str(err) and "Fix:" in str(err)
        return
    achieved = 1 - COUNTER.remaining_from_kept(decision.kept) / COUNTER.prunable_total
    assert achieved >= cfg.prune_ratio - 1e-9
    for s, layers in decision.kept.items():
        n = GEO.num_groups(s)
        assert all(len(set(k)) == len(k) and k and max(k) < n for k in layers)


def valid_masks() -> dict:
    kept = {HEADS: [[0], [0, 1]], MLP: [list(range(0, 96, 2)), list(range(50))]}
    return decision_to_json(
        Decision(kept=kept, geo=GEO),
        model_type="llama",
        prune_ratio=0.3,
        layout="per_layer",
        structures=[HEADS, MLP],
        counter=COUNTER,
    )


paths = st.sampled_from(
    [
        ("layers",),
        ("layers", 0),
        ("layers", 1),
        ("layers", 0, "mlp"),
        ("layers", 1, "kv_heads"),
        ("layers", 0, "heads"),
        ("geometry",),
        ("geometry", "num_heads"),
        ("model_type",),
        ("format",),
    ]
)
values = st.one_of(
    anything, st.lists(st.integers(-3, 120), max_size=8), st.dictionaries(st.text(max_size=3), anything, max_size=2)
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(paths, values), min_size=1, max_size=3), truncate=st.booleans())
def test_any_edited_masks_file_is_read_or_refused_with_a_message(tmp_path: Path, edits, truncate):
    data = valid_masks()
    for path, value in edits:
        target = data
        try:
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    text = json.dumps(data)
    file = tmp_path / "atp_masks.json"
    file.write_text(text[: len(text) // 2] if truncate else text)
    try:
        decision, _ = read_masks(file, GEO, "llama")
    except MasksFileError as err:
        assert str(file) in str(err) and "Fix:" in str(err)
        return
    for s, layers in decision.kept.items():
        assert all(
            layer and len(set(layer)) == len(layer) and min(layer) >= 0 and max(layer) < GEO.num_groups(s)
            for layer in layers
        )


def test_a_valid_masks_file_round_trips(tmp_path):
    file = tmp_path / "atp_masks.json"
    file.write_text(json.dumps(valid_masks()))
    decision, data = read_masks(file, GEO, "llama")
    assert decision.kept[MLP][1] == list(range(50)) and data["layout"] == "per_layer"


pytestmark = pytest.mark.filterwarnings("ignore")
