"""One process of a separate-placement launch, for tests/test_refproto.py (and by hand).

    torchrun --nproc-per-node 3 tests/scripts/refproto_worker.py --ref-ranks 1 --out DIR
    (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)

The first N-R ranks play the policy: they join a default process group of their own (gloo), check
that it holds only them, and each step send a rollout-shaped batch to their reference and compare
the answer with ``ppo.forward_logprobs`` of the same tiny GPT-2 computed locally. With
``--zero3`` they also train a tiny model under DeepSpeed ZeRO-3 between requests. The last R ranks
serve. ``--fault`` makes the reference raise / die / hang, or policy rank 1 fail, on the second
request; ``kill-sync``: before the second request the policy ranks send their weights
(REF_SYNC_EVERY's SYNC) and the reference dies while it takes the fourth. Each rank writes
``DIR/rank{N}.json`` when it finishes normally.
"""

import argparse
import json
import os
import signal
import sys
import time

import torch

from hybrid_ds.engine.placement import Placement, setup_placement
from hybrid_ds.reference.protocol import RefClient, RefServer, model_logprob_fn

V = 96
TEMPERATURE = 0.7


def log(msg):
    print(f"[refproto_worker {time.time():.3f}] {msg}", flush=True)


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=V - 1, eos_token_id=V - 1)
    return GPT2LMHeadModel(cfg).eval()


def rollout(rank, step):
    """A rollout-shaped batch: left-padded prompts, responses masked after an EOS; shapes vary by rank."""
    from hybrid_ds.algorithms.ppo import Rollout

    g = torch.Generator().manual_seed(1000 * rank + step)
    B, P, T = 3, 5 + (rank + step) % 3, 4 + rank % 2 + step % 2
    q = torch.randint(1, V, (B, P), generator=g)
    qm = torch.ones(B, P, dtype=torch.long)
    qm[1, :2] = 0  # left padding
    q[1, :2] = 0
    r = torch.randint(1, V, (B, T), generator=g)
    rm = torch.ones(B, T)
    rm[2, T - 2:] = 0  # ended early
    r[2, T - 2:] = 0
    return Rollout(q, qm, r, rm, rm[:, -1] == 0, [""] * B)


def serve(args, bridge, model):
    compute = model_logprob_fn(model, chunk=args.chunk)
    calls = [0]

    def faulty(*a):
        calls[0] += 1
        log(f"compute call {calls[0]}")
        if calls[0] == 2 and args.fault == "raise":
            raise ValueError("boom inside the reference's compute_fn")
        if calls[0] == 2 and args.fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if calls[0] == 2 and args.fault == "hang":
            time.sleep(3600)
        return compute(*a)

    weights = list(model.parameters())
    if args.fault == "kill-sync":
        weights = _DiesAt(weights)
    stats = RefServer(bridge, faulty, batch_clients=not args.no_batch, weights=weights).serve()
    return {"requests": stats.requests, "rows": stats.rows, "rounds": stats.rounds}


class _DiesAt(list):
    """The reference's weights; mixing the fourth one in kills the process (a death mid-sync)."""

    def __getitem__(self, i):
        if i == 3:
            log("dying while it takes weight 4")
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(i)


def zero3_engine():
    import deepspeed

    model = tiny_gpt2(seed=1).train()
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "steps_per_print": 10**9}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    return engine


def train_step(engine, rank, step):
    g = torch.Generator().manual_seed(77 + 10 * rank + step)
    ids = torch.randint(1, V, (2, 12), generator=g)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return float(loss)


def policy(args, bridge, placement, model):
    import torch.distributed as td

    from hybrid_ds.algorithms.ppo import forward_logprobs
    from hybrid_ds.models.logprobs import sequence_inputs

    P = placement.policy_world
    if args.zero3:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        engine = zero3_engine()
    else:
        td.init_process_group("gloo")
    assert td.get_world_size() == P and td.get_rank() == placement.rank, (td.get_world_size(), td.get_rank())
    out = {"world": td.get_world_size(), "max_diff": 0.0, "losses": [], "request_s": []}
    with RefClient(bridge) as client:
        for step in range(args.steps):
            if args.fault == "policy" and step == 1 and placement.rank == 1:
                raise RuntimeError("boom on policy rank 1")
            if args.fault == "kill-sync" and step == 1:
                from hybrid_ds.engine.param_stream import parameter_manifest, whole_parameters

                policy_lm = tiny_gpt2(seed=2)
                client.sync(parameter_manifest(policy_lm), whole_parameters(policy_lm), 1.0)
            ro = rollout(placement.rank, step)
            ids, att, _ = sequence_inputs(ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask)
            Pq, T = ro.query_ids.shape[1], ro.response_ids.shape[1]
            t0 = time.perf_counter()
            if step % 2:  # the non-blocking variant, with work in between
                pending = client.request(ids, att, Pq, T, TEMPERATURE)
                local = forward_logprobs(model, ro, TEMPERATURE, 2, with_values=False)[0]
                remote = pending.wait()
            else:
                remote = client.logprobs(ids, att, Pq, T, TEMPERATURE)
                local = forward_logprobs(model, ro, TEMPERATURE, 2, with_values=False)[0]
            out["request_s"].append(time.perf_counter() - t0)
            log(f"step {step}: reply after {out['request_s'][-1]:.3f} s")
            assert remote.dtype == torch.float32 and remote.shape == local.shape, (remote.shape, local.shape)
            out["max_diff"] = max(out["max_diff"], float((remote - local).abs().max()))
            if args.zero3:
                out["losses"].append(train_step(engine, placement.rank, step))
            x = torch.ones(1)
            td.all_reduce(x)  # the policy world keeps working between requests
            assert int(x.item()) == P
    td.destroy_process_group()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref-ranks", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--chunk", type=int, default=0)
    ap.add_argument("--zero3", action="store_true")
    ap.add_argument("--no-batch", action="store_true")
    ap.add_argument("--fault", choices=("none", "raise", "kill", "kill-sync", "hang", "policy"), default="none")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    placement = Placement.from_env("separate", args.ref_ranks)
    bridge = setup_placement(placement, timeout_s=args.timeout)
    log(str(placement))
    model = tiny_gpt2(seed=0)
    if placement.role == "reference":
        result = serve(args, bridge, model)
    else:
        result = policy(args, bridge, placement, model)
    result["role"] = placement.role
    with open(os.path.join(args.out, f"rank{placement.rank}.json"), "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
