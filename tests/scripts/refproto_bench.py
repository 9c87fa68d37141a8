"""Bridge overhead per request, and what overlapping reward scoring with the reference buys.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 3 tests/scripts/refproto_bench.py

N-1 policy ranks + 1 reference. Part 1: the reference answers with zeros (no model), so the time
per request is the protocol alone (send ids+masks, merge two clients, reply (B, T) fp32): median
of 30 requests per shape. Part 2: the reference runs a tiny GPT-2 and the policy "scores rewards"
(a fixed 50 ms stand-in) either after the reply (blocking) or while the reference computes
(``request`` ... ``wait``).
"""

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from refproto_worker import TEMPERATURE, tiny_gpt2  # noqa: E402

from hybrid_ds.engine.placement import Placement, setup_placement  # noqa: E402
from hybrid_ds.reference.protocol import RefClient, RefServer, model_logprob_fn  # noqa: E402

SHAPES = [(8, 128, 128), (32, 512, 512), (64, 1024, 1024)]  # (B, P, T) per policy rank
REPS, REWARD_S = 30, 0.05


def main():
    pl = Placement.from_env("separate", 1)
    bridge = setup_placement(pl, timeout_s=120)
    if pl.role == "reference":
        RefServer(bridge, lambda ids, m, P, T, t: torch.zeros(ids.shape[0], T)).serve()
        model = tiny_gpt2()
        stats = RefServer(bridge, model_logprob_fn(model)).serve()
        print(f"reference compute per round: {stats.compute_s / max(stats.rounds, 1) * 1e3:.1f} ms")
        return 0
    with RefClient(bridge) as client:
        for B, P, T in SHAPES:
            ids = torch.randint(0, 90, (B, P + T))
            mask = torch.ones_like(ids)
            times = []
            for _ in range(REPS):
                t0 = time.perf_counter()
                client.logprobs(ids, mask, P, T, TEMPERATURE)
                times.append(time.perf_counter() - t0)
            sent, back = 2 * ids.numel() * 8 / 2**20, B * T * 4 / 2**20
            if pl.rank == 0:
                print(f"protocol only B={B} P={P} T={T} ({sent:.2f} MiB ids+masks, {back:.2f} MiB log-probs), "
                      f"{pl.policy_world} client(s): "
                      f"median {statistics.median(times) * 1e3:.2f} ms, min {min(times) * 1e3:.2f} ms", flush=True)
    with RefClient(bridge) as client:
        B, P, T = 16, 48, 16
        ids = torch.randint(0, 90, (B, P + T))
        mask = torch.ones_like(ids)
        for mode in ("blocking", "overlapped", "blocking", "overlapped"):
            times = []
            for _ in range(10):
                t0 = time.perf_counter()
                if mode == "blocking":
                    client.logprobs(ids, mask, P, T, TEMPERATURE)
                    time.sleep(REWARD_S)
                else:
                    pending = client.request(ids, mask, P, T, TEMPERATURE)
                    time.sleep(REWARD_S)
                    pending.wait()
                times.append(time.perf_counter() - t0)
            if pl.rank == 0:
                print(f"reference + {REWARD_S * 1e3:.0f} ms reward, {mode}: median "
                      f"{statistics.median(times) * 1e3:.1f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
