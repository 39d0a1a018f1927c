#!/bin/bash
# Builds the probes of docs/performance.md (2026-12-07 20:30-21:30) against this checkout's kernel sources with
# knobs.patch applied, in a temporary folder, and runs the comparisons that section quotes. Run from the repo root:
#   bash docs/experiments/down-probe/run.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp "$root/caprese/runtime/native/quant_gemv.c" "$root/caprese/runtime/native/int8_activations.c" "$here/probe.c" \
   "$here/ffn.c" "$tmp/"
patch -s -d "$tmp" -p1 < "$here/knobs.patch"
for p in probe ffn; do
  cc -O3 -fno-math-errno -fno-trapping-math -pthread -fopenmp-simd -march=native -DCAPRESE_QGEMV_EMBEDDED \
     -o "$tmp/$p" "$tmp/$p.c" -lm
done
cd "$tmp"
echo "== plain read; with a prefetcht1 per line 4 / 16 KB ahead"
./probe 1 768; AH=4 PF=2 ./probe 3 768; AH=16 PF=2 ./probe 3 768
echo "== the down: cold, hot; coefficients only; products only (speed only)"
./probe 0 768; ./probe 2 768; SKIP=1 ./probe 2 768; SKIP=2 ./probe 2 768
echo "== the FFN pattern, 112-row chunks: as the kernel; coefficients of each call's first group only (speed only)"
./ffn 112; SKIP=2 ./ffn 112
