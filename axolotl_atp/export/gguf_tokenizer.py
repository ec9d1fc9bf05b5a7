"""The tokenizer and chat template of an HF export as GGUF metadata, so llama.cpp needs no other file.

Byte-level BPE tokenizers (`tokenizer.json` with a ByteLevel pre-tokenizer: GPT-2, SmolLM, Llama 3,
Qwen2/3) are written as llama.cpp's `gpt2` tokenizer model. llama.cpp does not read the
pre-tokenizer from the file: it picks a built-in one by the name in `tokenizer.ggml.pre`, so the
HF pre-tokenizer is matched against the ones that name stands for, and anything else is refused.
The merge's verification also compares llama.cpp's own tokenization with the HF tokenizer's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from axolotl_atp.export.gguf_layout import GGUFExportError

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# gguf TokenType values
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class GGUFVocab:
    """What goes under `tokenizer.*` in the GGUF file."""

    model: str  # llama.cpp tokenizer model: "gpt2"
    pre: str  # llama.cpp pre-tokenizer name
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # bos / eos / unk / pad / ... -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def _byte_level(step: dict[str, Any]) -> bool:
    return step.get("type") == "ByteLevel" and not step.get("add_prefix_space", False)


def _split_regex(step: dict[str, Any]) -> str | None:
    if step.get("type") != "Split" or step.get("behavior") != "Isolated" or step.get("invert"):
        return None
    return (step.get("pattern") or {}).get("Regex")


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name of an HF pre-tokenizer (tokenizer.json's `pre_tokenizer`)."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre] if pre else []
    steps = list(steps or [])
    if len(steps) == 1 and _byte_level(steps[0]) and steps[0].get("use_regex", True):
        return "gpt-2"
    if len(steps) == 2 and _byte_level(steps[1]):
        first, regex_in_byte_level = steps[0], steps[1].get("use_regex", True)
        if first.get("type") == "Digits" and first.get("individual_digits") and regex_in_byte_level:
            return "smollm"
        regex = _split_regex(first)
        if regex == LLAMA3_REGEX and not regex_in_byte_level:
            return "llama-bpe"
        if regex == QWEN2_REGEX and not regex_in_byte_level:
            return "qwen2"
    raise GGUFExportError(
        f"the tokenizer's pre-tokenizer {json.dumps(pre)[:300]} is not one that llama.cpp has built in under a name "
        "the GGUF export knows (GPT-2, SmolLM, Llama 3, Qwen2 byte-level BPE); SentencePiece-style tokenizers "
        "(Llama 2, Mistral v0.1-v0.3, Phi-3) are not written yet. Fix: export without --format gguf."
    )


def check_tokenizer_file(path: Path) -> None:
    """Refuse, from tokenizer.json alone, a tokenizer the GGUF export cannot write (the merge's early check)."""
    data = json.loads(path.read_text())
    if (data.get("model") or {}).get("type") != "BPE":
        raise GGUFExportError(
            f"{path} holds a {(data.get('model') or {}).get('type')} tokenizer; the GGUF export writes byte-level BPE "
            "tokenizers only. Fix: export without --format gguf."
        )
    pre_tokenizer_name(data.get("pre_tokenizer"))


def read_vocab(folder: Path, vocab_size: int, trust_remote_code: bool = False) -> GGUFVocab:
    """The tokenizer saved in an HF export folder, padded to the embedding's `vocab_size` rows.

    `trust_remote_code`: the folder is a per-layer export, whose config class is the modeling code it carries."""
    from transformers import AutoTokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(
            f"{path} does not exist: the GGUF export needs a fast (tokenizer.json) byte-level BPE tokenizer. "
            "Fix: export without --format gguf."
        )
    check_tokenizer_file(path)
    data = json.loads(path.read_text())
    model = data["model"]
    pre = pre_tokenizer_name(data.get("pre_tokenizer"))
    added = {t["id"]: t for t in data.get("added_tokens") or []}
    by_id = {i: tok for tok, i in model["vocab"].items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    if max(by_id) >= vocab_size:
        raise GGUFExportError(
            f"the tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}. Fix: export the "
            "tokenizer the model was trained with."
        )
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    special_ids = {
        name: int(getattr(tok, f"{name}_token_id"))
        for name in ("bos", "eos", "unk", "pad")
        if getattr(tok, f"{name}_token_id", None) is not None
    }
    probe = tok("a")["input_ids"]
    add_bos = "bos" in special_ids and bool(probe) and probe[0] == special_ids["bos"]
    add_eos = "eos" in special_ids and bool(probe) and probe[-1] == special_ids["eos"]
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    return GGUFVocab("gpt2", pre, tokens, types, merges, special_ids, add_bos, add_eos, template)


def write_vocab(writer: Any, vocab: GGUFVocab) -> None:
    """Add the tokenizer keys to a `gguf.GGUFWriter`."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for name, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
