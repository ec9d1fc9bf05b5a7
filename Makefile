# axolotl-atp task runner. `make test` and `make demo` set up .venv themselves.
SHELL := /bin/bash
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export AXOLOTL_DO_NOT_TRACK := 1
export WANDB_MODE := disabled
PY := .venv/bin/python
# Test processes (pytest-xdist): the suite is mostly single-threaded process start-up (axolotl, transformers),
# so one worker per core, each with one torch thread, keeps both cores busy. `make test TEST_WORKERS=8`.
TEST_WORKERS ?= 2

.PHONY: setup test test-fast lint demo assets gpu-check

setup:
	@bash scripts/setup.sh

test: setup
	.venv/bin/ruff check .
	$(PY) -m devkit.assets all  # once, before the workers start (they would race to install it)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadgroup

test-fast: setup  ## unit tests only (no axolotl subprocesses, no real model)
	$(PY) -m pytest -q -m "not e2e and not real"

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

assets: setup
	$(PY) -m devkit.assets all

demo: setup
	$(PY) scripts/demo.py
