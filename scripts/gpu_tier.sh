#!/usr/bin/env bash
# The GPU tier: every gpu-marked test (tests/test_gpu.py, tests/test_fp16.py, the CUDA sampler test) on a
# machine with a CUDA GPU. PY names the Python that has hybrid_ds's dependencies (default: .venv's).
# Extra arguments go to pytest. The CPU tier (.ci/run) never needs this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "the GPU tier needs a CUDA GPU, and torch sees none"
print(f"GPU tier: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
PYEOF
exec "$PY" -m pytest -m gpu -v -p no:cacheprovider --timeout 600 -rs --durations=15 "$@"
