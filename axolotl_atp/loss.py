"""The paper-era `group_lasso: loss` mode: a group-lasso term added to the trainer's training loss."""

from __future__ import annotations

import functools
from typing import Any


def add_group_lasso_to_loss(trainer: Any, callback: Any) -> None:
    """Wrap `trainer.compute_loss` (composes with other plugins' trainer classes, unlike a subclass)."""
    compute_loss = trainer.compute_loss

    @functools.wraps(compute_loss)
    def with_group_lasso(model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None):
        result = compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        controller = callback.controller
        if controller is None or not model.training:
            return result
        penalty = controller.penalty()
        # The HF Trainer divides the returned loss by the accumulation steps only in this case; otherwise
        # the CE is already normalised over the whole accumulated batch, and the term must be too.
        if (
            getattr(trainer, "model_accepts_loss_kwargs", False)
            and num_items_in_batch is not None
            and getattr(trainer, "compute_loss_func", None) is None
        ):
            penalty = penalty / trainer.current_gradient_accumulation_steps
        controller.metrics["atp/group_lasso_penalty"] = float(penalty.detach())
        if return_outputs:
            loss, outputs = result
            return loss + penalty.to(loss.device), outputs
        return result + penalty.to(result.device)

    trainer.compute_loss = with_group_lasso
