#!/usr/bin/env bash
# One-command set-up: .venv at the repo root, the CPU torch 2.13.0 first where no CUDA GPU is
# present (otherwise pip would fetch a multi-GB CUDA build for axolotl), then axolotl-atp with its
# dev extras. Re-running is cheap: it does nothing once pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
STAMP=.venv/.axolotl-atp-setup
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x .venv/bin/python ]; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check --progress-bar off)
"${PIP[@]}" -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: no CUDA GPU: installing the CPU build of torch 2.13.0 first"
  "${PIP[@]}" -q "torch==2.13.0"
fi
echo "setup: installing axolotl-atp[dev] (axolotl 0.19.0 and its pins); this takes a few minutes the first time"
"${PIP[@]}" -q -e '.[dev]'
echo "$WANT" > "$STAMP"
echo "setup: done (.venv/bin/python)"
