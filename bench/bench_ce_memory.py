"""Peak memory of the SFT/ptx cross-entropy at a 128 k vocabulary: fp32 upcast in one piece vs fp32 blocks.

Each variant runs in a fresh process (peak RSS is per process): a tiny Llama (2 layers, 64 wide,
V = 128 256 as Llama 3's) in bfloat16, one forward of B x L tokens, the summed cross-entropy of
every next token, and its backward. ``upcast`` is the formula hybrid_ds used before:
``F.cross_entropy(logits.float(), ...)`` (an fp32 B x L x V copy, and its fp32 log-softmax kept for
backward); ``blocked`` is :func:`hybrid_ds.algorithms.sft.token_ce_sum` (logsumexp over fp32 blocks
of at most 2**24 elements, the bf16 logits kept for backward). Both losses are printed: they agree to
fp32 rounding.

    python bench/bench_ce_memory.py [--batch 4 --seq 512]

Writes bench/results/ce_memory.json. Memory is deterministic enough for one run per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 128256


def child(variant: str, batch: int, seq: int) -> dict:
    import resource

    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybrid_ds.algorithms.sft import token_ce_sum

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (batch, seq))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    logits = model(input_ids=ids, use_cache=False).logits  # (B, L, V) bf16
    if variant == "upcast":
        shift = logits[:, :-1].float()
        loss = F.cross_entropy(shift.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum")
    else:
        loss = token_ce_sum(logits, ids)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "loss": float(loss), "peak_rss_mb": round(peak, 1),
            "ce_peak_over_start_mb": round(peak - before, 1),
            "logits_bf16_mb": round(batch * seq * VOCAB * 2 / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--child", choices=("upcast", "blocked"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.seq)))
        return
    rows = []
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE), "OMP_NUM_THREADS": "2"}
    for variant in ("upcast", "blocked"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--batch", str(args.batch),
                              "--seq", str(args.seq)], env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"B={args.batch} L={args.seq} V={VOCAB}: bf16 logits {rows[0]['logits_bf16_mb']} MiB")
    print(f"{'variant':<8} {'loss':>14} {'peak RSS MiB':>13} {'CE+backward over start MiB':>27}")
    for r in rows:
        print(f"{r['variant']:<8} {r['loss']:>14.2f} {r['peak_rss_mb']:>13.1f} {r['ce_peak_over_start_mb']:>27.1f}")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "ce_memory.json"), "w") as f:
        json.dump({"batch": args.batch, "seq": args.seq, "vocab": VOCAB, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
