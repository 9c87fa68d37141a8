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
    pref_steps: int = 0  # DPO or reward-model optimizer steps (MODE=dpo, rm; hybrid with HYBRID_RL=dpo)

    def describe(self) -> str:
        parts = []
        if self.cycles:
            parts.append(f"{self.cycles} hybrid cycles")
        if self.sft_steps:
            parts.append(f"{self.sft_steps} SFT steps")
        if self.ppo_updates:
            parts.append(f"{self.ppo_updates} PPO updates ({self.ppo_optimizer_steps} optimizer steps)")
        if self.pref_steps:
            parts.append(f"{self.pref_steps} preference steps")
        return ", ".join(parts)


def plan_schedule(cfg: Config, n_examples: int, n_pairs: int = 0) -> Schedule:
    """Steps per phase: MAX_STEPS when given, else EPOCHS passes over the data (see config docs);
    ``n_pairs`` preference pairs (MODE=dpo and rm count their steps in PREF_BATCH pairs)."""
    mode, h = cfg.run.mode, cfg.hybrid
    minis = BatchPlans.from_config(cfg, 1).ppo.minibatches  # per epoch; the world does not change it
    if mode == "sft":
        steps = cfg.run.max_steps or cfg.run.epochs * (n_examples // cfg.sft.batch)
        return Schedule(steps, 0, 0, 0)
    if mode == "ppo":
        updates = cfg.run.max_steps or cfg.run.epochs * (n_examples // cfg.ppo.batch)
        return Schedule(0, updates, 0, updates * cfg.ppo.epochs * minis)
    if mode in ("dpo", "rm"):
        return Schedule(0, 0, 0, 0, cfg.run.max_steps or cfg.run.epochs * (n_pairs // cfg.pref.batch))
    per_cycle = cfg.sft.batch * h.cycle_sft_steps if h.cycle_sft_steps else cfg.ppo.batch * h.cycle_ppo_updates
    cycles = cfg.run.max_steps or cfg.run.epochs * max(1, n_examples // per_cycle)
    mixes = curriculum.plan(cfg, cycles)
    updates = sum(p for _, p in mixes)
    sft_steps = h.sft_warmup_steps + sum(n for n, _ in mixes)
    if cfg.pref.hybrid_rl == "dpo":  # CYCLE_PPO_UPDATES counts DPO steps
        return Schedule(sft_steps, 0, cycles, 0, updates)
    return Schedule(sft_steps, updates, cycles, updates * cfg.ppo.epochs * minis)
