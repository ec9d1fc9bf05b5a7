#!/usr/bin/env bash
# GPU check, for a machine with a CUDA GPU (a few minutes): the GPU-marked tests, then a short bf16
# QLoRA + ATP run and merge on the real SmolLM2-135M, printing step time and peak GPU memory.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 WANDB_MODE=disabled
# A machine without network: `source scripts/gpu_env.sh BUNDLE` first (scripts/offline_bundle.py), which sets
# AXOLOTL_ATP_PYTHON; otherwise the usual .venv.
if [ -n "${AXOLOTL_ATP_PYTHON:-}" ]; then
  PY=$AXOLOTL_ATP_PYTHON
else
  bash scripts/setup.sh
  PY=.venv/bin/python
fi
nvidia-smi -L
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA in this venv'; print(torch.__version__, torch.cuda.get_device_name(0))"
# `gpu_check.sh tests` or `gpu_check.sh run` runs one half (e.g. the tests before the model has arrived).
PART=${1:-all}
if [ "$PART" != run ]; then $PY -m pytest -q -m gpu -p no:cacheprovider; fi
if [ "$PART" != tests ]; then $PY scripts/gpu_smollm2_run.py; fi
