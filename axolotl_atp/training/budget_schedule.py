"""The budget schedule: the remaining ratio the generator is asked for at each step of the control phase.

A constant target (`1 - prune_ratio` from the first step) moves the generator at the pace of the budget
loss, whatever the target, and leaves the freeze to remove what the generator had not reached. A schedule
ramps the target from 1 (dense) to `1 - prune_ratio` over the first `ramp` fraction of the control phase,
then holds it, so that the generator follows a target it can reach and settles on the final budget before
the masks freeze:

    linear: target(t) = final + (1 - final) * (1 - p),   p = min(1, (t + 1) / ramp_steps)
    cubic:  target(t) = final + (1 - final) * (1 - p)^3  (Zhu & Gupta, arXiv 1710.01878; LoRAPrune)

`linear` is the default: on the toy importance test (tests/test_core.py, 48 live and 48 dead channels) the
cubic ramp, which removes most of the budget early, separated live from dead channels less well than the
linear ramp or a constant target, over two seeds.
"""

from __future__ import annotations

import math
from typing import Literal

BudgetScheduleName = Literal["cubic", "linear", "constant"]


def ramp_steps(control_steps: int, ramp: float) -> int:
    """Optimizer steps over which the target ramps: `ramp` of the control phase, at least 1."""
    return max(1, math.ceil(control_steps * ramp))


def target_remaining_ratio(step: int, prune_ratio: float, steps: int, schedule: BudgetScheduleName) -> float:
    """The remaining ratio asked for at optimizer step `step` (0-based), reached after `steps` steps."""
    final = 1.0 - prune_ratio
    if schedule == "constant":
        return final
    progress = min(1.0, max(0, step + 1) / max(1, steps))
    left = (1.0 - progress) ** 3 if schedule == "cubic" else 1.0 - progress
    return final + (1.0 - final) * left
