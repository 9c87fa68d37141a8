"""What a run leaves for its users besides checkpoints: merged weights (and a LoRA run's adapter) and the
resolved config."""

from __future__ import annotations

import json
import os
from typing import Optional

from hybrid_ds.config import Config
from hybrid_ds.models.heads import HEADS_DIR, save_heads, task_heads_of
from hybrid_ds.models.lora import ADAPTER_DIR, merged_lm, save_merged
from hybrid_ds.models.policy_value import PolicyValue, save_policy_value
from hybrid_ds.models.reward_model import save_reward_model

REWARD_MODEL_DIR = "reward_model"  # MODE=rm's output, an AutoModelForSequenceClassification directory


def save_outputs(run) -> None:
    """``inference_lm/`` (plain causal LM + tokenizer) and, for RL modes, ``ppo_full/`` (+ value head); MODE=rm
    writes ``reward_model/`` instead (:func:`hybrid_ds.models.reward_model.save_reward_model`);
    with LoRA also ``adapter/`` (:func:`save_lora_outputs`). Collective under ZeRO-3: every rank calls it."""
    if run.cfg.lora.r:
        state = run.engine.trainable_state_dict()
        if run.dist.is_main:
            save_lora_outputs(run.cfg, run.tokenizer, run.seed, state, run.cfg.run.output_dir)
            save_task_heads(run, state)
        run.dist.barrier()
        return
    state = run.dist.full_state_dict(run.engine)
    if run.dist.is_main:
        out = run.cfg.run.output_dir
        if run.cfg.run.mode == "rm":  # a reward model, not a policy: no inference_lm/ or ppo_full/
            save_reward_model(state, run.engine.module.config, run.tokenizer, os.path.join(out, REWARD_MODEL_DIR))
            run.dist.barrier()
            return
        save_task_heads(run, state)
        save_policy_value(state, run.engine.module, run.tokenizer, os.path.join(out, "inference_lm"),
                          with_value_head=False)
        if run.cfg.run.mode != "sft":
            save_policy_value(state, run.engine.module, run.tokenizer, os.path.join(out, "ppo_full"),
                              with_value_head=run.engine.module.v_head is not None)
    run.dist.barrier()


def save_task_heads(run, state: dict) -> None:
    """``heads/`` (HEADS: one file per task head and ``heads.json``, models/heads.py), beside ``inference_lm/``."""
    heads = task_heads_of(run.engine.module)
    if heads is not None:
        save_heads(state, heads, os.path.join(run.cfg.run.output_dir, HEADS_DIR))


def save_lora_outputs(cfg: Config, tokenizer, seed: int, state: dict, out: str,
                      dirs: Optional[dict[str, bool]] = None) -> None:
    """A LoRA run's outputs from its trainable ``state`` (PolicyValue names: the adapters under 'lm.',
    the value head under 'v_head.'): ``out/adapter/`` (peft's adapter, for ``PeftModel.from_pretrained``
    on MODEL) and, as for a full run, ``dirs`` (name -> with value head; default ``inference_lm`` and,
    for RL modes, ``ppo_full``) holding the adapters merged into MODEL's full-precision weights."""
    if dirs is None:
        dirs = {"inference_lm": False, **({"ppo_full": True} if cfg.run.mode != "sft" else {})}
    adapter = {k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")}
    peft_model = merged_lm(cfg.run.model, tokenizer, seed, cfg.lora, adapter)
    merged = PolicyValue(save_merged(peft_model, tokenizer, os.path.join(out, ADAPTER_DIR)))
    merged_state = {**{f"lm.{k}": v for k, v in merged.lm.state_dict().items()},
                    **{k: v for k, v in state.items() if k.startswith("v_head.")}}
    if cfg.run.mode == "rm":  # MODE=rm: the merged trunk and the score head as a sequence classifier only
        save_reward_model(merged_state, merged.config, tokenizer, os.path.join(out, REWARD_MODEL_DIR))
        return
    for name, with_value_head in dirs.items():
        save_policy_value(merged_state, merged, tokenizer, os.path.join(out, name), with_value_head=with_value_head)


def write_resolved_config(cfg: Config, seed: int, path: str) -> None:
    """The config as the run resolved it (every key, the drawn SEED), to rerun or compare on resume."""
    d = cfg.to_json_dict()
    d["SEED"] = seed
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(d, f, indent=2)
