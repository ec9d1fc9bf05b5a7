"""The calibration split: rows held out of the training split for the generator's steps.

Batches are a pure function of the generator-step index (a seeded permutation per pass), so a
resumed run draws exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

MODEL_COLUMNS = ("input_ids", "attention_mask", "labels", "position_ids")


class CalibrationSplitError(ValueError):
    """The training split is too small to hold out calibration rows."""


def calibration_count(num_rows: int, calibration_size: float) -> int:
    """Rows to hold out: a fraction (< 1) of the rows, or a count; at least 1, leaving at least 1."""
    count = int(calibration_size) if calibration_size >= 1 else max(1, round(num_rows * calibration_size))
    if num_rows < 2 or count >= num_rows:
        raise CalibrationSplitError(
            f"the training split has {num_rows} rows, too few to hold out atp.calibration_size = "
            f"{calibration_size} ({count} rows) for calibration and still train. Fix: add data or lower "
            "atp.calibration_size."
        )
    return count


def split_calibration(dataset: Any, calibration_size: float, seed: int) -> tuple[Any, Any]:
    """(train, calibration) from a datasets.Dataset, by a seeded random choice of rows."""
    n = len(dataset)
    count = calibration_count(n, calibration_size)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    calibration_rows = sorted(order[:count])
    train_rows = sorted(order[count:])
    return dataset.select(train_rows), dataset.select(calibration_rows)


class CalibrationSampler:
    """Deterministic calibration batches: batch k of a seeded permutation of the rows."""

    def __init__(self, dataset: Any, collate: Callable[[list[dict]], dict], batch_size: int, seed: int):
        columns = [c for c in dataset.column_names if c in MODEL_COLUMNS]
        self.dataset = dataset.select_columns(columns) if hasattr(dataset, "select_columns") else dataset
        self.collate = collate
        self.batch_size = min(batch_size, len(dataset))
        self.seed = seed

    def batch(self, index: int) -> dict:
        n = len(self.dataset)
        per_pass = max(1, n // self.batch_size)
        epoch, position = divmod(index, per_pass)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        rows = order[position * self.batch_size : (position + 1) * self.batch_size].tolist()
        return self.collate([self.dataset[i] for i in rows])
