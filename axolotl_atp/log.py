"""The plugin's loggers, made like axolotl's own so their INFO lines show (on the main process only)."""

from __future__ import annotations

from typing import Any


def get_logger(module_name: str) -> Any:
    from axolotl.utils.logging import get_logger as axolotl_logger

    return axolotl_logger("axolotl.atp." + module_name.rsplit(".", 1)[-1])
