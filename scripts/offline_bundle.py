"""Pack what a GPU machine without network needs to run the tests, the GPU check and the benchmarks.

Such machines (a lent H200 here) have Python 3.12 with torch, transformers and the scientific stack, but
nothing else, and no package registry or Hugging Face Hub to fetch the rest from. This writes, under `--out`
(default `.gpu-bundle/`, ignored by git):

- `site.tar.xz`: the Python packages `axolotl train`, `axolotl atp-merge`, the tests and the benchmarks import
  that such an image lacks, at this project's versions (axolotl's stack is pinned: transformers, peft,
  accelerate, datasets, trl, tokenizers, huggingface_hub), installed for the target's Python by pip into one
  folder; bitsandbytes keeps its CUDA 13 libraries only, and binaries that are never run are left out (`UNUSED`);
- `assets.tar.gz`: the PubMed sets (the first TRAIN_ROWS training abstracts), Wikipedia and SmolLM2's GGUF
  (which the target converts to the same fp32 folder as here: `scripts/gpu_env.sh`), split into
  `assets.tar.gz.partNN` of at most `--part-mib` each, so that each piece fits one transfer (the first one
  shares its transfer with `site.tar.xz`), and the whole archive's `assets.sha256`, by which the target knows
  that every piece has arrived.

    python scripts/offline_bundle.py [--out DIR] [--python-version 3.12] [--part-mib 60]

On the target: `source scripts/gpu_env.sh DIR` (unpacks, converts the model, puts `axolotl` on PATH).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devkit.assets import SMOLLM2_GGUF, cache_dir, ensure_pubmed, ensure_smollm2, ensure_wikipedia  # noqa: E402

# The image's own packages are used where they are not part of axolotl's pinned stack.
PINNED = {
    "transformers": "5.16.1",
    "peft": "0.20.0",
    "accelerate": "1.13.0",
    "datasets": "4.8.4",
    "trl": "1.9.0",
    "tokenizers": "0.23.1",
    "huggingface_hub": "1.17.0",
    "fsspec": "2025.10.0",
}
# Imported by `axolotl train` / `atp-merge` / the benchmarks (traced on 2026-11-29) and absent from the image.
MISSING = [
    "axolotl",
    "axolotl-contribs-lgpl",
    "axolotl-contribs-mit",
    "bitsandbytes",
    "torchao",
    "gguf",
    "addict",
    "annotated-types",
    "backoff",
    "brotli",
    "chardet",
    "defusedxml",
    "dill",
    "distro",
    "evaluate",
    "fastcore",
    "fire",
    "google-api-core",
    "google-auth",
    "google-cloud-core",
    "google-cloud-storage",
    "google-resumable-media",
    "google-crc32c",
    "googleapis-common-protos",
    "proto-plus",
    "pyasn1",
    "pyasn1_modules",
    "h2",
    "hpack",
    "hyperframe",
    "kernels",
    "kernels-data",
    "liger_kernel",
    "mistral_common",
    "jsonschema",
    "jsonschema-specifications",
    "referencing",
    "rpds-py",
    "multiprocess",
    "opentelemetry-api",
    "opentelemetry-exporter-http-transport",
    "opentelemetry-exporter-otlp-common",
    "opentelemetry-exporter-otlp-proto-common",
    "opentelemetry-exporter-otlp-proto-http",
    "opentelemetry-proto",
    "opentelemetry-sdk",
    "opentelemetry-semantic-conventions",
    "platformdirs",
    "posthog",
    "pycountry",
    "pydantic",
    "pydantic-extra-types",
    "pydantic_core",
    "python-dotenv",
    "pytz",
    "sniffio",
    "termcolor",
    "typing-inspection",
    "wandb",
    "zstandard",
]
TRAIN_ROWS = 6000  # benchmarks/quality.py trains on 4,000 and calibrates on the next 32
# Never run here: wandb's service binaries (WANDB_MODE=disabled) and Mistral's tokenizer tables.
UNUSED = ["wandb/bin", "mistral_common/data"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64"]
PLATFORMS += ["manylinux2014_x86_64", "manylinux1_x86_64", "any"]


def build_site(out: Path, python_version: str) -> Path:
    """Wheels for the target (a pure-Python wheel built here where PyPI has only a source archive), installed
    by pip into one folder and packed."""
    wheels, site = out / "wheels", out / "site"
    for stale in (wheels, site):  # one version of each package: pip refuses two
        shutil.rmtree(stale, ignore_errors=True)
    wheels.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip"]
    target = ["--python-version", python_version, "--implementation", "cp"]
    for platform in PLATFORMS:
        target += ["--platform", platform]
    for name in dict.fromkeys([*PINNED, *MISSING]):
        spec = f"{name}=={PINNED.get(name) or version(name)}"
        fetched = subprocess.run(
            [*pip, "download", "-q", "--no-deps", "--only-binary=:all:", *target, "-d", str(wheels), spec],
            capture_output=True,
            text=True,
        )
        if fetched.returncode != 0:  # a source archive only: build its (pure-Python) wheel here
            subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(wheels), spec], check=True)
    install = [*pip, "install", "-q", "--no-deps", "--no-compile", "--only-binary=:all:", *target]
    subprocess.run([*install, "--target", str(site), *map(str, sorted(wheels.glob("*.whl")))], check=True)
    for lib in (site / "bitsandbytes").glob("libbitsandbytes_cuda*.so"):
        if not lib.name.startswith("libbitsandbytes_cuda13"):
            lib.unlink()
    for unused in UNUSED:
        shutil.rmtree(site / unused)
    archive = out / "site.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(site, arcname="site")
    shutil.rmtree(site)
    return archive


def build_assets(out: Path, part_mib: int, first_part_mib: float) -> list[Path]:
    ensure_smollm2()
    pubmed, wiki = ensure_pubmed(), ensure_wikipedia()
    gguf = cache_dir() / "smollm2-gguf" / SMOLLM2_GGUF
    archive = out / "assets.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        # The benchmarks' rows: the first TRAIN_ROWS abstracts (training and calibration) and the held-out set.
        train = "".join((pubmed / "train.jsonl").read_text().splitlines(keepends=True)[:TRAIN_ROWS]).encode()
        info = tarfile.TarInfo("pubmed/train.jsonl")
        info.size = len(train)
        tar.addfile(info, io.BytesIO(train))
        tar.add(pubmed / "heldout.jsonl", arcname="pubmed/heldout.jsonl")
        tar.add(wiki, arcname="wikipedia")
        tar.add(gguf, arcname=f"smollm2-gguf/{SMOLLM2_GGUF}")
    for old in out.glob("assets.tar.gz.part*"):
        old.unlink()
    parts = []
    with archive.open("rb") as source:
        while chunk := source.read(int((first_part_mib if not parts else part_mib) * 2**20)):
            part = out / f"assets.tar.gz.part{len(parts):02d}"
            part.write_bytes(chunk)
            parts.append(part)
    (out / "assets.sha256").write_text(hashlib.sha256(archive.read_bytes()).hexdigest() + "\n")
    archive.unlink()
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-bundle")
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--part-mib", type=int, default=60)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    site = build_site(args.out, args.python_version)
    # The first transfer carries the packages and the first piece of the assets.
    first = max(1.0, args.part_mib - site.stat().st_size / 2**20)
    for path in [site, *build_assets(args.out, args.part_mib, first)]:
        print(f"{path}  {path.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
