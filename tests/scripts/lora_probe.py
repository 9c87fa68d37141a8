"""A LoRA hybrid run under DeepSpeed (the stage its config names, any launcher), probed from inside.
Used by tests/test_lora.py; prints ``PROBE {json}`` on the main rank and writes OUT/probe.pt.

1. Before any process group: MODEL's own log-probs of a fixed batch (a plain causal LM, then freed).
2. The run is built and trains MAX_STEPS cycles (its final checkpoint, inference_lm/, adapter/).
3. The reference: run.ref is None, no second causal LM exists, and the policy with its adapters
   disabled gives MODEL's log-probs, while with them on it gives others (the adapters trained).
4. Resume: one more cycle from the checkpoint's state, then the checkpoint is loaded back into the
   same engine and the cycle is repeated: the same weights and metrics.
"""

import gc
import json
import os
import sys

import torch

from hybrid_ds.algorithms.registry import PHASES
from hybrid_ds.engine.dist import init_dist
from hybrid_ds.models.logprobs import lm_response_logprobs
from hybrid_ds.models.lora import load_base
from hybrid_ds.models.policy_value import load_tokenizer
from hybrid_ds.run.checkpoint import attach, finish, load_checkpoint
from hybrid_ds.run.checkpoint_dir import find_latest, read_point
from hybrid_ds.run.loop import phase_step, train
from hybrid_ds.run.preflight import load_config
from hybrid_ds.run.setup import build_run


def fixed_batch(tokenizer):
    """Two prompts + 5-token responses: ids, attention mask, positions, response ids."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tokenizer) - 1, (2, 12), generator=g)
    att = torch.ones_like(ids)
    att[1, :3] = 0  # left padding on the second row
    pos = (att.cumsum(1) - 1).clamp(min=0)
    return ids, att, pos, ids[:, -5:]


@torch.no_grad()
def logprobs(lm, batch):
    ids, att, pos, resp = batch
    return lm_response_logprobs(lm, ids, att, pos, resp, 1.0).float()


def n_causal_lms() -> int:
    """Causal LMs alive in this process (a trunk such as LlamaModel is none: it cannot generate)."""
    from transformers import GenerationMixin

    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, GenerationMixin))


def trainable(run) -> dict:
    return run.engine.trainable_state_dict()


def main():
    cfg = load_config(sys.argv[1], sys.argv[2:])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tok = load_tokenizer(cfg.run.model)
    batch = fixed_batch(tok)
    # 1. MODEL's own log-probs, before DeepSpeed exists (the base as every LoRA run loads it)
    base = load_base(cfg.run.model, tok, cfg.run.seed)
    base_lp = logprobs(base, batch)
    del base
    # 2. build and train
    dist = init_dist(cfg, sft_micro=cfg.sft.batch // world, sft_accum=1)
    run = build_run(cfg, dist, cfg.run.seed)
    lms = n_causal_lms()
    attach(run, None)
    train(run)
    finish(run)
    # 3. the reference is the policy with its adapters off
    run.engine.eval()
    with run.engine.adapters_disabled() as lm:
        ref_lp = logprobs(lm, batch)
    pol_lp = logprobs(run.engine.module.lm, batch)
    # 4. one more cycle, twice: from the live state and from the checkpoint
    ckpt = find_latest(cfg.run.output_dir)

    def cycle():
        m = {**phase_step(run, PHASES["sft"]), **phase_step(run, PHASES["ppo"])}
        return trainable(run), {k: v for k, v in m.items() if not k.startswith(("time/", "perf/", "mem/"))}

    a_state, a_metrics = cycle()
    load_checkpoint(run, read_point(ckpt))
    b_state, b_metrics = cycle()
    if dist.is_main:
        diff = max((a_state[k] - b_state[k]).abs().max().item() for k in a_state)
        torch.save({"policy_logprobs": pol_lp, "batch": batch}, os.path.join(cfg.run.output_dir, "probe.pt"))
        print("PROBE " + json.dumps({
            "gradient_checkpointing": run.engine.module.lm.is_gradient_checkpointing,
            "ref_is_none": run.ref is None, "causal_lms": lms,
            "ref_equals_base": float((ref_lp - base_lp).abs().max()),
            "policy_vs_base": float((pol_lp - base_lp).abs().max()),
            "trainable": sorted(a_state), "resume_max_diff": diff,
            "same_metrics": a_metrics == b_metrics, "checkpoint": ckpt}), flush=True)
    run.logger.close()
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
