"""Building a run: data, models, optimizer, schedules, reward and logger, in that order."""

from __future__ import annotations

from typing import Optional

import torch

from hybrid_ds.algorithms.ppo_math import make_kl_controller
from hybrid_ds.algorithms.registry import MODES, PHASES
from hybrid_ds.config import Config, ConfigError
from hybrid_ds.config.batch_plan import BatchPlans
from hybrid_ds.data import BatchStream, DataReport, Example, load_items, tokenize_items
from hybrid_ds.models.policy_value import (
    PolicyValue,
    build_param_groups,
    load_lm,
    load_tokenizer,
)
from hybrid_ds.optim import build_optimizer, make_phase_schedules
from hybrid_ds.rewards import make_reward
from hybrid_ds.run.metrics import MetricsLogger
from hybrid_ds.run.schedule import plan_schedule
from hybrid_ds.run.state import Run


def prepare_data(cfg: Config, tokenizer, seed: int, report: Optional[DataReport] = None) -> list[Example]:
    """The training items, read, filtered and tokenised exactly as training will see them."""
    d = cfg.data
    items = load_items(cfg.run.train_file, d.select_output, split=d.split, shuffle=d.shuffle, seed=seed,
                       percent=d.percent, num_samples=d.num_samples, on_bad_item=d.on_bad_item, report=report)
    return tokenize_items(items, tokenizer, d.select_output, d.maxseq, report)


def build_run(cfg: Config, dist, seed: int, ref_client=None) -> Run:
    torch.manual_seed(seed + 1000 * dist.rank)  # per-rank seed: sampling differs across ranks
    # 1. data
    tokenizer = load_tokenizer(cfg.run.tokenizer or cfg.run.model)
    report = DataReport()
    examples = prepare_data(cfg, tokenizer, seed, report)
    if dist.is_main:
        for line in report.lines():
            print(f"[hybrid_ds] data: {line}")
    plan = plan_schedule(cfg, len(examples))
    phases = [PHASES[name] for name in MODES[cfg.run.mode]]
    rl = any(p.needs_reward for p in phases)

    # 2. models: policy+value trunk (trainable), reference (frozen copy of the start)
    lm = load_lm(cfg.run.model, tokenizer)  # under ZeRO-3, Accelerate's DeepSpeed plugin partitions it at load
    model = PolicyValue(lm, seed=seed)
    colocated_ref = any(p.needs_reference for p in phases) and ref_client is None  # else on its own ranks
    ref = load_lm(cfg.run.model, tokenizer) if colocated_ref else None
    optimizer = build_optimizer(build_param_groups(model, cfg.optim.weight_decay), cfg, cfg.sft.lr,
                                ds_config=dist.ds_config)
    engine = dist.prepare_trainable(model, optimizer)
    ref = dist.prepare_frozen(ref) if colocated_ref else None
    # 3. schedules: their totals come from the data, so some checks can only run here
    try:
        schedules = make_phase_schedules(cfg, plan.sft_steps, plan.ppo_optimizer_steps)
    except ValueError as e:
        raise ConfigError([str(e).replace("\n", " ")], "the run's schedule") from None

    # 4. reward and KL controller (RL phases)
    reward = kl_ctl = None
    if rl:
        reward = make_reward(cfg.reward, device=str(dist.device), all_reduce_sum=dist.all_reduce_sum)
        kl_ctl = make_kl_controller(cfg.ppo.init_kl_coef, cfg.ppo.target_kl, cfg.ppo.kl_horizon,
                                    adaptive=cfg.ppo.adaptive_kl)
    # 5. logger and data streams
    total = plan.cycles or plan.sft_steps or plan.ppo_updates
    logger = MetricsLogger(cfg.run.output_dir, enabled=dist.is_main, total=total, desc=cfg.run.mode)
    run = Run(cfg, dist, tokenizer, examples, engine, ref, reward, schedules, kl_ctl, logger, plan,
              BatchPlans.from_config(cfg, dist.world), seed=seed, ref_client=ref_client)
    if plan.sft_steps or cfg.ppo.ptx_coef > 0:
        run.streams["sft"] = BatchStream(len(examples), cfg.sft.batch, seed, cfg.data.shuffle)
    if plan.ppo_updates:
        run.streams["ppo"] = BatchStream(len(examples), cfg.ppo.batch, seed + 1, cfg.data.shuffle)
    return run
