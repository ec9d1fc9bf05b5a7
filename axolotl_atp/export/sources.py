"""Streaming reads of a safetensors base checkpoint and a PEFT LoRA adapter, and sharded writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from axolotl_atp.errors import ATPUserError

PEFT_PREFIX = "base_model.model."
# Largest output shard: the merge holds one shard in memory before writing it.
DEFAULT_MAX_SHARD_BYTES = 512 * 2**20


class CheckpointError(ATPUserError, ValueError):
    """A base model or adapter folder that cannot be merged."""


class BaseCheckpoint:
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {key: folder / name for key, name in weight_map.items()}
        elif (folder / "model.safetensors").is_file():
            with safe_open(folder / "model.safetensors", "pt") as f:
                self.files = {key: folder / "model.safetensors" for key in f.keys()}  # noqa: SIM118
        else:
            raise CheckpointError(
                f"{folder} has no model.safetensors or model.safetensors.index.json. Fix: convert the base "
                "model to safetensors (e.g. `save_pretrained(..., safe_serialization=True)`)."
            )

    def get(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Load only `keys`, opening each shard once."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.files[key], []).append(key)
        out = {}
        for path, file_keys in by_file.items():
            with safe_open(path, "pt") as f:
                for key in file_keys:
                    out[key] = f.get_tensor(key)
        return out

    def numel(self) -> int:
        total = 0
        for path in set(self.files.values()):
            with safe_open(path, "pt") as f:
                for key in f.keys():  # noqa: SIM118
                    total += math.prod(f.get_slice(key).get_shape())
        return total


class LoraAdapter:
    """A PEFT LoRA adapter: per module (base-model name) its A, B and scale; full replacements too."""

    def __init__(self, folder: Path):
        config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
        if not config_path.is_file() or not weights_path.is_file():
            raise CheckpointError(
                f"{folder} has no LoRA adapter (adapter_config.json and adapter_model.safetensors). Fix: train "
                "with this config first, or set `lora_model_dir` to the folder that holds the adapter."
            )
        config = json.loads(config_path.read_text())
        if config.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{folder} holds a {config.get('peft_type')} adapter; only LoRA can be merged.")
        if config.get("use_dora"):
            raise CheckpointError(f"{folder} holds a DoRA adapter, which axolotl-atp does not merge yet.")
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        alpha, rslora = float(config["lora_alpha"]), bool(config.get("use_rslora"))
        alpha_pattern = config.get("alpha_pattern") or {}
        tensors = load_file(weights_path)
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.replacements: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            name = key.removeprefix(PEFT_PREFIX)
            if ".lora_A." in name:
                module = name.split(".lora_A.")[0]
                b = tensors[key.replace(".lora_A.", ".lora_B.")]
                rank = value.shape[0]
                module_alpha = next((float(v) for k, v in alpha_pattern.items() if module.endswith(k)), alpha)
                scale = module_alpha / (math.sqrt(rank) if rslora else rank)
                self.factors[module] = (value, b, scale)
            elif ".lora_B." not in name:
                # modules_to_save: a full replacement of a base tensor.
                self.replacements[name.replace(".modules_to_save.default", "")] = value

    def delta(self, module: str) -> torch.Tensor | None:
        """scale * B @ A for `module` (fp32), or None when the module carries no LoRA."""
        if module not in self.factors:
            return None
        a, b, scale = self.factors[module]
        delta = scale * (b.float() @ a.float())
        return delta.T if self.fan_in_fan_out else delta


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_shard_bytes`, plus the index."""

    def __init__(self, folder: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []
        self.numel = 0
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, tensor in tensors.items():
            self.pending[key] = tensor.contiguous()
            size = tensor.numel() * tensor.element_size()
            self.pending_bytes += size
            self.total_bytes += size
            self.numel += tensor.numel()
            if self.pending_bytes >= self.max_shard_bytes:
                self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"model-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.pending, self.folder / name, metadata={"format": "pt"})
        self.shards.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.shards) == 1:
            (self.folder / self.shards[0][0]).rename(self.folder / "model.safetensors")
            return
        total = len(self.shards)
        weight_map = {}
        for i, (name, keys) in enumerate(self.shards, start=1):
            final = f"model-{i:05d}-of-{total:05d}.safetensors"
            (self.folder / name).rename(self.folder / final)
            weight_map.update(dict.fromkeys(keys, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def nf4_roundtrip(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight as a QLoRA run saw it: NF4-quantized (block 64, double-quant, as axolotl's
    BitsAndBytesConfig) from `dtype`, then dequantized."""
    import bitsandbytes.functional as bnbf

    source = weight.to(dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    packed, state = bnbf.quantize_4bit(source.to(device), blocksize=64, compress_statistics=True, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state).to("cpu", weight.dtype)
