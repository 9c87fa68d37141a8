"""docs/optim.md, generated from the optimizer and scheduler tables (``python -m hybrid_ds.optim --docs``)."""

from __future__ import annotations

import json

from hybrid_ds.optim.optimizers import OFFLOAD_CLASSES, OPTIMIZERS
from hybrid_ds.optim.schedulers import SCHEDULER_ALIASES, SCHEDULERS
def optim_reference_markdown() -> str:
    """docs/optim.md, generated from OPTIMIZERS and SCHEDULERS."""
    lines = ["# Optimizers and learning-rate schedules", "",
             "Generated from `hybrid_ds/optim/` by `python -m hybrid_ds.optim --docs`; do not edit by hand.", "",
             "One optimizer serves both phases; SFT and PPO each have a schedule of their own (peaks LR_SFT and",
             "LR_PPO) that sets the learning rate of every parameter group before each optimizer step. Biases and",
             "norm weights are in groups with weight decay 0. Names are case-insensitive.", "",
             "## Optimizers (`OPTIMIZER`)", "",
             "| name | package | class | keys used | CPU (bitsandbytes 0.50.2) | DeepSpeed offload | notes |",
             "|---|---|---|---|---|---|---|"]
    for s in OPTIMIZERS.values():
        fixed = ", ".join(f"{k}={v}" for k, v in s.fixed)
        cls = s.target.replace(":", ".") + (f"({fixed})" if fixed else "")
        off = OFFLOAD_CLASSES.get(s.family)
        off = off.split(":")[1] if off else "not offloadable"
        lines.append(f"| `{s.name}` | {s.source} | `{cls}` | {', '.join(s.keys)} | {s.cpu} | {off} | {s.note} |")
    lines += ["", "When the DeepSpeed config offloads optimizer state (`offload_optimizer.device` cpu or nvme),",
              "DeepSpeed accepts only its own CPU optimizers: adam*/adamw* names become `DeepSpeedCPUAdam`",
              "(decoupled weight decay), lion* `DeepSpeedCPULion`, adagrad* `DeepSpeedCPUAdagrad`; the others",
              "are reported at validation. Under ZeRO, optimizers other than torch AdamW/Adagrad and DeepSpeed's",
              "own need `\"zero_allow_untested_optimizer\": true` (`deepspeed_optimizer_settings`).", "",
              "## Schedules (`SCHEDULER`)", "",
              "t = optimizer steps done in the phase, T = total steps (NUM_TRAINING_STEPS, else STEPS_PER_EPOCH ×",
              "EPOCHS, else derived from the run), W = warm-up steps (NUM_WARMUP_STEPS, else ⌈WARMUP_RATIO × T⌉),",
              "lr = the phase's learning rate. After T steps the last learning rate is held (reduce_on_plateau",
              "has no end).", "",
              "| name | style | keys used | learning rate at step t |", "|---|---|---|---|"]
    for s in SCHEDULERS.values():
        keys = ", ".join(s.keys) or "–"
        lines.append(f"| `{s.name}` | {s.style} | {keys} | {s.meaning} |")
    lines += ["", "Aliases: " + ", ".join(f"`{json.dumps(a) if not a else a}` = `{b}`"
                                          for a, b in SCHEDULER_ALIASES.items()) + " (and JSON `null`).", ""]
    return "\n".join(lines)
