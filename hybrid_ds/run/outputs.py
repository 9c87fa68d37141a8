"""What a run leaves for its users besides checkpoints: merged weights and the resolved config."""

from __future__ import annotations

import json
import os

from hybrid_ds.config import Config
from hybrid_ds.models.policy_value import save_policy_value


def save_outputs(run) -> None:
    """``inference_lm/`` (plain causal LM + tokenizer) and, for RL modes, ``ppo_full/`` (+ value head).
    Collective under ZeRO-3: every rank calls it."""
    state = run.dist.full_state_dict(run.engine)
    if run.dist.is_main:
        out = run.cfg.run.output_dir
        save_policy_value(state, run.engine.module, run.tokenizer, os.path.join(out, "inference_lm"),
                          with_value_head=False)
        if run.cfg.run.mode != "sft":
            save_policy_value(state, run.engine.module, run.tokenizer, os.path.join(out, "ppo_full"),
                              with_value_head=run.engine.module.v_head is not None)
    run.dist.barrier()


def write_resolved_config(cfg: Config, seed: int, path: str) -> None:
    """The config as the run resolved it (every key, the drawn SEED), to rerun or compare on resume."""
    d = cfg.to_json_dict()
    d["SEED"] = seed
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(d, f, indent=2)
