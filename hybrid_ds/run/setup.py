"""Building a run: data, models, optimizer, schedules, reward and logger, in that order."""

from __future__ import annotations

from typing import Optional

import torch

from hybrid_ds.algorithms.kl_control import make_kl_controller
from hybrid_ds.algorithms.registry import mode_phases
from hybrid_ds.config import Config
from hybrid_ds.config.batch_plan import BatchPlans
from hybrid_ds.config.refs import follows_policy, ref_entries
from hybrid_ds.data import BatchStream
from hybrid_ds.engine.trackers import Trackers
from hybrid_ds.assets import resolve_model
from hybrid_ds.models.heads import attach_task_heads
from hybrid_ds.models.lora import add_adapters, load_base
from hybrid_ds.models.policy_value import (PolicyValue, build_param_groups, load_dtype, load_lm,
                                           load_value_head)
from hybrid_ds.models.reward_model import score_head
from hybrid_ds.optim import build_optimizer
from hybrid_ds.rewards import make_reward
from hybrid_ds.rewards.callables import RewardFunctions, function_reward
from hybrid_ds.run.metrics import MetricsLogger
from hybrid_ds.run.samples import SampleLogger
from hybrid_ds.run.preflight import Preflight, preflight
from hybrid_ds.run.state import Run


def build_run(cfg: Config, dist, seed: int, ref_client=None, pre: Optional[Preflight] = None,
              reward_fns: Optional[RewardFunctions] = None) -> Run:
    """Models, optimizer, reward and logger on top of ``pre`` (the checks of
    :func:`hybrid_ds.run.preflight.preflight`, repeated here when they ran with another seed).
    ``reward_fns``: Python reward functions that replace REWARD or join it (``hybrid_ds.train``)."""
    torch.manual_seed(seed + 1000 * dist.rank)  # per-rank seed: sampling differs across ranks
    # 1. tokenizer, data, step plan and schedules: what preflight built
    if pre is None or pre.seed != seed:
        pre = preflight(cfg, seed)
    tokenizer, examples, plan, schedules = pre.tokenizer, pre.examples, pre.plan, pre.schedules
    if dist.is_main:
        for line in pre.report.lines():
            print(f"[hybrid_ds] data: {line}")
        for line in pre.warnings:
            print(f"[hybrid_ds] warning: {line}")
        for line in pre.eval_report.lines() if cfg.data.eval_file else []:
            print(f"[hybrid_ds] eval data: {line}")
        for line in pre.pref_report.lines() if cfg.pref.pref_file else []:
            print(f"[hybrid_ds] preference pairs: {line}")
    phases = mode_phases(cfg.run.mode, cfg.pref.hybrid_rl)
    rl = any(p.needs_reward for p in phases)

    # 2. models: policy+value trunk (trainable), reference (frozen copy of the start). With LoRA the
    #    trunk is a frozen base with adapters, and the reference is that base, adapters off (models/lora.py).
    if dist.is_main:
        here = any(p.needs_reference for p in phases) and ref_client is None
        ref = " and its reference" if here and not cfg.lora.r and follows_policy(cfg.ppo.refs) else ""
        frozen = [e.model for e in ref_entries(cfg) if e.model is not None] if here else []
        ref += f", REFS: {', '.join(frozen)}" if frozen else ""
        print(f"[hybrid_ds] loading the model {cfg.run.model}{ref}", flush=True)
    dtype = load_dtype(cfg.model.torch_dtype, dist.plan.mixed_precision, dist.uses_deepspeed)
    load = dict(dtype=dtype, attn_implementation=cfg.model.attn_implementation)
    if cfg.lora.r:
        lm = add_adapters(load_base(cfg.run.model, tokenizer, seed, cfg.lora, dist.device, **load), cfg.lora)
    else:
        lm = load_lm(cfg.run.model, tokenizer, **load)  # under ZeRO-3, Accelerate's DeepSpeed plugin partitions it at load
    if cfg.model.gradient_checkpointing:
        # Non-reentrant checkpointing: the recomputation follows autograd, so it needs no input that
        # requires grad (frozen embeddings under LoRA) and composes with ZeRO-3's parameter hooks.
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # The critic-free estimators train no value head: none is built (SFT keeps one, so its checkpoints
    # and ppo_full/ continue into PPO with GAE).
    # MODE=dpo trains no value head either; MODE=rm's head is the reward model's bias-free score head.
    rm_head = score_head(lm, seed) if cfg.run.mode == "rm" else None
    model = PolicyValue(lm, rm_head, seed=seed, value_head=cfg.run.mode != "dpo" and (
        cfg.run.mode in ("sft", "rm") or cfg.ppo.advantage == "gae"))
    attach_task_heads(model, cfg.heads.heads, seed)  # HEADS: before the optimizer, whose groups must hold them
    # MODEL is a ppo_full/: RL continues with its value head (never MODE=rm's, a head of its own)
    head = None if rm_head is not None else load_value_head(model, resolve_model(cfg.run.model))
    if head and dist.is_main:
        print(f"[hybrid_ds] value head loaded from {head}")
    colocated = any(p.needs_reference for p in phases) and ref_client is None  # else on its own ranks
    colocated_ref = colocated and not cfg.lora.r and follows_policy(cfg.ppo.refs)  # REFS may not list it
    ref = load_lm(cfg.run.model, tokenizer, **load) if colocated_ref else None
    # REFS' frozen models (config/refs.py), loaded from their files here and at every resume
    ref_models = [None if e.model is None else load_lm(e.model, tokenizer, **load)
                  for e in ref_entries(cfg)] if colocated else []
    optimizer = build_optimizer(build_param_groups(model, cfg.optim.weight_decay), cfg, cfg.sft.lr,
                                ds_config=dist.ds_config)
    engine = dist.prepare_trainable(model, optimizer)
    ref = dist.prepare_frozen(ref) if colocated_ref else None
    ref_models = [None if m is None else dist.prepare_frozen(m) for m in ref_models]
    # 3. reward and KL controller (RL phases)
    reward = kl_ctl = None
    if rl:
        spec = None if reward_fns and not reward_fns.with_spec else make_reward(
            cfg.reward, device=str(dist.device), all_reduce_sum=dist.all_reduce_sum)
        reward = function_reward(reward_fns.fns, spec) if reward_fns else spec
        kl_ctl = make_kl_controller(cfg.ppo.init_kl_coef, cfg.ppo.target_kl, cfg.ppo.kl_horizon,
                                    adaptive=cfg.ppo.adaptive_kl, kind=cfg.ppo.kl_controller,
                                    gains=(cfg.ppo.kl_kp, cfg.ppo.kl_ki))
    # 4. logger and data streams
    total = plan.cycles or plan.sft_steps or plan.ppo_updates or plan.pref_steps
    trackers = Trackers(dist.accelerator, cfg.log.tracker_project, {**cfg.to_json_dict(), "SEED": seed})
    logger = MetricsLogger(cfg.run.output_dir, enabled=dist.is_main, total=total, desc=cfg.run.mode,
                           trackers=trackers)
    run = Run(cfg, dist, tokenizer, examples, engine, ref, reward, schedules, kl_ctl, logger, plan,
              BatchPlans.from_config(cfg, dist.world), seed=seed, ref_client=ref_client,
              eval_examples=pre.eval_examples, pairs=pre.pairs, eval_pairs=pre.eval_pairs,
              samples=SampleLogger(cfg.run.output_dir, enabled=dist.is_main, trackers=trackers),
              ref_models=ref_models)
    if plan.sft_steps or cfg.ppo.ptx_coef > 0:
        run.streams["sft"] = BatchStream(len(examples), cfg.sft.batch, seed, cfg.data.shuffle)
    if plan.ppo_updates:
        run.streams["ppo"] = BatchStream(len(examples), cfg.ppo.batch, seed + 1, cfg.data.shuffle)
    if plan.pref_steps:
        run.streams["pref"] = BatchStream(len(pre.pairs), cfg.pref.batch, seed + 2, cfg.data.shuffle)
    return run
