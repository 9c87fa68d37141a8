"""Peak memory per rank: LoRA against full fine-tuning, each with its PPO reference, on one Llama.

    python bench/bench_lora.py [--nproc 2] [--zero 2] [--cycles 3] [--rank 16] [--out bench/results]

The model: a random-init Llama (8 layers, 512 wide, 8 heads, MLP 1536, the builtin tokenizer's 1383
tokens: 28.7 M parameters), built once under the system's temp directory. Both runs are the same
hybrid run (``accelerate launch`` with launch/zeroN.yaml, the path a user takes; SFT batch 8, PPO
batch 8, 16 new tokens, AdamW, fp32): "full" trains every weight and keeps a colocated frozen
reference; "lora" (LORA_R=--rank, all linear layers) trains the adapters and the value head, and its
reference is the same model with the adapters disabled (hybrid_ds/models/lora.py). Read from the
last PPO row of metrics.jsonl: the peak resident memory of each rank (``mem/peak_rss_mb``; on a GPU
the run also logs ``mem/peak_gpu_mb``) and the model state it holds (``mem/params_mb``: the policy's
parameters, frozen ones included, not the reference's; ``mem/optim_mb``; ``mem/buffers_mb``).
Prints a Markdown table and writes ``lora.json`` and ``lora.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def llama_dir() -> str:
    """The benchmark's Llama (module docstring), saved once with the builtin tokenizer."""
    out = os.path.join(tempfile.gettempdir(), f"hybrid_ds-bench-llama29m-{os.getuid()}")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, REPO)
    from hybrid_ds.assets import TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    tmp = tempfile.mkdtemp(dir=tempfile.gettempdir())
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.rename(tmp, out)
    return out


def run(model: str, nproc: int, zero: int, cycles: int, lora_rank: int) -> dict:
    out = tempfile.mkdtemp(prefix="hybrid-bench-lora-")
    cfg = {"MODE": "hybrid", "MODEL": model, "TRAIN_FILE": "builtin:demo-tasks", "OUTPUT_DIR": os.path.join(out, "run"),
           "SEED": 0, "MAX_STEPS": cycles, "SFT_BATCH": 8, "PPO_BATCH": 8, "PPO_MINI": 8, "PPO_EPOCHS": 1,
           "LR_SFT": 1e-4, "LR_PPO": 1e-5, "SCHEDULER": "constant", "MAX_NEW_TOKENS": 16, "MIN_NEW_TOKENS": 16,
           "MAXSEQ": 128, "REWARD": {"type": "word_f1"}, "CLEANSE": False, "LORA_R": lora_rank,
           "LORA_ALPHA": 2.0 * max(lora_rank, 1)}
    path = os.path.join(out, "cfg.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    threads = max(1, (os.cpu_count() or 2) // nproc)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file",
           os.path.join(REPO, "launch", f"zero{zero}.yaml"), "--num_processes", str(nproc), "-m", "hybrid_ds.train",
           path]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"hybrid_ds failed ({p.returncode}):\n{p.stderr[-3000:]}")
    with open(os.path.join(out, "run", "metrics.jsonl")) as f:
        last = [r for r in map(json.loads, f) if r["phase"] == "ppo"][-1]
    keys = ("peak_rss_mb", "peak_gpu_mb", "params_mb", "optim_mb", "buffers_mb")
    return {k: {name.rsplit("/", 1)[1]: v for name, v in last.items() if name.startswith(f"mem/{k}/")} for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    args = ap.parse_args()
    model = llama_dir()
    res = {name: run(model, args.nproc, args.zero, args.cycles, r) for name, r in (("full", 0), ("lora", args.rank))}
    lines = [f"{args.nproc} processes, ZeRO-{args.zero}, 28.7 M-parameter Llama, LORA_R={args.rank} (all linear), "
             f"{args.cycles} hybrid cycles", "",
             "| run | rank | peak RSS MB | params MB | optimizer MB | buffers MB |", "|---|---|---|---|---|---|"]
    for name, r in res.items():
        for rank in sorted(r["peak_rss_mb"]):
            lines.append(f"| {name} | {rank} | {r['peak_rss_mb'][rank]:.0f} | {r['params_mb'][rank]:.1f} | "
                         f"{r['optim_mb'][rank]:.1f} | {r['buffers_mb'][rank]:.1f} |")
    worst = {name: max(r["peak_rss_mb"].values()) for name, r in res.items()}
    lines += ["", f"worst rank peak RSS, LoRA / full: {worst['lora'] / worst['full']:.2f} "
                  f"({worst['lora']:.0f} MB / {worst['full']:.0f} MB)"]
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lora.json"), "w") as f:
        json.dump({"args": vars(args), "results": res}, f, indent=2)
    with open(os.path.join(args.out, "lora.txt"), "w") as f:
        f.write(f"$ python bench/bench_lora.py --nproc {args.nproc} --zero {args.zero} --cycles {args.cycles} "
                f"--rank {args.rank}\n\n{text}\n")


if __name__ == "__main__":
    main()
