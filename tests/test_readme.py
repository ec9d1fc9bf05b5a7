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


def test_readme_module_map_names_every_module():
    readme = (ROOT / "README.md").read_text()
    module_map = readme[readme.index("axolotl_atp/\n") :].split("```")[0]
    package = ROOT / "axolotl_atp"
    for path in sorted(package.glob("*.py")):
        if path.name != "__init__.py":
            assert path.name in module_map, path.name
    lines = module_map.splitlines()
    for sub in ("training", "export"):
        first = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{sub}/"))
        # The entry: its line and the continuation lines below it (indented past the names column).
        entry = [lines[first]]
        for line in lines[first + 1 :]:
            if not line.startswith(" " * 10):
                break
            entry.append(line)
        for path in sorted((package / sub).glob("*.py")):
            if path.name != "__init__.py":
                assert path.stem in " ".join(entry), f"{sub}/{path.name}"
    for folder in ("devkit", "benchmarks", "scripts", "tests", "export/remote"):
        assert (ROOT / folder).is_dir() or (package / folder).is_dir(), folder
