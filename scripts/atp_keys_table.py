"""Print the README's `atp:` key reference table from the pydantic model (tests/test_readme.py checks it)."""

from __future__ import annotations

from axolotl_atp.args import ATPConfig


def table() -> str:
    rows = ["| key | default | description |", "|---|---|---|"]
    for name, field in ATPConfig.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | `{default}` | {description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
