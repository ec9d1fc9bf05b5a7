"""bitsandbytes 4-bit layers on a CPU: keep their weights in the layout the plugin reads.

bitsandbytes 0.50 repacks a `Linear4bit` weight in place into a CPU-only layout at its first forward in eval mode
without grad, on a CPU with AVX512-BF16 (here: the importance prior's calibration forwards). The repacked weight
is no longer what `dequantize_4bit` reads (the importance prior reads the base weights that way), and the repack
fails outright on a layer whose input width is not a multiple of its quantization block (64): "shape '[64, 1]'
is invalid for input of size 96". The plugin turns the repack off on the model it trains; CUDA is unaffected.
"""

from __future__ import annotations

from torch import nn


def keep_4bit_layout_on_cpu(model: nn.Module) -> int:
    """Turn off bitsandbytes' CPU repacking on every 4-bit layer of `model`; return how many layers have it."""
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)
