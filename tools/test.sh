#!/usr/bin/env bash
# Install (tools/setup.sh) and run the test suite on the CPU; GPU and TensorRT tests skip where unavailable.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python -m pytest "$@"
