#!/usr/bin/env bash
# Issue 5's GPU checks in one short run, for a session that is lent a GPU machine (15 minutes of device time,
# all tries together): the gpu/tensorrt-marked tests, then tools/bench_gpu.py (torch backend, CUDA graph, bf16,
# a random Llama-3.2-1B-shaped model). Uses the machine's own python3 (its image has torch, transformers,
# onnx, onnxruntime, click, pytest); nothing is installed. Logs and JSON go to $OUT (default out/gpu); copy
# the numbers, with device and date, into docs/performance.md.
#
#   OUT=/tmp/gpu bash tools/gpu_checks.sh                      # on the GPU machine, from the repo root
#   BENCH_ARGS="--shape tiny --device cpu --precision fp32" bash tools/gpu_checks.sh   # smoke run on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device',
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
  "$PY" -c "import tensorrt; print('tensorrt', tensorrt.__version__)" 2>/dev/null || echo "tensorrt: not installed"
} 2>&1 | tee "$OUT/env.txt"

echo "== gpu / tensorrt tests"
timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest -q -m "gpu or tensorrt" -p no:cacheprovider tests 2>&1 \
  | tee "$OUT/pytest.log"
tests=${PIPESTATUS[0]}

echo "== bench_gpu.py"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
timeout "${BENCH_TIMEOUT:-300}" "$PY" tools/bench_gpu.py ${BENCH_ARGS:-} --json "$OUT/bench_gpu.json" 2>&1 \
  | tee "$OUT/bench_gpu.log"
bench=${PIPESTATUS[0]}

echo "gpu_checks: tests exit $tests, bench exit $bench (logs in $OUT)"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
