"""Saved benchmark rows: one small JSON file per row, keyed by the config that decides its result.

A row is `{"key": ..., "config": ..., "row": {...figures...}}`. The config is the row's training config with the
`atp:` block resolved (defaults included) and without paths, plus the protocol that measured it; the key is its
digest. A saved row is current when its key is the one asked for, or when the only difference is `atp:` keys that
did not exist when it was measured and that the new run leaves at their default: a new option whose default
keeps the old behaviour does not send every saved row back to training. (A changed default changes the value of
a key the saved config has, so the row is rerun.)

Rows saved before the config was stored carry only the key; `is_current` adds the config to them when the key
matches, so that the next new option does not invalidate them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from benchmarks.common import dump

PROTOCOL_KEYS = ("steps", "micro_batch_size", "eval_tokens", "train_rows")


def row_config(cfg: dict, protocol: dict) -> dict[str, Any]:
    """What decides a row's result: its training config with the `atp:` block resolved, the protocol, and the
    evaluation; not the paths. JSON-normalised (tuples are lists), as it is saved."""
    from axolotl_atp.args import ATPConfig

    semantic = {k: v for k, v in cfg.items() if k not in ("output_dir", "dataset_prepared_path", "base_model")}
    semantic["datasets"] = [{**d, "path": Path(d["path"]).name} for d in cfg["datasets"]]
    if "atp" in cfg:
        atp = ATPConfig(**cfg["atp"]).model_dump()
        if atp.get("decision_file"):
            atp["decision_file"] = digest(Path(atp["decision_file"]).read_text())
        if atp["kd_teacher"] not in ("base", "self"):  # an adapter folder: what decides the result is its weights
            atp["kd_teacher"] = adapter_digest(Path(atp["kd_teacher"]))
        semantic["atp"] = atp
    measured = {k: protocol[k] for k in PROTOCOL_KEYS}
    return json.loads(json.dumps({"cfg": semantic, "protocol": measured}, sort_keys=True))


def row_key(config: dict) -> str:
    return digest(json.dumps(config, sort_keys=True))


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def adapter_digest(folder: Path) -> str:
    """A LoRA adapter folder's identity: the digest of its config and weights files."""
    files = sorted(p for p in folder.iterdir() if p.name.startswith("adapter_") and p.is_file())
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:16]


def save_row(path: Path, config: dict, row: dict) -> None:
    dump(path, {"key": row_key(config), "config": config, "row": row})


def is_current(path: Path, config: dict) -> bool:
    """Whether the row saved at `path` was measured with `config` (see the module docstring). A config without a
    training config (`cfg`), such as the base model's, which is only evaluated, is current by its key alone."""
    if not path.is_file():
        return False
    saved = json.loads(path.read_text())
    if saved.get("key") == row_key(config):
        if "config" not in saved:  # a row saved before the config was stored
            dump(path, {**saved, "config": config})
        return True
    trained = "config" in saved and "cfg" in saved["config"] and "cfg" in config
    return trained and same_up_to_new_defaults(saved["config"], config)


def is_stale(path: Path, config: dict) -> bool:
    """Whether a row is saved at `path` but was measured with another config (a default changed since): its figures
    are not `config`'s, so a report leaves it out until it is rerun."""
    return path.is_file() and not is_current(path, config)


def same_up_to_new_defaults(saved: dict, current: dict) -> bool:
    """`current` equals `saved`, except for `atp:` keys absent from `saved` that `current` has at their default."""
    from axolotl_atp.args import ATPConfig

    saved_atp, current_atp = saved["cfg"].get("atp"), current["cfg"].get("atp")
    if saved["protocol"] != current["protocol"] or (saved_atp is None) != (current_atp is None):
        return False
    if {k: v for k, v in saved["cfg"].items() if k != "atp"} != {k: v for k, v in current["cfg"].items() if k != "atp"}:
        return False
    if current_atp is None:
        return True
    if set(saved_atp) - set(current_atp):  # an option removed since: the row is not comparable
        return False
    for name in set(current_atp) - set(saved_atp):  # options added since: only at their default
        field = ATPConfig.model_fields[name]
        if field.is_required() or current_atp[name] != json.loads(
            json.dumps(field.get_default(call_default_factory=True))
        ):
            return False
    return all(saved_atp[name] == current_atp[name] for name in saved_atp)
