"""axolotl-atp: All-in-One Tuning and Structural Pruning (ATP) as an axolotl plugin."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["ATPPlugin", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `axolotl_atp.cli` (imported for `axolotl --help`) does not import axolotl itself.
    if name == "ATPPlugin":
        from axolotl_atp.plugin import ATPPlugin

        return ATPPlugin
    raise AttributeError(f"module 'axolotl_atp' has no attribute {name!r}")
