#!/usr/bin/env bash
# The long quality protocol (benchmarks/quality.py, every row, JOBS rows at once) on a GPU machine without
# network, after the second half of the GPU check; the same fp32 configs as on a CPU, trained on the GPU.
#   bash scripts/gpu_long_protocol.sh BUNDLE_DIR OUT_DIR [JOBS] [SECONDS]
# BUNDLE_DIR is scripts/offline_bundle.py's output. OUT_DIR gets the logs and, every 15 s, quality-work.tgz:
# the saved rows and every row's config and logs (not the weights), to unpack into benchmarks/work/quality-long.
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${1:?bundle dir}; OUT_DIR=${2:?output dir}; JOBS=${3:-8}; SECONDS_LEFT=${4:-500}
mkdir -p "$OUT_DIR"
source scripts/gpu_env.sh "$BUNDLE" > "$OUT_DIR/gpu_env.log" 2>&1
tail -3 "$OUT_DIR/gpu_env.log"
STARTED=$(date +%s)
bash scripts/gpu_check.sh run > "$OUT_DIR/gpu_check_run.log" 2>&1
echo "gpu_check.sh run: exit $? in $(( $(date +%s) - STARTED )) s"; tail -22 "$OUT_DIR/gpu_check_run.log"
WORK=benchmarks/work/quality-long
pack() {
  mkdir -p "$WORK/rows"
  tar czf "$OUT_DIR/.quality-work.tgz" -C "$WORK" --exclude='*/run' --exclude='*/export' --exclude='*/prepared' \
    --exclude='prepared' . 2>/dev/null && mv "$OUT_DIR/.quality-work.tgz" "$OUT_DIR/quality-work.tgz"
}
( while true; do sleep 15; pack; done ) &
PACKER=$!
LEFT=$(( SECONDS_LEFT - ($(date +%s) - STARTED) ))
echo "quality.py: $JOBS rows at once, $LEFT s left"
OMP_NUM_THREADS=2 timeout "$LEFT" "$AXOLOTL_ATP_PYTHON" benchmarks/quality.py --jobs "$JOBS" --no-record \
  > "$OUT_DIR/quality.log" 2>&1
echo "quality.py: exit $?"
kill $PACKER; pack
grep -E "^\{'name'|^\| " "$OUT_DIR/quality.log" | cut -c1-400 | tail -40
