"""The integration shape, end to end through hybrid_ds's own seam (manual check, not in the test tiers).

    accelerate launch --config_file launch/zero3.yaml --num_processes 3 \
        tests/scripts/refproto_initdist.py --out DIR

Every process calls ``setup_placement`` first. Policy ranks then call ``dist.init_dist`` (Accelerate
+ DeepSpeed ZeRO-3 over the 2 policy ranks), build the policy exactly as run.setup.build_run does,
and each step send a rollout-shaped batch to the reference, compare its answer with the colocated
computation (``ppo.forward_logprobs`` of a plain ``load_lm`` copy), and take an optimizer step.
The reference rank loads MODEL with ``load_lm`` and serves until the policy ranks shut down.
"""

import argparse
import json
import os
import sys
import time

import torch

from hybrid_ds.engine.placement import Placement, setup_placement
from hybrid_ds.reference.protocol import RefClient, RefServer, model_logprob_fn

MODEL, TEMPERATURE = "builtin:tiny-gpt2", 0.7


def rollout(tok, rank, step, B=2):
    from hybrid_ds.algorithms.ppo import Rollout

    g = torch.Generator().manual_seed(100 * rank + step)
    P, T, V = 6 + rank, 5 + step % 2, len(tok) - 1
    q, r = torch.randint(0, V, (B, P), generator=g), torch.randint(0, V, (B, T), generator=g)
    qm, rm = torch.ones(B, P, dtype=torch.long), torch.ones(B, T)
    qm[0, :2] = 0
    q[0, :2] = tok.pad_token_id
    rm[1, -1] = 0
    return Rollout(q, qm, r, rm, rm[:, -1] == 0, [""] * B)


def reference_main(bridge):
    from hybrid_ds.models.policy_value import load_lm, load_tokenizer

    ref = load_lm(MODEL, load_tokenizer(MODEL)).eval().requires_grad_(False)
    stats = RefServer(bridge, model_logprob_fn(ref, chunk=0)).serve()
    print(f"[reference] served {stats.requests} requests in {stats.rounds} rounds, compute {stats.compute_s:.3f} s",
          flush=True)
    return {"requests": stats.requests}


def policy_main(bridge):
    from hybrid_ds.config import Config
    from hybrid_ds.engine.dist import init_dist
    from hybrid_ds.models.policy_value import PolicyValue, build_param_groups, load_lm, load_tokenizer
    from hybrid_ds.optim import build_optimizer
    from hybrid_ds.algorithms.ppo import forward_logprobs
    from hybrid_ds.models.logprobs import sequence_inputs

    tok = load_tokenizer(MODEL)
    local_ref = load_lm(MODEL, tok).eval()  # before init_dist: under ZeRO-3 later loads are partitioned
    cfg = Config()
    cfg.run.model, cfg.run.dist_timeout_s = MODEL, 120
    dist = init_dist(cfg, sft_micro=1, sft_accum=1)
    with dist.load_context():
        lm = load_lm(MODEL, tok)
    model = PolicyValue(lm, seed=0)
    opt = build_optimizer(build_param_groups(model, 0.0), cfg, 1e-3, ds_config=dist.ds_config)
    engine = dist.prepare_trainable(model, opt)
    res = {"world": dist.world, "zero_stage": dist.zero_stage, "max_diff": 0.0, "request_s": []}
    with RefClient(bridge) as client:
        for step in range(3):
            ro = rollout(tok, dist.rank, step)
            ids, att, pos = sequence_inputs(ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask)
            t0 = time.perf_counter()
            remote = client.logprobs(ids, att, ro.query_ids.shape[1], ro.response_ids.shape[1], TEMPERATURE)
            res["request_s"].append(time.perf_counter() - t0)
            local = forward_logprobs(local_ref, ro, TEMPERATURE, 2, with_values=False)[0]
            res["max_diff"] = max(res["max_diff"], float((remote - local).abs().max()))
            engine.train()
            logits, values = engine(ids, att, position_ids=pos, with_values=True)
            loss = logits.float().logsumexp(-1).mean() * 1e-3 + values.pow(2).mean()
            engine.backward(loss, boundary=True)
            engine.step({"policy": 1e-3, "value": 1e-3})
    res["mean_metric"] = dist.mean_metrics({"x": float(dist.rank)})["x"]
    dist.shutdown()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = ap.parse_args()
    placement = Placement.from_env("separate", 1)
    bridge = setup_placement(placement, timeout_s=args.timeout)
    print(f"[refproto_initdist] {placement}", flush=True)
    res = reference_main(bridge) if placement.role == "reference" else policy_main(bridge)
    with open(os.path.join(args.out, f"rank{placement.rank}.json"), "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
