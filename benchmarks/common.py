"""Shared pieces of the benchmarks: real assets, configs, running the real CLIs, recording results."""

from __future__ import annotations

import ast
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from devkit.assets import OFFLINE_ENV as OFFLINE

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def assets() -> tuple[Path, Path]:
    from devkit.assets import ensure_pubmed, ensure_smollm2

    return ensure_smollm2(), ensure_pubmed()


def held_out_evals(tokenizer: Any, pubmed: Path, tokens: int) -> dict[str, Any]:
    """The token streams the quality benchmarks evaluate on: `tokens` held-out PubMed tokens (the domain) and as many
    Wikipedia tokens (general English, on which nothing is trained or calibrated)."""
    from devkit.assets import ensure_wikipedia
    from devkit.evaluation import read_texts, token_stream

    return {
        "PubMed": token_stream(tokenizer, read_texts(pubmed / "heldout.jsonl"), tokens),
        "Wikipedia": token_stream(tokenizer, read_texts(ensure_wikipedia() / "articles.jsonl"), tokens),
    }


def pubmed_subset(pubmed: Path, out: Path, rows: int) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join((pubmed / "train.jsonl").read_text().splitlines(keepends=True)[:rows]))
    return out


def wikipedia_passages(tokenizer: Any, out: Path, rows: int, eval_tokens: int, chars: int = 1000) -> Path:
    """`rows` training passages of general English: consecutive paragraphs of Wikipedia articles joined up to about
    `chars` characters, from the articles after those the `eval_tokens`-token held-out Wikipedia stream
    (`held_out_evals`) reads, so that nothing evaluated is trained on."""
    from devkit.assets import ensure_wikipedia
    from devkit.evaluation import read_texts

    articles = read_texts(ensure_wikipedia() / "articles.jsonl")
    read, first_free = 0, len(articles)
    for i, text in enumerate(articles):  # as token_stream counts: the article's tokens and one EOS
        read += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
        if read >= eval_tokens:
            first_free = i + 1
            break
    passages: list[str] = []
    for text in articles[first_free:]:
        current = ""
        for paragraph in (p.strip() for p in text.split("\n")):
            if paragraph:
                current = f"{current}\n{paragraph}" if current else paragraph
            if len(current) >= chars:
                passages.append(current)
                current = ""
        if len(passages) >= rows:
            break
    if len(passages) < rows:
        raise ValueError(f"the Wikipedia asset has {len(passages)} passages after the evaluated articles, not {rows}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"text": t}) + "\n" for t in passages[:rows]))
    return out


def smollm2_config(model: Path, data: Path, out: Path, *, atp: dict | None, **overrides: Any) -> dict:
    cfg: dict[str, Any] = {
        "base_model": str(model),
        "datasets": [{"path": str(data), "type": "completion"}],
        "dataset_prepared_path": str(out / "prepared"),
        "output_dir": str(out / "run"),
        "sequence_len": 256,
        "sample_packing": False,
        "adapter": "lora",
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_steps": 40,
        "num_epochs": 1,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "cosine",
        "warmup_steps": 2,
        "val_set_size": 0,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "gradient_checkpointing": False,
        "save_strategy": "no",
        "logging_steps": 1,
        "dataloader_num_workers": 0,
        "seed": 42,
        "lora_mlp_kernel": False,
        "lora_qkv_kernel": False,
        "lora_o_kernel": False,
        "lora_embedding_kernel": False,
    }
    if atp is not None:
        cfg["plugins"] = ["axolotl_atp.ATPPlugin"]
        cfg["atp"] = atp
    cfg.update(overrides)
    return cfg


def run_cli(args: list[str], log: Path) -> tuple[str, float, float]:
    """Run a CLI from this venv; keep its output in `log`; fail loudly.

    Returns (output, seconds, peak resident memory in MB of the process and its children, sampled every 0.1 s).
    """
    import psutil

    exe = Path(sys.executable).parent / args[0]
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [str(exe), *args[1:]],
            env={**os.environ, **OFFLINE, "PATH": f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '')}"},
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        parent = psutil.Process(proc.pid)
        peak = 0.0
        while proc.poll() is None:
            try:
                rss = parent.memory_info().rss + sum(c.memory_info().rss for c in parent.children(recursive=True))
                peak = max(peak, rss / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.1)
    seconds = time.time() - started
    output = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed; see {log}\n{output[-3000:]}")
    return output, seconds, peak


def train(cfg: dict, name: str) -> tuple[str, dict]:
    """`axolotl train` on `cfg`; returns the log and the final metrics plus `peak_rss_mb`."""
    path = Path(cfg["output_dir"]).parent / f"{name}.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    log, _, peak = run_cli(["axolotl", "train", str(path), "--launcher", "python"], path.with_suffix(".log"))
    return log, {**final_metrics(log), "peak_rss_mb": peak}


def logged_rows(log: str) -> list[dict]:
    rows = []
    for match in re.finditer(r"\{'(?:loss|train_runtime)': [^{}]*\}", log):
        row = ast.literal_eval(match.group(0))
        rows.append({k: float(v) for k, v in row.items() if isinstance(v, str | int | float)})
    return rows


def final_metrics(log: str) -> dict:
    rows = [r for r in logged_rows(log) if "train_runtime" in r]
    return rows[-1] if rows else {}


def machine() -> str:
    import torch

    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}{gpu}"


def record(section: str, body: str, command: str) -> None:
    """Replace (or add) `## section` in RESULTS.md with `body`, stamped with date, machine and command."""
    stamp = f"_Measured {datetime.date.today().isoformat()} on {machine()}._  \n_Reproduce: `{command}`_\n\n"
    text = (
        RESULTS.read_text()
        if RESULTS.exists()
        else "# Benchmark results\n\nFigures measured on this project's machines.\n"
    )
    block = f"## {section}\n\n{stamp}{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(block + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    RESULTS.write_text(text)


def dump(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
