"""Running a GGUF file in llama.cpp: the prebuilt llama.cpp of the npm package `node-llama-cpp`, driven by
`llama_cpp_runner.mjs` (shipped with this package) in a node subprocess.

Where it is looked for: `$AXOLOTL_ATP_LLAMA_CPP` (a folder holding `node_modules/node-llama-cpp`), else
`.llama-cpp/` at the repository root (what `scripts/setup.sh` installs), else `~/.cache/axolotl-atp/llama-cpp`.
Install: `npm install --prefix FOLDER --ignore-scripts --omit=optional node-llama-cpp @node-llama-cpp/linux-x64`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RUNNER = Path(__file__).with_name("llama_cpp_runner.mjs")
PACKAGE = Path("node_modules") / "node-llama-cpp"
INSTALL_HINT = (
    "Fix: `npm install --prefix .llama-cpp --ignore-scripts --omit=optional node-llama-cpp @node-llama-cpp/linux-x64` "
    "(Node 20+, glibc 2.34+; `make setup` does it), or set AXOLOTL_ATP_LLAMA_CPP to the folder holding node_modules/."
)


class LlamaCppUnavailableError(RuntimeError):
    """llama.cpp cannot be run here; the message says why and how to install it."""


class LlamaCppError(RuntimeError):
    """llama.cpp ran but failed (e.g. could not load the file)."""


@dataclass
class LlamaCppRun:
    """What one runner call returns."""

    logits: list[np.ndarray]  # per sequence: [positions, vocab] float32
    tokenized: list[list[int]]  # llama.cpp's own tokenization of the texts (no BOS)
    tokens_per_second: float | None
    release: str


def candidate_dirs() -> list[Path]:
    env = os.environ.get("AXOLOTL_ATP_LLAMA_CPP")
    if env:
        return [Path(env)]
    repo = Path(__file__).resolve().parents[2] / ".llama-cpp"
    return [repo, Path.home() / ".cache" / "axolotl-atp" / "llama-cpp"]


def find_llama_cpp() -> tuple[str, Path]:
    """(node executable, node-llama-cpp package folder), or LlamaCppUnavailableError saying what is missing."""
    node = shutil.which("node")
    if node is None:
        raise LlamaCppUnavailableError("no `node` on PATH (llama.cpp runs through node-llama-cpp). " + INSTALL_HINT)
    for folder in candidate_dirs():
        package = folder / PACKAGE
        if (package / "dist" / "index.js").is_file():
            prebuilt = folder / "node_modules" / "@node-llama-cpp" / "linux-x64"
            if not prebuilt.is_dir():
                raise LlamaCppUnavailableError(
                    f"{package} has no prebuilt llama.cpp beside it ({prebuilt}). " + INSTALL_HINT
                )
            return node, package
    raise LlamaCppUnavailableError(
        f"node-llama-cpp is not installed in {', '.join(map(str, candidate_dirs()))}. " + INSTALL_HINT
    )


def run_llama_cpp(
    model: Path,
    vocab_size: int,
    sequences: list[list[int]] | None = None,
    texts: list[str] | None = None,
    generate: tuple[list[int], int] | None = None,
    threads: int | None = None,
    kv_cache_f32: bool = True,
    timeout: float = 600,
) -> LlamaCppRun:
    """Evaluate token `sequences` (next-token logits at every position), tokenize `texts` with the file's own
    tokenizer, and optionally time greedy generation of `generate = (prompt ids, new tokens)`.

    `kv_cache_f32`: keep llama.cpp's KV cache in f32 (for the check) instead of its default f16 (for speed)."""
    node, package = find_llama_cpp()
    sequences = sequences or []
    with tempfile.TemporaryDirectory(prefix="atp-llama-cpp-") as tmp:
        request = Path(tmp) / "request.json"
        body = {
            "model": str(Path(model).resolve()),
            "vocab_size": vocab_size,
            "threads": threads if threads is not None else (os.cpu_count() or 1),
            "kv_cache_f32": kv_cache_f32,
            "sequences": sequences,
            "texts": texts or [],
            "generate": {"prompt": generate[0], "tokens": generate[1]} if generate else None,
        }
        request.write_text(json.dumps(body))
        done = subprocess.run(
            [node, str(RUNNER), str(package), str(request)], capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise LlamaCppError(f"llama.cpp could not run {model}: {(done.stderr or done.stdout).strip()[-2000:]}")
        result = json.loads((Path(tmp) / "result.json").read_text())
        logits = [
            np.fromfile(Path(tmp) / f"logits-{i}.f32", dtype="<f4").reshape(len(ids), vocab_size)
            for i, ids in enumerate(sequences)
        ]
    release = result.get("llama_cpp_release") or {}
    generation = result.get("generation") or {}
    return LlamaCppRun(
        logits=logits,
        tokenized=result["tokenized"],
        tokens_per_second=generation.get("tokens_per_second"),
        release=str(release.get("release", release)) if isinstance(release, dict) else str(release),
    )


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)
