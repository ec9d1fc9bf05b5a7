"""Loggers under axolotl's `axolotl` logger, so the plugin's INFO lines show with axolotl's own."""

from __future__ import annotations

import logging


def get_logger(module_name: str) -> logging.Logger:
    return logging.getLogger("axolotl.atp." + module_name.rsplit(".", 1)[-1])
