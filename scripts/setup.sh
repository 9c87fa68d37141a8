#!/usr/bin/env bash
# Create .venv and install hybrid_ds with its test extra. Idempotent; safe on a fresh clone.
# torch is pinned first: on a CPU-only machine torch==2.13.0 is the local CPU wheel, and the
# package's own "torch>=2.3" is then satisfied, so pip never pulls a CUDA build on its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${HYBRID_DS_TORCH:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q "$TORCH"
fi
.venv/bin/pip install -q -e ".[test,toxicity]" 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import torch, hybrid_ds; print(f'hybrid_ds {hybrid_ds.__version__} ready: torch {torch.__version__}')"
