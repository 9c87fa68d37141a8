"""Rollout generation: transformers' ``generate`` vs ``hybrid_ds.rollout.sampler.sample`` on the peers' work unit,
for GPT-2 and a Llama of the same size side by side.

    OMP_NUM_THREADS=2 python bench/bench_sampler.py [--iters 20] [--bs 8] [--new 32] [--models gpt2,llama]
        [--caches dynamic,static] [--repeats K] [--out bench/results/sampler]

The work unit is the peers' (/work/shared/bench-peers): GPT-2 4 layers x 256 wide, vocab 4096, 8
left-padded prompts, exactly ``--new`` new tokens (``min_new_tokens = max_new_tokens`` for
``generate``, ``fixed_length=True`` for ``sample``), the design's sampling settings (top_p 0.9,
temperature 0.7, top_k 50, no-repeat 3, repetition penalty 1.15). ``PEER_WORK`` points at a
built unit; without it the unit is built with the peers' make_work.py into a temporary dir.
The batch is the unit's first ``--bs`` items (the peers' batch 0). ``llama`` is a random-init
Llama of the same size on the same tokenizer (seed 0): 4 layers, 256 wide, 4 heads (no grouping),
SwiGLU width 688 (GPT-2's MLP parameter count: 3 x 256 x 688 ~ 2 x 256 x 1024), untied head,
256 positions; it decodes through :class:`hybrid_ds.rollout.decode.LlamaStep` as GPT-2 does
through ``Gpt2Step``. Variants per model: ``hf_generate``, ``sample`` (defaults: the exact draw,
same tokens as generate) and ``sample_candidate_rng`` (``hf_rng=False``). Each runs once to warm
up (from seed 0: ``same_tokens_as_generate``), then ``--iters`` rounds, every variant of every model
once per round (round-robin, so that load from other processes hits all alike); the median wall
time is reported, with the minimum, the median process CPU time and the 1-minute load average
before and after (the bench machine is shared). Prints one JSON line, and with ``--out`` writes it
to ``OUT.json`` and a table to ``OUT.txt``.

``--repeats K`` samples K responses per prompt, as GRPO does (``--bs`` x K rows): every variant runs on
the prompts repeat_interleaved K times, and ``sample_shared_prefill`` / ``sample_candidate_rng_shared_prefill``
pass the ``--bs`` prompts with ``repeats=K`` (each prompt prefilled once); ``shared_prefill_speedup``
is the median over rounds of each round's unshared / shared time.

Compare speedups rather than seconds when the machine is loaded: with 2 OpenMP threads and
other processes running, every variant's time inflates several-fold, the ratios much less.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")  # the peers' setting; set before torch is imported
REPO = Path(__file__).resolve().parents[1]
PEERS = REPO.parent / "shared" / "bench-peers"
sys.path.insert(0, str(REPO))

SETTINGS = dict(top_p=0.9, temperature=0.7, top_k=50, no_repeat_ngram_size=3, repetition_penalty=1.15)


def work_unit() -> Path:
    """The built work unit: $PEER_WORK, else built once into the temp dir."""
    if os.environ.get("PEER_WORK"):
        return Path(os.environ["PEER_WORK"])
    unit = Path(tempfile.gettempdir()) / "hybrid_ds-peer-work" / "unit"
    if not (unit / "bench-small").is_dir():
        subprocess.run([sys.executable, str(PEERS / "make_work.py"), str(unit)], cwd=PEERS, check=True,
                       stdout=subprocess.DEVNULL)
    return unit


def prompts(unit: Path, tok, bs: int):
    """The first ``bs`` prompts of the unit (the peers' format), left-padded with EOS."""
    sys.path.insert(0, str(PEERS))
    from common import prompt  # the peers' prompt format

    import torch

    items = json.loads((unit / "data.json").read_text())[:bs]
    seqs = [tok(prompt(it))["input_ids"] for it in items]
    width = max(map(len, seqs))
    eos = tok.eos_token_id
    ids = torch.tensor([[eos] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def llama_like(gpt2, seed: int = 0):
    """A random-init Llama with GPT-2's size (module docstring) and vocabulary, in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    g = gpt2.config
    cfg = LlamaConfig(vocab_size=g.vocab_size, hidden_size=g.n_embd, num_hidden_layers=g.n_layer,
                      num_attention_heads=g.n_head, num_key_value_heads=g.n_head, intermediate_size=688,
                      max_position_embeddings=g.n_positions, bos_token_id=g.bos_token_id,
                      eos_token_id=g.eos_token_id, pad_token_id=g.eos_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).eval()


def table(result: dict) -> str:
    rows = ["| model | variant | median s | min s | tokens/s | speed-up over generate | same tokens |",
            "|---|---|---|---|---|---|---|"]
    for name, med in result["median_s"].items():
        model, variant = name.split("/")
        rows.append(f"| {model} | {variant} | {med} | {result['min_s'][name]} | {result['tokens_per_s'][name]} | "
                    f"{result['speedup'].get(name, 1.0)}x | {result['same_tokens_as_generate'].get(name, '-')} |")
    shared = result.get("shared_prefill_speedup", {})
    rows += [""] * bool(shared) + [f"{name} over its unshared variant (median per-round ratio): {r}x"
                                   for name, r in shared.items()]
    ratio = result.get("llama_over_gpt2_speedup")
    if ratio is not None:
        rows.append(f"\nLlama's speed-up over generate / GPT-2's (sample, exact draw): {ratio}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20, help="timed rounds (every variant once per round)")
    parser.add_argument("--bs", type=int, default=8, help="prompts per batch")
    parser.add_argument("--new", type=int, default=32, help="new tokens per prompt (fixed)")
    parser.add_argument("--models", default="gpt2,llama", help="gpt2 (the unit's bench-small) and/or llama")
    parser.add_argument("--caches", default="",
                        help="also time sample() on transformers' caches (decoding through the forward): dynamic,static")
    parser.add_argument("--repeats", type=int, default=1,
                        help="responses per prompt (GRPO's K); > 1 adds the shared-prefill variants")
    parser.add_argument("--out", default="", help="write OUT.json and OUT.txt")
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hybrid_ds.rollout.sampler import SamplingSettings, sample

    unit = work_unit()
    tok = AutoTokenizer.from_pretrained(unit / "bench-small")
    gpt2 = AutoModelForCausalLM.from_pretrained(unit / "bench-small").eval()
    models = {"gpt2": gpt2, "llama": llama_like(gpt2)}
    models = {k: models[k] for k in args.models.split(",")}
    uniq_ids, uniq_mask = prompts(unit, tok, args.bs)
    K = args.repeats
    ids, mask = uniq_ids.repeat_interleave(K, 0), uniq_mask.repeat_interleave(K, 0)
    st = SamplingSettings(max_new_tokens=args.new, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                          **SETTINGS)
    gen_kwargs = {**st.generate_kwargs(), "min_new_tokens": args.new}
    variants = {}
    for label, model in models.items():
        variants.update({
            f"{label}/hf_generate": lambda m=model: m.generate(input_ids=ids, attention_mask=mask,
                                                               **gen_kwargs)[:, ids.shape[1]:],
            f"{label}/sample": lambda m=model: sample(m, ids, mask, st, fixed_length=True).response_ids,
            f"{label}/sample_candidate_rng": lambda m=model: sample(m, ids, mask, st, fixed_length=True,
                                                                   hf_rng=False).response_ids,
        })
        if K > 1:
            variants.update({
                f"{label}/sample_shared_prefill": lambda m=model: sample(
                    m, uniq_ids, uniq_mask, st, fixed_length=True, repeats=K).response_ids,
                f"{label}/sample_candidate_rng_shared_prefill": lambda m=model: sample(
                    m, uniq_ids, uniq_mask, st, fixed_length=True, hf_rng=False, repeats=K).response_ids,
            })
        for cache in filter(None, args.caches.split(",")):
            variants[f"{label}/sample_{cache}_cache"] = lambda m=model, c=cache: sample(
                m, ids, mask, st, fixed_length=True, cache=c).response_ids
    load_before = os.getloadavg()[0]
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    with torch.no_grad():
        first = {}
        for name, fn in variants.items():  # warm-up, and the same-seed token check
            torch.manual_seed(0)
            first[name] = fn()
        for _ in range(args.iters):  # round-robin, so load from other processes hits all alike
            for name, fn in variants.items():
                w, c = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(time.perf_counter() - w)
                cpu[name].append(time.process_time() - c)
    med = {name: statistics.median(ts) for name, ts in wall.items()}
    tokens = args.bs * K * args.new

    def generate_of(name):
        return name.split("/")[0] + "/hf_generate"

    speedup = {k: round(med[generate_of(k)] / v, 2) for k, v in med.items() if not k.endswith("/hf_generate")}
    result = {
        "bench": "sampler", "bs": args.bs, "repeats": K, "prompt_len": uniq_ids.shape[1], "new_tokens": args.new,
        "iters": args.iters,
        "threads": torch.get_num_threads(), "settings": SETTINGS,
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "tokens_per_s": {k: round(tokens / v, 1) for k, v in med.items()},
        "speedup": speedup,
        "min_s": {k: round(min(v), 4) for k, v in wall.items()},
        "median_cpu_s": {k: round(statistics.median(v), 4) for k, v in cpu.items()},
        "same_tokens_as_generate": {k: bool(torch.equal(v, first[generate_of(k)]))
                                    for k, v in first.items() if not k.endswith("/hf_generate")},
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    shared = {k: round(statistics.median(a / b for a, b in zip(wall[k.replace("_shared_prefill", "")], ts)), 3)
              for k, ts in wall.items() if k.endswith("_shared_prefill")}
    if shared:
        result["shared_prefill_speedup"] = shared  # per-round ratios: both ran back to back in each round
    if {"gpt2/sample", "llama/sample"} <= speedup.keys():
        result["llama_over_gpt2_speedup"] = round(speedup["llama/sample"] / speedup["gpt2/sample"], 3)
    print(json.dumps(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
        command = f"OMP_NUM_THREADS={torch.get_num_threads()} python bench/bench_sampler.py {' '.join(sys.argv[1:])}"
        Path(args.out + ".txt").write_text(f"$ {command}\n\n{table(result)}\n")


if __name__ == "__main__":
    main()
