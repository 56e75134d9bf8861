#!/usr/bin/env bash
# One-GPU check of the image path (an H100/H200, no network): training images/s of img64-xs and
# img64-s in bf16 and fp16 (eager and compiled), loss health, autoguided sampling images/s, and
# bf16 against fp32, and that an fp16 overflow skips its step; within 8 minutes, into benchmarks/results/image_gpu.json.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run       # the same code on the CPU, tiny preset, seconds; temp dir
#   bash benchmarks/gpu_check.sh --dry-run --out /tmp/check.json [--compile]
#   bash benchmarks/gpu_check.sh --help
#
# Python: $PYTHON, else `python` on PATH. Output path also from $GPU_CHECK_OUT. The logic is in
# benchmarks/gpu_check.py; its own time budget (450 s) stops phases in time, and `timeout` here is
# the last resort (the JSON is rewritten after every phase, so what was measured stays).
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout --signal=INT --kill-after=10 470 "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
