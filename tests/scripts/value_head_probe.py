"""Run under any launcher: 2 SFT steps, then 1 PPO update; print whether the value head and the policy
changed in each phase (compared on the full, ZeRO-3-consolidated state dict). Under ZeRO-3 it then runs
zero3_gather_probe.gather_check on the same run and prints it as a ``GATHER`` line: one launch serves
both of test_ppo_runs.py's ZeRO-3 probes."""

import json
import os
import sys

import torch

from hybrid_ds.run.preflight import load_config
from hybrid_ds.engine.dist import init_dist
from hybrid_ds.algorithms.registry import PHASES
from hybrid_ds.run.loop import phase_step
from hybrid_ds.run.setup import build_run

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from zero3_gather_probe import gather_check  # noqa: E402


def snapshot(run):
    sd = run.dist.full_state_dict(run.engine)  # collective under ZeRO-3
    return None if sd is None else {k: v.detach().clone().float() for k, v in sd.items()}


def changed(a, b, prefix):
    return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))


def main():
    cfg = load_config(sys.argv[1], sys.argv[2:])
    dist = init_dist(cfg, sft_micro=cfg.sft.batch // (int(__import__("os").environ.get("WORLD_SIZE", "1"))
                                                      * cfg.sft.grad_accum), sft_accum=cfg.sft.grad_accum)
    run = build_run(cfg, dist, cfg.run.seed)
    s0 = snapshot(run)
    for _ in range(2):
        phase_step(run, PHASES["sft"])
    s1 = snapshot(run)
    phase_step(run, PHASES["ppo"])
    s2 = snapshot(run)
    if dist.is_main:
        print("PROBE " + json.dumps({
            "sft_value_changed": changed(s0, s1, "v_head."), "sft_policy_changed": changed(s0, s1, "lm."),
            "ppo_value_changed": changed(s1, s2, "v_head."), "ppo_policy_changed": changed(s1, s2, "lm.")}))
    if dist.zero_stage == 3:
        gathered = gather_check(run)  # collective: every rank
        if dist.is_main:
            print("GATHER " + json.dumps(gathered))
    dist.shutdown()


if __name__ == "__main__":
    main()
