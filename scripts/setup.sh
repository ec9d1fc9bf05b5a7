#!/usr/bin/env bash
# One-command set-up: .venv at the repo root, the CPU torch 2.13.0 first where no CUDA GPU is
# present (otherwise pip would fetch a multi-GB CUDA build for axolotl), then axolotl-atp with its
# dev extras; and llama.cpp (prebuilt, from npm's node-llama-cpp) in .llama-cpp/ for the GGUF export's
# check. Re-running is cheap: it does nothing once pyproject.toml and the llama.cpp version are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

# llama.cpp for `atp-merge --format gguf` and its tests: node-llama-cpp ships a prebuilt llama.cpp
# (Linux x64, glibc 2.34+). Without node it is skipped: the merge then records the GGUF check as skipped.
NODE_LLAMA_CPP_VERSION=3.22.1
if [ -z "${AXOLOTL_ATP_SKIP_LLAMA_CPP:-}" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "setup: no npm (Node 20+): llama.cpp not installed; GGUF checks will be skipped"
  elif [ "$(cat .llama-cpp/.version 2>/dev/null)" != "$NODE_LLAMA_CPP_VERSION" ]; then
    echo "setup: installing llama.cpp (node-llama-cpp $NODE_LLAMA_CPP_VERSION, prebuilt) into .llama-cpp/"
    mkdir -p .llama-cpp
    [ -f .llama-cpp/package.json ] || echo '{"name": "axolotl-atp-llama-cpp", "private": true}' > .llama-cpp/package.json
    npm install --prefix .llama-cpp --ignore-scripts --omit=optional --no-audit --no-fund --loglevel=error \
      "node-llama-cpp@$NODE_LLAMA_CPP_VERSION" "@node-llama-cpp/linux-x64@$NODE_LLAMA_CPP_VERSION"
    echo "$NODE_LLAMA_CPP_VERSION" > .llama-cpp/.version
  fi
fi

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
