"""Offline test kit: tiny models of the supported families, a real tokenizer, local data, CLI runner."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from devkit.assets import OFFLINE_ENV

WORDS = [
    "the",
    "patient",
    "was",
    "admitted",
    "with",
    "chest",
    "pain",
    "and",
    "shortness",
    "of",
    "breath",
    "after",
    "surgery",
    "we",
    "report",
    "a",
    "case",
    "of",
    "acute",
    "renal",
    "failure",
    "treated",
    "with",
    "dialysis",
    "results",
    "showed",
    "significant",
    "improvement",
    "in",
    "survival",
    "the",
    "study",
    "enrolled",
    "adults",
    "with",
    "diabetes",
    "randomized",
    "to",
    "insulin",
    "or",
    "placebo",
    "outcomes",
    "included",
    "mortality",
    "blood",
    "pressure",
    "heart",
    "rate",
    "infection",
    "cancer",
    "therapy",
    "dose",
    "response",
    "trial",
    "cohort",
    "risk",
    "factor",
    "analysis",
]


def corpus(n: int, seed: int = 0, min_words: int = 20, max_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) + "." for _ in range(n)]


def build_tokenizer(path: Path) -> Any:
    """A real byte-level BPE tokenizer trained on the test corpus, saved with special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(300, seed=1), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(path)
    return fast


TINY = {
    "llama": dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "llama_mha": dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
    ),
    "mistral": dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "qwen2": dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "qwen3": dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
}


TINY["phi3"] = dict(TINY["llama"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
TINY["gemma2"] = dict(TINY["llama"], head_dim=16, sliding_window=16, query_pre_attn_scalar=16)
TINY["gemma3_text"] = dict(TINY["llama"], head_dim=16, sliding_window=16, query_pre_attn_scalar=16)


# Multimodal Gemma 3: the tiny Gemma 3 text decoder above, a one-layer SigLIP vision tower (32x32
# images, 8x8 patches) and the projector pooling its 16 patches into 4 image tokens.
TINY_GEMMA3_VISION = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
)
# Gemma 3's image tokens, appended to the tiny tokenizer (their ids lie inside the vocabulary).
GEMMA3_IMAGE_TOKENS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]


def save_gemma3_processor(path: Path) -> Any:
    """Add Gemma 3's image tokens to the tokenizer saved in `path` and save a Gemma 3 processor
    (as the real checkpoints ship one: axolotl loads it for multimodal models); return the tokenizer."""
    from transformers import Gemma3Processor, PreTrainedTokenizerFast
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    names = dict(zip(("boi_token", "eoi_token", "image_token"), GEMMA3_IMAGE_TOKENS, strict=True))
    tok = PreTrainedTokenizerFast.from_pretrained(path, extra_special_tokens=names)
    size = {"height": TINY_GEMMA3_VISION["image_size"], "width": TINY_GEMMA3_VISION["image_size"]}
    Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size=size), tokenizer=tok, image_seq_length=4
    ).save_pretrained(path)
    return tok


# LoRA on the language model's decoder layers only (a plain list of names would also hit the
# vision tower's q/k/v_proj): axolotl's own Gemma 3 examples use the same regex.
GEMMA3_LORA_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"


def base_family(family: str) -> str:
    """The family a test key builds: `FAMILY_tied` is FAMILY with lm_head tied to the input embeddings."""
    return family.removesuffix("_tied")


def tiny_config(family: str, vocab_size: int, **overrides: Any) -> Any:
    from transformers import AutoConfig

    if family.endswith("_tied"):  # as the real Gemma checkpoints: no lm_head tensor in the checkpoint
        return tiny_config(base_family(family), vocab_size, **{**overrides, "tie_word_embeddings": True})
    if family == "gemma3":
        from transformers import Gemma3Config

        # One sliding and one full-attention layer: the export must keep each layer's attention type.
        layer_types = ["sliding_attention", "full_attention"]
        tied = overrides.get("tie_word_embeddings", False)
        text = tiny_config("gemma3_text", vocab_size, layer_types=layer_types, **overrides).to_dict()
        boi, eoi, image = (vocab_size - len(GEMMA3_IMAGE_TOKENS) + i for i in range(len(GEMMA3_IMAGE_TOKENS)))
        return Gemma3Config(
            text_config=text,
            vision_config=dict(TINY_GEMMA3_VISION, model_type="siglip_vision_model"),
            mm_tokens_per_image=4,
            boi_token_index=boi,
            eoi_token_index=eoi,
            image_token_index=image,
            tie_word_embeddings=tied,
        )
    model_type = family.removesuffix("_mha")
    kwargs = dict(TINY[family], vocab_size=vocab_size, max_position_embeddings=256, tie_word_embeddings=False)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def build_tiny_model(path: Path, family: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """A random tiny model of `family` with a real tokenizer, saved as a plain HF folder."""
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer(path)
    if base_family(family) == "gemma3":
        tok = save_gemma3_processor(path)
    config = tiny_config(
        family,
        len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **overrides,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random init is tiny: make weights large enough that masks matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    return path


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def base_config(model_dir: Path, data: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "base_model": str(model_dir),
        "plugins": ["axolotl_atp.ATPPlugin"],
        "atp": {"prune_ratio": 0.3},
        "datasets": [{"path": str(data), "type": "completion"}],
        "dataset_prepared_path": str(out / "prepared"),
        "output_dir": str(out / "run"),
        "sequence_len": 64,
        "sample_packing": False,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 6,
        "num_epochs": 1,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "warmup_steps": 0,
        "val_set_size": 0,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "gradient_checkpointing": False,
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "save_strategy": "no",
        "logging_steps": 1,
        "dataloader_num_workers": 0,
        "seed": 7,
    }
    cfg.update(overrides)
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_cli(args: list[str], cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a CLI (e.g. `axolotl train cfg.yml`) from this venv in a subprocess, offline."""
    bindir = Path(sys.executable).parent
    env = {**os.environ, **OFFLINE_ENV, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("ACCELERATE_USE_CPU", None)
    exe = str(bindir / args[0]) if (bindir / args[0]).exists() else args[0]
    return subprocess.run([exe, *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
