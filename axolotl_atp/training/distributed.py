"""Keeping ATP's state identical on every rank of a data-parallel run (DDP under accelerate/torchrun).

The LLM's LoRA weights are synchronized by DDP. The pruning-decision generator lives outside the
DDP-wrapped model, so ATP synchronizes it itself:

- the generator's initial parameters and the Gumbel noise state are broadcast from rank 0 (they are
  seeded identically anyway; the broadcast makes it a fact rather than an assumption);
- the generator's gradients are averaged over the ranks before its optimizer step, so every rank takes
  the same AdamW step;
- after every generator step and at the freeze, a checksum of the generator's parameters and of the
  hard masks is compared with rank 0's (two integers cross the network, not the tensors); a difference
  stops every rank with `RankDivergenceError` (it would mean that the ranks train different pruned models).

Every function here is a no-op when `torch.distributed` is not initialized or has one process, so the
single-process path (and the tests without a process group) is untouched. Every function is a
collective: all ranks must call it in the same order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from axolotl_atp.groups import kept_indices


class RankDivergenceError(RuntimeError):
    """The ranks of a data-parallel run no longer agree on ATP's generator or masks."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over the ranks (one all-reduce of a flat buffer).

    A parameter without a gradient counts as a zero gradient (the ranks run the same graph, so this is
    the same set of parameters everywhere).
    """
    if not is_distributed():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    device = params[0].device
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).to(device) for p in params]
    ).to(torch.float32)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone()
        offset += n


def average_scalar(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over the ranks (a NaN on any rank makes it NaN everywhere)."""
    if not is_distributed():
        return value
    total = value.detach().to(torch.float64).reshape(1).clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return (total / dist.get_world_size()).reshape(()).to(value.dtype)


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer of `module` with rank `src`'s."""
    if not is_distributed():
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=src)


def broadcast_rng_state(generator: torch.Generator, device: torch.device, src: int = 0) -> None:
    """Give every rank rank `src`'s state of a CPU `torch.Generator` (the Gumbel noise)."""
    if not is_distributed():
        return
    state = generator.get_state().to(device)
    dist.broadcast(state, src=src)
    generator.set_state(state.cpu())


@torch.no_grad()
def checksum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Two int64 sums over the exact bits of `tensors` (as float64, which holds any 16- or 32-bit float
    exactly): the plain sum and the sum weighted by position, both wrapping on overflow.

    Any change of a single value changes the plain sum; values moved between positions change the
    weighted one. Computed where the tensors live, one tensor at a time.
    """
    device = tensors[0].device
    total = torch.zeros(2, dtype=torch.int64, device=device)
    offset = 0
    for t in tensors:
        bits = t.detach().reshape(-1).to(device=device, dtype=torch.float64).view(torch.int64)
        positions = torch.arange(offset + 1, offset + bits.numel() + 1, dtype=torch.int64, device=device)
        total += torch.stack([bits.sum(), (bits * positions).sum()])
        offset += bits.numel()
    return total


def check_same(tensors: Sequence[torch.Tensor], what: str, when: str) -> None:
    """Raise `RankDivergenceError` on every rank if any rank's `tensors` differ from rank 0's.

    Rank 0's checksum (two integers) is broadcast and compared; the verdict is all-reduced, so all ranks
    raise together instead of leaving the others waiting in the next collective.
    """
    if not is_distributed() or not tensors:
        return
    mine = checksum(tensors)
    reference = mine.clone()
    dist.broadcast(reference, src=0)
    differ = (mine != reference).any().reshape(1).to(torch.float64)
    dist.all_reduce(differ, op=dist.ReduceOp.MAX)
    if differ.item() > 0:
        raise RankDivergenceError(
            f"axolotl-atp: {when} the {world_size()} ranks disagree on the {what} (their checksum differs from "
            "rank 0's), so they would train different pruned models. This is a bug or a non-deterministic "
            "kernel; please report it with your launch command. Fix: train on one GPU until it is fixed."
        )


def kept_digest(kept: dict[str, list[list[int]]]) -> str:
    """A short fingerprint of a decision's kept groups (structure -> per-layer kept indices)."""
    text = json.dumps(
        {s: [sorted(int(i) for i in layer) for layer in layers] for s, layers in kept.items()}, sort_keys=True
    )
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def masks_digest(masks: dict[str, torch.Tensor]) -> str:
    """`kept_digest` of hard masks (1 = kept), so the masks a rank trains with compare with a masks file."""
    return kept_digest(kept_indices(masks))
