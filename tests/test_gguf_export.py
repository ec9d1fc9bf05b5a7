"""GGUF export: per-layer exports of every supported family run in llama.cpp and match the HF export's
next-token probabilities at every position; negative controls; refusals; the merge's GGUF step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from axolotl_atp.export.gguf_layout import GGUFExportError, layout_of
from axolotl_atp.export.gguf_verify import verify_gguf
from axolotl_atp.export.gguf_writer import rotary_permute, write_gguf
from axolotl_atp.export.verify import FALLBACK_TEXTS
from tests.gguf_kit import CHAT_TEMPLATE, require_llama_cpp, tiny_export
from tests.kit import build_tiny_model, corpus

TEXTS = [*corpus(2, seed=11), "Paris is the capital of France; it has 2,165,423 inhabitants!"]
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 10000.0,
}

# family, KV groups kept per layer (of 4), MLP channels kept per layer (of 96), config overrides.
# Every case has different head, KV-head and MLP counts in every layer and a layer with a single group.
CASES = {
    # o_proj and MLP biases, Llama 3 rope scaling (the rope_freqs tensor)
    "llama": ([1, 3, 2], [17, 96, 50], dict(attention_bias=True, mlp_bias=True, rope_parameters=LLAMA3_ROPE)),
    # a layer with no MLP channel left: written with one zero channel
    "mistral": ([2, 1, 4], [0, 40, 96], {}),
    "qwen2": ([3, 1, 2], [60, 5, 96], {}),  # Q/K/V biases (permuted with their rows)
    "phi3": ([1, 4, 2], [33, 96, 8], {}),  # fused qkv_proj / gate_up_proj
    "qwen3_tied": ([2, 1, 3], [96, 12, 50], {}),  # openelm: fused QKV, Q/K norms, NEOX rope
}
# The quantized files' case: head_dim 32, so that every Q/K/V projection has a multiple of 32 rows. With head_dim 16
# and 1 or 3 KV heads (16 or 48 rows), llama.cpp's AMX kernels (the CPU variant it loads on Sapphire Rapids and
# later) compute q8_0 products wrongly (mean total variation 0.32-0.71 where its other CPU variants give 0.04-0.06
# on the same files); real models have head_dim 64 or more.
QUANTIZED_CASE = ([3, 1, 2], [60, 5, 96], {"head_dim": 32})


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            kv, mlp, overrides = CASES[family]
            cache[family] = tiny_export(tmp_path_factory.mktemp(f"gguf-{family}"), family, kv, mlp, **overrides)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def quantized_export(tmp_path_factory) -> Path:
    kv, mlp, overrides = QUANTIZED_CASE
    return tiny_export(tmp_path_factory.mktemp("gguf-qwen2-quantized"), "qwen2", kv, mlp, **overrides)


@pytest.mark.parametrize("family", list(CASES))
def test_per_layer_export_matches_in_llama_cpp(exports, tmp_path, family):
    require_llama_cpp()
    export = exports(family)
    summary = write_gguf(export, tmp_path / "model.gguf", "f32")
    assert summary.arch == ("openelm" if family == "qwen3_tied" else "deci")
    if family == "mistral":
        assert summary.padded_mlp_layers == [0]
    check = verify_gguf(export, summary.path, TEXTS, "f32", trust_remote_code=True)
    assert check.status == "passed", check
    assert check.max_abs_prob_diff <= 1e-3
    assert check.tokenizer_matches
    assert check.positions > 40

    import gguf

    fields = gguf.GGUFReader(summary.path).fields
    arch = summary.arch
    assert list(fields[f"{arch}.attention.head_count_kv"].contents()) == CASES[family][0]
    assert fields[f"{arch}.attention.key_length"].contents() == 16
    assert fields["tokenizer.chat_template"].contents() == CHAT_TEMPLATE


def test_negative_controls_are_caught(exports, tmp_path):
    """Without the Q/K permutation the probabilities differ; labelled `llama`, llama.cpp refuses the file."""
    require_llama_cpp()
    from axolotl_atp.export.llama_cpp import LlamaCppError

    export = exports("llama")
    unpermuted = write_gguf(export, tmp_path / "unpermuted.gguf", "f32", permute_rotary=False)
    check = verify_gguf(export, unpermuted.path, TEXTS, "f32", trust_remote_code=True)
    assert check.status == "failed" and check.max_abs_prob_diff > 1e-2, check

    as_llama = write_gguf(export, tmp_path / "llama.gguf", "f32", arch_override="llama")
    try:
        check = verify_gguf(export, as_llama.path, TEXTS, "f32", trust_remote_code=True)
    except LlamaCppError as err:  # the expected outcome: per-layer shapes do not fit llama's layer-0 sizes
        assert "could not run" in str(err)
    else:
        assert check.status == "failed", check


@pytest.mark.parametrize("out_type", ["f16", "bf16", "q8_0"])
def test_16_bit_and_q8_0_files_run_within_their_tolerance(quantized_export, tmp_path, out_type):
    require_llama_cpp()
    export = quantized_export
    summary = write_gguf(export, tmp_path / f"model-{out_type}.gguf", out_type)
    check = verify_gguf(export, summary.path, TEXTS, out_type, trust_remote_code=True)
    assert check.status == "passed", check
    assert 0 < check.mean_total_variation <= 0.1
    if out_type == "q8_0":  # the loosest check still catches a missing Q/K permutation
        unpermuted = write_gguf(export, tmp_path / "unpermuted.gguf", out_type, permute_rotary=False)
        assert verify_gguf(export, unpermuted.path, TEXTS, out_type, trust_remote_code=True).status == "failed"


def test_rotary_permutation_pairs_halves():
    import torch

    rows = torch.arange(8.0)  # one head of size 8: pairs (0,4) (1,5) (2,6) (3,7) become adjacent
    assert rotary_permute(rows, 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    two = torch.arange(16.0).reshape(16, 1)
    assert rotary_permute(two, 2)[8:, 0].tolist() == [8, 12, 9, 13, 10, 14, 11, 15]


@pytest.mark.parametrize(
    ("family", "overrides", "message"),
    [
        ("gemma2", {}, "no llama.cpp architecture builds Gemma"),
        ("gemma3_text", {}, "no llama.cpp architecture builds Gemma"),
        ("qwen3", {"tie_word_embeddings": False}, "always ties the output"),
    ],
)
def test_unsupported_families_are_refused_with_the_alternative(tmp_path, family, overrides, message):
    from click.testing import CliRunner

    from axolotl_atp.cli import main
    from tests.kit import tiny_config

    config = tiny_config(family, 320, **overrides).to_dict()
    with pytest.raises(GGUFExportError) as err:
        layout_of(config)
    assert message in str(err.value) and "layout: uniform" in str(err.value)
    assert "convert_hf_to_gguf.py" in str(err.value)
    # The CLI refuses before writing anything.
    model = build_tiny_model(tmp_path / "model", family, **overrides)
    result = CliRunner().invoke(main, ["gguf", str(model)])
    assert result.exit_code != 0 and message in result.output
    assert not (model / "model.gguf").exists()


def test_check_is_reported_skipped_without_llama_cpp(exports, tmp_path, monkeypatch):
    from axolotl_atp.export.gguf_export import gguf_step

    monkeypatch.setenv("AXOLOTL_ATP_LLAMA_CPP", str(tmp_path / "nowhere"))
    entry = gguf_step(exports("phi3"), "f32", TEXTS, True, verify=True, out_file=tmp_path / "m.gguf")
    assert entry["verification"]["status"] == "skipped"
    assert "not installed" in entry["verification"]["reason"]
    assert entry["max_abs_prob_diff"] is None
    assert (tmp_path / "m.gguf").is_file()


@pytest.mark.e2e
def test_atp_merge_format_gguf_after_training(tmp_path):
    """`axolotl atp-merge --format gguf` after a real `axolotl train`: the report gains the llama.cpp check."""
    require_llama_cpp()
    from tests.test_merge_e2e import make_run, merge

    cfg_path, _, cfg = make_run(tmp_path, "llama", "lora", "per_layer")
    result = merge(cfg_path, "--format", "gguf", "--gguf-type", "f32")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    export = Path(cfg["output_dir"]) / "atp-merged"
    report = json.loads((export / "atp_report.json").read_text())
    gguf_entry = report["gguf"]
    assert gguf_entry["file"] == "model.gguf" and (export / "model.gguf").is_file()
    assert gguf_entry["verification"]["status"] == "passed"
    assert gguf_entry["max_abs_prob_diff"] <= 1e-3
    assert "GGUF verified in llama.cpp" in result.stdout + result.stderr


@pytest.mark.real
@pytest.mark.e2e
def test_real_smollm2_per_layer_export_runs_in_llama_cpp(tmp_path, smollm2):
    """The real SmolLM2-135M, sliced per layer (a layer keeping a single KV group), converts and matches."""
    require_llama_cpp()
    from tests.gguf_kit import per_layer_export

    layers = 30
    kv = [1 + (i % 3) for i in range(layers)]  # of 3 KV groups
    mlp = [256 + 40 * (i % 20) for i in range(layers)]  # of 1536 channels
    export = per_layer_export(smollm2, tmp_path / "export", kv, mlp, seed=3)
    summary = write_gguf(export, tmp_path / "model.gguf", "f32")
    check = verify_gguf(export, summary.path, FALLBACK_TEXTS, "f32", trust_remote_code=True)
    assert check.status == "passed", check
    assert check.max_abs_prob_diff <= 1e-3 and check.tokenizer_matches


def test_pre_tokenizer_names_and_sentencepiece_refusal():
    from axolotl_atp.export.gguf_tokenizer import LLAMA3_REGEX, QWEN2_REGEX, pre_tokenizer_name

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer_name(byte_level) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [digits, byte_level]}) == "smollm"
    for regex, name in ((LLAMA3_REGEX, "llama-bpe"), (QWEN2_REGEX, "qwen2")):
        split = {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
        steps = [split, {**byte_level, "use_regex": False}]
        assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": steps}) == name
    with pytest.raises(GGUFExportError, match="SentencePiece-style"):
        pre_tokenizer_name({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first"})
