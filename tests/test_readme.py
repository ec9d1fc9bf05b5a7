"""The README tells the truth about the things the code defines."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_readme_key_table_matches_the_config_model():
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from atp_keys_table import table

    assert table() in (ROOT / "README.md").read_text(), "regenerate with: python scripts/atp_keys_table.py"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test   #" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_lists_every_supported_family():
    from axolotl_atp.architectures import supported_model_types

    readme = (ROOT / "README.md").read_text()
    for model_type in supported_model_types():
        assert f"`{model_type}`" in readme, model_type
