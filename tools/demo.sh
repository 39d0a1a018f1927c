#!/usr/bin/env bash
# The main job end to end on the built-in default model (SmolLM2-135M-Instruct): install, materialise the
# model (first run only), generate a chat reply and print the latency report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
MODEL=$(.venv/bin/caprese fetch-default)
PROMPT=${1:-"Tom has 3 apples and buys 4 more. How many apples does he have? Answer with a number."}
echo "== caprese generate (PyTorch reference decoder, fp32, CPU): $PROMPT"
.venv/bin/caprese generate "$MODEL" --chat --prompt "$PROMPT" --max-new-tokens 128
