"""Under ZeRO-3 (any launcher): dist.generation_model's one-all-gather weights equal DeepSpeed's
GatheredParameters, the partitions come back on exit and training still runs. Used by test_ppo_runs.py,
through value_head_probe.py (which runs ``gather_check`` after its own steps under ZeRO-3, so one
launch serves both tests) or on its own."""

import json
import os
import sys

import torch

from hybrid_ds.run.preflight import load_config
from hybrid_ds.engine.dist import init_dist
from hybrid_ds.algorithms.registry import PHASES
from hybrid_ds.run.loop import phase_step
from hybrid_ds.run.setup import build_run


def gather_check(run) -> dict:
    """The four facts on a ZeRO-3 run whose weights have moved off their initial values (collective:
    every rank calls it)."""
    dist = run.dist
    module = run.engine.module
    with dist.generation_model(run.engine) as lm:
        ours = {k: v.detach().clone() for k, v in module.named_parameters()}
        whole_lm = lm is module.lm and all(v.numel() > 0 for v in ours.values())
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        theirs = {k: v.detach().clone() for k, v in module.named_parameters()}
    partitioned = all(p.data.numel() == 0 for p in module.parameters())
    loss = phase_step(run, PHASES["sft"])["sft/loss"]  # hooks are back: the partitioned forward/backward runs
    return {"whole_lm": whole_lm, "equal": sorted(ours) == sorted(theirs) and all(
                torch.equal(ours[k], theirs[k]) for k in ours),
            "partitioned_after": partitioned, "trains_after": loss == loss}


def main():
    cfg = load_config(sys.argv[1], sys.argv[2:])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = init_dist(cfg, sft_micro=cfg.sft.batch // world, sft_accum=1)
    run = build_run(cfg, dist, cfg.run.seed)
    phase_step(run, PHASES["sft"])  # the weights have moved off their initial values
    result = gather_check(run)
    if dist.is_main:
        print("PROBE " + json.dumps(result))
    dist.shutdown()


if __name__ == "__main__":
    main()
