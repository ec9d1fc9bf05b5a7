"""Masks on a (PEFT) model through hooks on its Linear modules: no forked modeling code.

Two ways of masking, chosen per step:

- `LORA_AWARE` (LoRA steps): the *base* output rows of pruned groups (q/k/v, gate/up) are zeroed and
  the LoRA path is not. The hook sits on the LoRA layer's `base_layer` (an `nn.Linear` or a
  bitsandbytes `Linear4bit`), so it acts on activations and never on quantized weights.
- `FULL` (generator steps with soft masks, evaluation with hard masks): the inputs of o_proj and
  down_proj, base and LoRA alike, are scaled by the mask. With a hard mask this is exactly the model
  with those heads and channels removed.

Masks are set once per optimizer step and stay constant within it, so gradient checkpointing
(which re-runs the layers in backward) and gradient accumulation see the same masks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from axolotl_atp.architectures import ArchitectureSpec
from axolotl_atp.groups import Masks, ModelGeometry, SliceRef, slice_refs
from axolotl_atp.peft_unwrap import base_layer_of, unwrap_base_model


class MaskMode(Enum):
    OFF = "off"
    LORA_AWARE = "lora_aware"
    FULL = "full"


class MaskedModel:
    """Installs the mask hooks on one model and holds the masks they read."""

    def __init__(self, model: nn.Module, spec: ArchitectureSpec, geo: ModelGeometry):
        self.spec = spec
        self.geo = geo
        self.refs = slice_refs(spec, geo)
        self.mode = MaskMode.OFF
        self.masks: Masks = {}
        # Per (structure, module) the mask expanded to rows/columns of every layer, rebuilt on `set_masks`.
        self._expanded: dict[tuple[str, str], torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []
        base = unwrap_base_model(model)
        self.layers = base.get_submodule(spec.layers_path)
        for layer_idx, layer in enumerate(self.layers):
            for structure, refs in self.refs.items():
                for ref in refs:
                    self._install(layer_idx, layer.get_submodule(ref.module), structure, ref)

    def _install(self, layer_idx: int, module: nn.Module, structure: str, ref: SliceRef) -> None:
        key = (structure, ref.module)
        if ref.side == "out":

            def out_hook(_mod: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
                if self.mode is not MaskMode.LORA_AWARE or key not in self._expanded:
                    return None
                return output * self._expanded[key][layer_idx].to(output.device, output.dtype)

            self._handles.append(base_layer_of(module).register_forward_hook(out_hook))
        else:

            def in_hook(_mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
                if self.mode is not MaskMode.FULL or key not in self._expanded:
                    return None
                x = inputs[0]
                return (x * self._expanded[key][layer_idx].to(x.device, x.dtype), *inputs[1:])

            self._handles.append(module.register_forward_pre_hook(in_hook))

    def set_masks(self, masks: Masks, mode: MaskMode) -> None:
        """Use `masks` ({structure: [layers, groups]}) in `mode` until the next call.

        Masks that require grad are expanded into *leaf* tensors: reentrant gradient checkpointing
        runs one backward per layer, and each would otherwise walk (and free) the generator's graph.
        The backward of `mask_gradient_terms()` then carries the leaves' gradients to `masks` in one step.
        """
        self.masks = masks
        self.mode = mode
        self._expanded = {}
        for structure, mask in masks.items():
            for ref in self.refs[structure]:
                expanded = self._expand(mask, ref)
                if expanded.requires_grad:
                    expanded = expanded.detach().requires_grad_(True)
                self._expanded[(structure, ref.module)] = expanded

    @staticmethod
    def _expand(mask: torch.Tensor, ref: SliceRef) -> torch.Tensor:
        return mask[:, ref.group_index.to(mask.device)]

    def mask_gradient_terms(self) -> list[torch.Tensor]:
        """Scalars whose backward sends the expanded leaves' gradients to the compact masks."""
        terms = []
        for structure, mask in self.masks.items():
            if not mask.requires_grad:
                continue
            for ref in self.refs[structure]:
                leaf = self._expanded[(structure, ref.module)]
                if leaf.grad is not None:
                    terms.append((self._expand(mask, ref) * leaf.grad).sum())
        return terms

    @contextmanager
    def masks_off(self) -> Iterator[None]:
        """Run the unpruned model inside the block (the distillation teacher); the masks and mode are kept."""
        mode, self.mode = self.mode, MaskMode.OFF
        try:
            yield
        finally:
            self.mode = mode

    def clear(self) -> None:
        self.set_masks({}, MaskMode.OFF)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()
