#!/usr/bin/env bash
# The demo: set up, then a hybrid SFT+PPO run of the embedded tiny GPT-2 on the embedded tasks,
# 2 processes under DeepSpeed ZeRO-2, then a summary of its SFT-loss and reward trends and where
# their PNG curves are (OUTPUT_DIR/plots/).
# Extra arguments are KEY=VALUE overrides, e.g.  bash scripts/demo.sh MAX_STEPS=10
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
# Without a GPU, tell DeepSpeed its accelerator is the CPU (it would otherwise warn that it guessed so).
command -v nvidia-smi >/dev/null 2>&1 || export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
out="out/demo-$(date +%Y%m%d-%H%M%S)"
.venv/bin/accelerate launch --config_file launch/zero2.yaml --num_processes 2 \
  -m hybrid_ds.train examples/demo.json OUTPUT_DIR="$out" "$@"
.venv/bin/python -m hybrid_ds.report "$out" --plot
