"""Samples/s of model-backed rewards, batched (``score_batch``) vs one sample at a time.

    python bench/bench_rewards.py [--n 256] [--single 64] [--device cpu]

Rewards: cosine_sts on the packaged all-MiniLM-L6-v2, sentiment through a transformers pipeline on
a tiny random BERT classifier built here (2 layers, 32 wide: measures the pipeline's overhead
more than compute), and sentiment with the VADER lexicon. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from hybrid_ds.rewards import make_reward  # noqa: E402

WORDS = ("the model answered the question about the weather and the cat sat on a warm mat while "
         "a quick brown fox jumped over lazy dogs near the river bank today").split()


def make_texts(n: int) -> tuple[list[str], list[str]]:
    """Deterministic responses and targets of 5 to 40 words."""
    responses, targets = [], []
    for i in range(n):
        length = 5 + (i * 7) % 36
        responses.append(" ".join(WORDS[(i + k * 3) % len(WORDS)] for k in range(length)))
        targets.append(" ".join(WORDS[(2 * i + k) % len(WORDS)] for k in range(5 + i % 20)))
    return responses, targets


def samples_per_second(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def bench(reward, responses, targets, n_single: int) -> dict:
    """Batched throughput on all samples vs a per-sample loop on the first ``n_single``."""
    reward.score_batch(responses[:8], targets[:8])  # warm-up
    batched = samples_per_second(lambda: reward.score_batch(responses, targets), len(responses))
    single = samples_per_second(
        lambda: [reward(r, t) for r, t in zip(responses[:n_single], targets[:n_single])], n_single)
    return {"batched_sps": round(batched, 1), "single_sps": round(single, 1),
            "speedup": round(batched / single, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="samples scored batched")
    parser.add_argument("--single", type=int, default=64, help="samples scored one by one")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default). On a shared 2-core machine "
                             "oversubscribed threads distort timings badly: use 1 there")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    import rewards_helpers

    responses, targets = make_texts(args.n)
    result = {"bench": "rewards", "device": args.device, "torch_threads": torch.get_num_threads(),
              "loadavg_1m": round(os.getloadavg()[0], 2),
              "n_batched": args.n, "n_single": args.single, "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        sentiment_dir = rewards_helpers.build_tiny_bert_classifier(Path(tmp) / "sst2-tiny",
                                                                    ["NEGATIVE", "POSITIVE"])
        specs = {
            "cosine_sts": {"type": "cosine_sts"},
            "sentiment_pipeline_tiny": {"type": "sentiment", "model": str(sentiment_dir)},
            "sentiment_vader": {"type": "sentiment", "backend": "vader"},
        }
        for name, spec in specs.items():
            if spec.get("backend") != "vader":
                spec = {**spec, "batch_size": args.batch_size}
            reward = make_reward(spec, device=args.device)
            result[name] = bench(reward, responses, targets, args.single)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
