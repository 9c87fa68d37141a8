#!/usr/bin/env bash
# Create .venv and install hybrid_ds with its test extra. Idempotent; safe on a fresh clone.
# torch is pinned first: on a CPU-only machine torch==2.13.0 is the local CPU wheel, and the
# package's own "torch>=2.3" is then satisfied, so pip never pulls a CUDA build on its own.
#
# The one install script: the Docker images (docker/) run it too.
#   --system  install into $PYTHON itself, no .venv (an image's Python). A torch already there (the
#             CUDA build of a PyTorch base image) is kept: the package only asks for torch>=2.3.
#   --check   install nothing: ask pip, offline, what the install would do, and fail unless it
#             would add hybrid_ds alone (every dependency, torch above all, already satisfied).
#             .ci/run runs it with --system in a fresh venv that sees .venv's packages, i.e. what
#             `docker build` does on a base image with torch, without docker.
# Environment: PYTHON (the interpreter), HYBRID_DS_TORCH (the torch requirement installed when none
# is importable), HYBRID_DS_TORCH_INDEX (its index, e.g. https://download.pytorch.org/whl/cpu),
# HYBRID_DS_EXTRAS (default test,toxicity).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${HYBRID_DS_TORCH:-torch==2.13.0}
EXTRAS=${HYBRID_DS_EXTRAS-test,toxicity}
SYSTEM=0 CHECK=0
for arg in "$@"; do
  case "$arg" in
    --system) SYSTEM=1 ;;
    --check) CHECK=1 ;;
    *) echo "usage: bash scripts/setup.sh [--system] [--check]" >&2; exit 2 ;;
  esac
done
if [ "$SYSTEM" = 1 ]; then
  PYBIN=$PY
else
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  PYBIN=.venv/bin/python
fi
TARGET=".${EXTRAS:+[$EXTRAS]}"
if [ "$CHECK" = 1 ]; then
  torch_version=$("$PYBIN" -c "import torch; print(torch.__version__)") || {
    echo "setup.sh --check: torch is not importable by $PYBIN" >&2; exit 1; }
  plan=$("$PYBIN" -m pip install --dry-run --no-index --no-build-isolation -e "$TARGET" 2>&1) || {
    echo "$plan" >&2; echo "setup.sh --check: pip cannot install $TARGET from what is present" >&2; exit 1; }
  would=$(echo "$plan" | sed -n 's/^Would install //p')
  if ! [[ "$would" =~ ^hybrid[_-]ds-[^\ ]+$ ]]; then
    echo "$plan" >&2; echo "setup.sh --check: the install would also change: ${would:-nothing}" >&2; exit 1
  fi
  echo "setup.sh --check: $PYBIN would install hybrid_ds alone (torch $torch_version kept)"
  exit 0
fi
# pip, quiet, without the "Location ... is ignored" lines a pip.conf naming absent find-links folders
# prints for every package; a failing install still stops the script with pip's whole output.
pip_quiet() {
  local out
  if ! out=$("$PYBIN" -m pip "$@" 2>&1); then echo "$out" >&2; return 1; fi
  grep -v "is ignored: it is neither" <<<"$out" || true
}
if ! "$PYBIN" -c "import torch" 2>/dev/null; then
  pip_quiet install -q --upgrade pip >/dev/null
  pip_quiet install -q "$TORCH" ${HYBRID_DS_TORCH_INDEX:+--index-url "$HYBRID_DS_TORCH_INDEX"}
fi
# setuptools warns on every editable install of a flat layout that a folder named like the package in
# the working directory may shadow it on import. Here that folder *is* the installed package, so the
# notice says nothing; the filter matches that message alone, other build warnings still show.
PYTHONWARNINGS="ignore:Editable installation${PYTHONWARNINGS:+,$PYTHONWARNINGS}" pip_quiet install -q -e "$TARGET"
"$PYBIN" -c "import torch, hybrid_ds; print(f'hybrid_ds {hybrid_ds.__version__} ready: torch {torch.__version__}')"
