"""Held-out perplexity of a causal LM on plain texts (non-overlapping blocks, no BOS added)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm


def read_texts(path: Path, field: str = "text", limit: int | None = None) -> list[str]:
    texts = []
    with path.open() as f:
        for line in f:
            if line.strip():
                texts.append(json.loads(line)[field])
                if limit is not None and len(texts) >= limit:
                    break
    return texts


def token_stream(tokenizer: Any, texts: list[str], max_tokens: int) -> torch.Tensor:
    """Texts joined with EOS, tokenized, cut to `max_tokens`."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens])


@torch.no_grad()
def perplexity(model: Any, ids: torch.Tensor, block: int = 512, batch_size: int = 4, desc: str = "ppl") -> float:
    """exp(mean next-token NLL) over non-overlapping `block`-token windows of `ids`."""
    model.eval()
    device = next(model.parameters()).device
    n_blocks = ids.numel() // block
    windows = ids[: n_blocks * block].view(n_blocks, block)
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, n_blocks, batch_size), desc=desc, leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / max(1, total_tokens))
