"""The SFT -> PPO curriculum: how many SFT steps and PPO updates hybrid cycle ``c`` runs.

The roadmap's "start SFT-heavy, gradually raise the PPO share": cycle 0 runs
(CYCLE_SFT_STEPS, CYCLE_PPO_UPDATES), the last cycle (CURRICULUM_SFT_STEPS_END,
CURRICULUM_PPO_UPDATES_END), and the cycles between move from one to the other:

- ``none``: every cycle runs the start mix;
- ``linear``: each count moves linearly (rounded to the nearest integer);
- ``step``: the linear value held constant over CURRICULUM_STAGES equal stages.

Pure: the trainer uses it to plan the schedules' totals and to run each cycle, so both agree.
"""

from __future__ import annotations


def cycle_mix(cfg, cycle: int, cycles: int) -> tuple[int, int]:
    """(SFT steps, PPO updates) of hybrid cycle ``cycle`` (0-based) out of ``cycles``."""
    h = cfg.hybrid
    start = (h.cycle_sft_steps, h.cycle_ppo_updates)
    if h.curriculum == "none" or cycles <= 1:
        return start
    end = (h.curriculum_sft_steps_end, h.curriculum_ppo_updates_end)
    frac = cycle / (cycles - 1)
    if h.curriculum == "step":
        stages = max(1, h.curriculum_stages)
        frac = min(int(frac * stages), stages - 1) / max(stages - 1, 1)
    return tuple(int(round(a + (b - a) * frac)) for a, b in zip(start, end))  # type: ignore[return-value]


def plan(cfg, cycles: int) -> list[tuple[int, int]]:
    """Every cycle's mix, in order."""
    return [cycle_mix(cfg, c, cycles) for c in range(cycles)]
