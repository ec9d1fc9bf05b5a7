# Source on a GPU machine without network, in the repo root: `source scripts/gpu_env.sh BUNDLE_DIR`.
# BUNDLE_DIR holds what scripts/offline_bundle.py wrote (site.tar.xz, assets.tar.gz.partNN). This unpacks the
# packages into /tmp/atp-site and the assets into /tmp/atp-cache (once), converts SmolLM2's GGUF into the same
# fp32 folder as on the development machine (its sha256 is printed to compare), puts an `axolotl` command next
# to the image's python3, and exports the offline variables. Then: scripts/gpu_check.sh, the benchmarks.
BUNDLE=${1:?usage: source scripts/gpu_env.sh BUNDLE_DIR}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 WANDB_MODE=disabled
# One dataset process: on the lent H200 (16 cores, 2026-11-29) `axolotl train` hung for minutes in datasets'
# save_to_disk(num_proc>1), waiting for its multiprocess Manager to start (faulthandler's traceback).
export AXOLOTL_DATASET_NUM_PROC=1
export AXOLOTL_ATP_CACHE=/tmp/atp-cache AXOLOTL_ATP_PYTHON=${AXOLOTL_ATP_PYTHON:-$(command -v python3)}
export PYTHONPATH="/tmp/atp-site/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ ! -d /tmp/atp-site/site ]; then
  mkdir -p /tmp/atp-site
  "$AXOLOTL_ATP_PYTHON" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
    "$BUNDLE/site.tar.xz" /tmp/atp-site
fi
BIN=$(dirname "$AXOLOTL_ATP_PYTHON")
if [ ! -x "$BIN/axolotl" ]; then
  printf '#!%s\nimport sys\nfrom axolotl.cli.main import main\nsys.exit(main())\n' "$AXOLOTL_ATP_PYTHON" > "$BIN/axolotl"
  chmod +x "$BIN/axolotl"
fi
if [ ! -f /tmp/atp-cache/smollm2-135m-hf/model.safetensors ] \
  && [ "$(cat "$BUNDLE"/assets.tar.gz.part* 2>/dev/null | sha256sum | cut -d' ' -f1)" = "$(cat "$BUNDLE/assets.sha256")" ]; then
  mkdir -p /tmp/atp-cache
  cat "$BUNDLE"/assets.tar.gz.part* | tar xz -C /tmp/atp-cache
  "$AXOLOTL_ATP_PYTHON" -c "from devkit.assets import ensure_smollm2; print(ensure_smollm2())"
  sha256sum /tmp/atp-cache/smollm2-135m-hf/model.safetensors
fi
