#!/usr/bin/env bash
# The GPU checks in one short run, in the order that finds the first failure soonest (issue 16):
#   1. the TensorRT version                    (env.txt)
#   2. parse the graphs TensorRT parses        tests/test_tensorrt_gpu.py::test_parse_tensorrt_graphs (fp32, bf16)
#   3. build engines at --max-seq-len 64       ::test_build_engines (tiny Llama, then GQA, Gemma 2, Qwen3)
#   4. only the written cache rows change      ::test_only_written_cache_rows_change
#   5. 32 greedy tokens TensorRT == torch      ::test_greedy_tokens_match_torch (CUDA graph on and off)
#   6. time at slot 10 vs slot S-10            ::test_time_at_slot_10_vs_end (printed, not asserted)
#   7. the torch SDPA-kernel check             tests/test_decoder_gpu.py::test_decode_step_runs_on_efficient_or_cudnn_sdpa
# then the other gpu/tensorrt-marked tests and tools/bench_gpu.py (torch backend, CUDA graph, bf16, a random
# Llama-3.2-1B-shaped model). A TensorRT stage that fails stops the later TensorRT stages (they build on it);
# the torch checks run regardless. Without TensorRT (the lent GPU machine has CUDA torch but no TensorRT) stages
# 2-6 are skipped, and said so. Uses the machine's own python3; nothing is installed. Logs and JSON go to $OUT
# (default out/gpu); copy the numbers, with device and date, into docs/performance.md.
#
#   OUT=/tmp/gpu bash tools/gpu_checks.sh                      # on the GPU machine, from the repo root
#   BENCH_ARGS="--shape tiny --device cpu --precision fp32" bash tools/gpu_checks.sh   # smoke run on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
TRT_TESTS=tests/test_tensorrt_gpu.py
SDPA_TEST=tests/test_decoder_gpu.py::test_decode_step_runs_on_efficient_or_cudnn_sdpa

{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device',
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
  "$PY" -c "import tensorrt; print('tensorrt', tensorrt.__version__)" 2>/dev/null || echo "tensorrt: not installed"
} 2>&1 | tee "$OUT/env.txt"

tests=0
: > "$OUT/pytest.log"
# stage NAME PYTEST-ARGS...: one pytest run (-x: stop at its first failure), appended to pytest.log
stage() {
  local name=$1
  shift
  echo "== $name" | tee -a "$OUT/pytest.log"
  timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest -q -x -s -p no:cacheprovider "$@" 2>&1 | tee -a "$OUT/pytest.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 5 ] && rc=0  # nothing selected / all deselected
  [ "$rc" -ne 0 ] && tests=$rc
  return "$rc"
}

if "$PY" -c "import tensorrt" 2>/dev/null; then
  stage "2. parse (fp32, bf16)" "$TRT_TESTS" -k test_parse_tensorrt_graphs &&
    stage "3. build at --max-seq-len 64" "$TRT_TESTS" -k test_build_engines &&
    stage "4. only the written cache rows change" "$TRT_TESTS" -k test_only_written_cache_rows_change &&
    stage "5. greedy tokens TensorRT == torch" "$TRT_TESTS" -k test_greedy_tokens_match_torch &&
    stage "6. time at slot 10 vs S-10" "$TRT_TESTS" -k test_time_at_slot_10_vs_end ||
    echo "TensorRT checks stopped at the first failing stage (see above)" | tee -a "$OUT/pytest.log"
else
  echo "TensorRT checks 2-6 skipped: tensorrt is not installed here" | tee -a "$OUT/pytest.log"
fi

if grep -q "def ${SDPA_TEST##*::}" "${SDPA_TEST%%::*}" 2>/dev/null; then
  stage "7. torch SDPA kernels" "$SDPA_TEST"
else
  echo "== 7. torch SDPA kernels: $SDPA_TEST not found, skipped" | tee -a "$OUT/pytest.log"
fi
stage "other gpu / tensorrt tests" -m "gpu or tensorrt" tests --ignore="$TRT_TESTS" --deselect "$SDPA_TEST"

echo "== bench_gpu.py"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
timeout "${BENCH_TIMEOUT:-300}" "$PY" tools/bench_gpu.py ${BENCH_ARGS:-} --json "$OUT/bench_gpu.json" 2>&1 \
  | tee "$OUT/bench_gpu.log"
bench=${PIPESTATUS[0]}

echo "gpu_checks: tests exit $tests, bench exit $bench (logs in $OUT)"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
