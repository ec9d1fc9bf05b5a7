"""An HF export folder (merged weights, config with per-layer widths, tokenizer) -> one GGUF file for llama.cpp.

Independent of the merge: it reads only what `axolotl atp-merge` wrote (or any stock Llama-family
folder). Llama, Mistral, Qwen2 and Phi-3 become llama.cpp's `deci`, tied Qwen3 becomes `openelm`
(see `gguf_layout`). What llama.cpp needs beyond a renaming:

- `deci` uses NORM rope (rotates adjacent dimension pairs), HF the NEOX pairing (i, i + head_dim/2):
  the rows of every Q and K head (and their biases) are reordered to match.
- Phi-3's fused `qkv_proj` / `gate_up_proj` are split; `openelm`'s fused `attn_qkv` is concatenated.
- `deci` skips a whole block (attention output included) when its `n_ff` is 0: such a layer gets
  one zero MLP channel, which adds nothing.
- Llama 3 rope scaling goes in as the `rope_freqs` tensor (per-frequency divisors).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from axolotl_atp.export.gguf_layout import (
    OUT_TYPES,
    GGUFExportError,
    GGUFLayout,
    is_per_layer_export,
    layout_of,
    read_config,
)
from axolotl_atp.export.gguf_tokenizer import read_vocab, write_vocab

Q8_0_BLOCK = 32


@dataclass
class GGUFSummary:
    """What `write_gguf` wrote."""

    path: Path
    arch: str
    out_type: str
    bytes_written: int
    tensors: int
    padded_mlp_layers: list[int] = field(default_factory=list)
    f16_fallback_tensors: list[str] = field(default_factory=list)  # q8_0: rows not a multiple of 32


class Weights:
    """The tensors of an HF folder (one or more safetensors shards), read one at a time."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise GGUFExportError(
                f"{folder} holds no *.safetensors. Fix: pass a folder written by `axolotl atp-merge`."
            )
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {key: h for h in self._handles for key in h.keys()}  # noqa: SIM118

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise GGUFExportError(f"the export has no tensor {key!r}. Fix: re-run `axolotl atp-merge`.")
        return self._where[key].get_tensor(key).float()


def rotary_permute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from HF's rotate_half pairing (i, i + d/2) to NORM rope's (2i, 2i + 1)."""
    if heads == 0:
        return rows
    shape = rows.shape
    half = shape[0] // heads // 2
    return rows.reshape(heads, 2, half, *shape[1:]).transpose(1, 2).reshape(shape)


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3's rope scaling (what transformers applies to inv_freq, inverted)."""
    theta = float(rope["rope_theta"])
    factor = float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def layer_tensors(weights: Weights, layout: GGUFLayout, layer: int, permute: bool) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors under llama.cpp's names (`blk.N.` prefix added by the caller)."""
    p = f"model.layers.{layer}."
    heads, kv, d = layout.query_heads[layer], layout.kv_heads[layer], layout.head_dim
    attn = p + "self_attn."
    if layout.family == "phi3":
        qkv = weights.get(attn + "qkv_proj.weight")
        q, k, v = qkv.split([heads * d, kv * d, kv * d])
        gate, up = weights.get(p + "mlp.gate_up_proj.weight").chunk(2)
        biases: dict[str, torch.Tensor] = {}
    else:
        q, k, v = (weights.get(f"{attn}{m}_proj.weight") for m in "qkv")
        gate, up = weights.get(p + "mlp.gate_proj.weight"), weights.get(p + "mlp.up_proj.weight")
        biases = {m: weights.get(f"{attn}{m}_proj.bias") for m in "qkv" if f"{attn}{m}_proj.bias" in weights}
    down = weights.get(p + "mlp.down_proj.weight")
    if q.shape[0] != heads * d or k.shape[0] != kv * d:
        raise GGUFExportError(
            f"layer {layer}: q_proj has {q.shape[0]} rows and k_proj {k.shape[0]}, but config.json says {heads} "
            f"query and {kv} KV heads of size {d}. Fix: re-run `axolotl atp-merge`."
        )
    if permute:
        q, k = rotary_permute(q, heads), rotary_permute(k, kv)
        if "q" in biases:
            biases["q"] = rotary_permute(biases["q"], heads)
        if "k" in biases:
            biases["k"] = rotary_permute(biases["k"], kv)
    out = {
        "attn_norm.weight": weights.get(p + "input_layernorm.weight"),
        "attn_output.weight": weights.get(attn + "o_proj.weight"),
        "ffn_norm.weight": weights.get(p + "post_attention_layernorm.weight"),
        "ffn_gate.weight": gate,
        "ffn_up.weight": up,
        "ffn_down.weight": down,
    }
    if layout.arch == "openelm":
        out["attn_qkv.weight"] = torch.cat([q, k, v])
        out["attn_q_norm.weight"] = weights.get(attn + "q_norm.weight")
        out["attn_k_norm.weight"] = weights.get(attn + "k_norm.weight")
    else:
        out.update({"attn_q.weight": q, "attn_k.weight": k, "attn_v.weight": v})
        out.update({f"attn_{m}.bias": b for m, b in biases.items()})
    for hf, name in (("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up")):
        if f"{p}{hf}.bias" in weights:
            out[f"{name}.bias"] = weights.get(f"{p}{hf}.bias")
    if f"{p}mlp.down_proj.bias" in weights:
        out["ffn_down.bias"] = weights.get(f"{p}mlp.down_proj.bias")
    return out


def pad_empty_mlp(tensors: dict[str, torch.Tensor]) -> bool:
    """Give an MLP with no channels one zero channel (llama.cpp's `deci` drops the whole block at n_ff = 0)."""
    if tensors["ffn_down.weight"].shape[1] > 0:
        return False
    hidden = tensors["ffn_down.weight"].shape[0]
    tensors["ffn_gate.weight"] = torch.zeros(1, hidden)
    tensors["ffn_up.weight"] = torch.zeros(1, hidden)
    tensors["ffn_down.weight"] = torch.zeros(hidden, 1)
    for name in ("ffn_gate.bias", "ffn_up.bias"):
        if name in tensors:
            tensors[name] = torch.zeros(1)
    return True


def encode(tensor: torch.Tensor, out_type: str) -> tuple[np.ndarray, Any, bool]:
    """(data, raw gguf type or None, fell back to f16) for one tensor; 1-D tensors (norms, biases) stay f32."""
    import gguf

    data = tensor.detach().to(torch.float32).contiguous().numpy()
    if data.ndim == 1 or out_type == "f32":
        return data, None, False
    if out_type == "f16":
        return data.astype(np.float16), None, False
    if out_type == "bf16":
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16, False
    if data.shape[-1] % Q8_0_BLOCK:
        return data.astype(np.float16), None, True
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0, False


# llama.cpp sets tokenizer attributes by `general.name` (e.g. names with "phi3" need Phi-3's special tokens):
# a name of our own keeps such rules off a vocabulary they were not written for.
NEUTRAL_NAME = "axolotl-atp pruned model"
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama_ftype


def write_metadata(writer: Any, layout: GGUFLayout, ff: list[int], out_type: str, name: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(layout.context_length)
    writer.add_embedding_length(layout.hidden_size)
    writer.add_block_count(layout.num_layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(list(layout.query_heads))
    writer.add_head_count_kv(list(layout.kv_heads))
    writer.add_key_length(layout.head_dim)
    writer.add_value_length(layout.head_dim)
    writer.add_rope_dimension_count(layout.head_dim)
    writer.add_rope_freq_base(float(layout.rope["rope_theta"]))
    if layout.rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(layout.rope["factor"]))
    writer.add_layer_norm_rms_eps(layout.rms_eps)
    writer.add_vocab_size(layout.vocab_size)
    writer.add_file_type(FILE_TYPES[out_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(
    folder: Path,
    out_file: Path,
    out_type: str = "f16",
    *,
    name: str | None = None,
    permute_rotary: bool | None = None,
    arch_override: str | None = None,
) -> GGUFSummary:
    """Write `folder` (an HF export) as one GGUF file at `out_file`.

    `permute_rotary` and `arch_override` exist for the tests' negative controls (a file without the
    Q/K permutation, a file labelled `llama`); leave them unset.
    """
    import gguf

    if out_type not in OUT_TYPES:
        raise GGUFExportError(f"--gguf-type {out_type!r} is not one of {', '.join(OUT_TYPES)}.")
    folder, out_file = Path(folder), Path(out_file)
    weights = Weights(folder)
    config = read_config(folder)
    layout = layout_of(config, has_lm_head="lm_head.weight" in weights)
    vocab = read_vocab(folder, layout.vocab_size, trust_remote_code=is_per_layer_export(config))
    permute = layout.permute_rotary if permute_rotary is None else permute_rotary
    if layout.arch == "openelm" and 0 in layout.kv_heads:
        raise GGUFExportError("a layer keeps no attention group; llama.cpp's `openelm` needs one in every layer.")

    tmp = out_file.parent / f".{out_file.name}.tmp-{os.getpid()}"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), arch_override or layout.arch, use_temp_file=True)
    summary = GGUFSummary(
        path=out_file, arch=arch_override or layout.arch, out_type=out_type, bytes_written=0, tensors=0
    )
    try:
        ff = list(layout.mlp_widths)
        if layout.arch == "deci":
            summary.padded_mlp_layers = [i for i, width in enumerate(ff) if width == 0]
            ff = [max(1, width) for width in ff]
        for i, kv in enumerate(layout.kv_heads):
            if kv == 0 and f"model.layers.{i}.self_attn.o_proj.bias" in weights:
                raise GGUFExportError(f"layer {i} keeps no attention group but has an o_proj bias, which `deci` drops.")
        write_metadata(writer, layout, ff, out_type, name or NEUTRAL_NAME)
        write_vocab(writer, vocab)

        def add(gguf_name: str, tensor: torch.Tensor | np.ndarray) -> None:
            if isinstance(tensor, np.ndarray):
                writer.add_tensor(gguf_name, tensor)
            else:
                data, raw, fell_back = encode(tensor, out_type)
                if fell_back:
                    summary.f16_fallback_tensors.append(gguf_name)
                writer.add_tensor(gguf_name, data, raw_dtype=raw)
            summary.tensors += 1

        add("token_embd.weight", weights.get("model.embed_tokens.weight"))
        add("output_norm.weight", weights.get("model.norm.weight"))
        if not layout.tied:
            add("output.weight", weights.get("lm_head.weight"))
        if layout.rope["rope_type"] == "llama3":
            add("rope_freqs.weight", llama3_rope_factors(layout.rope, layout.head_dim))
        for i in range(layout.num_layers):
            tensors = layer_tensors(weights, layout, i, permute)
            if layout.arch == "deci":
                pad_empty_mlp(tensors)
            for key, tensor in tensors.items():
                add(f"blk.{i}.{key}", tensor)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out_file)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    summary.bytes_written = out_file.stat().st_size
    return summary
