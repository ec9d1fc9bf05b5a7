#!/usr/bin/env bash
# GPU check, for a machine with a CUDA GPU (a few minutes): the GPU-marked tests, then a short bf16
# QLoRA + ATP run and merge on the real SmolLM2-135M, printing step time and peak GPU memory.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 WANDB_MODE=disabled
bash scripts/setup.sh
PY=.venv/bin/python
nvidia-smi -L
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA in this venv'; print(torch.__version__, torch.cuda.get_device_name(0))"
$PY -m pytest -q -m gpu -p no:cacheprovider
$PY scripts/gpu_smollm2_run.py
