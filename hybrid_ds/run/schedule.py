"""How many SFT steps, PPO updates and hybrid cycles a run does, derived once from config and data."""

from __future__ import annotations

from dataclasses import dataclass

from hybrid_ds.config import Config
from hybrid_ds.config.batch_plan import BatchPlans
from hybrid_ds.run import curriculum


@dataclass
class Schedule:
    """How many of each unit the run does, derived once from the config and the data."""

    sft_steps: int  # SFT optimizer steps in the whole run
    ppo_updates: int  # PPO updates (rollout + epochs) in the whole run
    cycles: int  # hybrid cycles (0 outside hybrid mode)
    ppo_optimizer_steps: int  # PPO optimizer steps = updates x epochs x minibatches per batch

    def describe(self) -> str:
        parts = []
        if self.cycles:
            parts.append(f"{self.cycles} hybrid cycles")
        if self.sft_steps:
            parts.append(f"{self.sft_steps} SFT steps")
        if self.ppo_updates:
            parts.append(f"{self.ppo_updates} PPO updates ({self.ppo_optimizer_steps} optimizer steps)")
        return ", ".join(parts)


def plan_schedule(cfg: Config, n_examples: int) -> Schedule:
    """Steps per phase: MAX_STEPS when given, else EPOCHS passes over the data (see config docs)."""
    mode, h = cfg.run.mode, cfg.hybrid
    minis = BatchPlans.from_config(cfg, 1).ppo.minibatches  # per epoch; the world does not change it
    if mode == "sft":
        steps = cfg.run.max_steps or cfg.run.epochs * (n_examples // cfg.sft.batch)
        return Schedule(steps, 0, 0, 0)
    if mode == "ppo":
        updates = cfg.run.max_steps or cfg.run.epochs * (n_examples // cfg.ppo.batch)
        return Schedule(0, updates, 0, updates * cfg.ppo.epochs * minis)
    per_cycle = cfg.sft.batch * h.cycle_sft_steps if h.cycle_sft_steps else cfg.ppo.batch * h.cycle_ppo_updates
    cycles = cfg.run.max_steps or cfg.run.epochs * max(1, n_examples // per_cycle)
    mixes = curriculum.plan(cfg, cycles)
    updates = sum(p for _, p in mixes)
    return Schedule(h.sft_warmup_steps + sum(n for n, _ in mixes), updates, cycles,
                    updates * cfg.ppo.epochs * minis)
