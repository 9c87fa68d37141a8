"""The benchmark matrix of ``run_vs_peers.py --matrix``: model shapes x response lengths x precisions.

Each row runs hybrid_ds (``bench_hybrid.py``), the bare floor (the peers' ``floor_bench.py``) and the
original loop (the peers' ``seed_trl011_hybrid.py``, TRL 0.11.4, per-prompt generation) on the same
work: the unit's 512 items and tokenizer, 1 SFT step of 8 + 1 PPO update of 8 prompts x exactly
``new`` tokens, 4 PPO epochs, 1 process, the same ``OMP_NUM_THREADS`` (``--threads``). Only the model, the response length
and the precision change from the work unit (bench/README.md).

The peers read their model from ``$PEER_WORK/bench-small`` and load it in the dtype it was saved in
(transformers' ``dtype="auto"``), so every shape gets a unit directory per precision: the fp32 one
is also hybrid_ds's ``--work`` (``--bf16`` casts it under DeepSpeed bf16, fp32 master weights), the
bf16 one holds the same weights saved in bfloat16 for the peers, which run under ``peer_bf16.py``
(bf16 default dtype: their value heads too). Their AdamW then steps bf16 weights, with no fp32
master copy: less work than hybrid_ds's mixed precision, a floor all the same.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

# name -> (family, config fields); GPT-2 fields are GPT2Config's, the Llama is bench_sampler.llama_like's
SHAPES = {
    "gpt2-4x256": ("gpt2", {}),  # the work unit's bench-small itself
    "gpt2-8x512": ("gpt2", {"n_layer": 8, "n_embd": 512, "n_head": 8}),
    "llama-4x256": ("llama", {}),
}


@dataclass(frozen=True)
class Row:
    shape: str
    new: int  # exactly this many new tokens per response
    bf16: bool

    @property
    def name(self) -> str:
        return f"{self.shape} {self.new} tok {'bf16' if self.bf16 else 'fp32'}"


# Three shapes from two families, two response lengths, both precisions; the larger GPT-2 gets the
# shorter responses, so that no row costs much more than the others (a full run is one sitting).
ROWS = [
    Row("gpt2-4x256", 32, False),
    Row("gpt2-4x256", 32, True),
    Row("gpt2-8x512", 16, False),
    Row("llama-4x256", 32, False),
    Row("llama-4x256", 32, True),
]


def build_unit(base: str, root: str, shape: str, bf16: bool) -> str:
    """``root/<shape>-<fp32|bf16>/`` with the unit's data.json and the shape's model as ``bench-small``
    (random init, seed 0, the unit's tokenizer beside it); built once, reused after."""
    out = os.path.join(root, f"{shape}-{'bf16' if bf16 else 'fp32'}")
    model_dir = os.path.join(out, "bench-small")
    if os.path.isfile(os.path.join(out, "data.json")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    base_model = os.path.join(base, "bench-small")
    family, fields = SHAPES[shape]
    tok = AutoTokenizer.from_pretrained(base_model)
    unit_model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if family == "llama":
            from bench_sampler import llama_like  # the same-size Llama of the sampler benchmark

            model = llama_like(unit_model)
        elif fields:
            c = unit_model.config
            model = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.n_positions,
                                               bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                                               pad_token_id=c.pad_token_id, **fields))
        else:
            model = unit_model
    model = model.to(torch.bfloat16 if bf16 else torch.float32)
    model.config.dtype = model.dtype
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(os.path.join(tmp, "bench-small"))
    tok.save_pretrained(os.path.join(tmp, "bench-small"))
    shutil.copy(os.path.join(base, "data.json"), os.path.join(tmp, "data.json"))
    with open(os.path.join(tmp, "shape.json"), "w") as f:
        json.dump({"shape": shape, "family": family, "dtype": str(model.dtype),
                   "params": sum(p.numel() for p in model.parameters())}, f)
    os.replace(tmp, out)
    assert os.path.isdir(model_dir)
    return out


def row_jobs(row: Row, base: str, root: str, cycles: int, threads: int, py: str, peers: str, env: dict,
             trl_env: dict, plain: bool = False) -> dict:
    """The row's three entries as {label: (command, environment)}, in run_vs_peers.run_json's form;
    ``plain`` adds a fourth, "hybrid_ds plain": the same run as ``python -m hybrid_ds.train`` (one
    process without DeepSpeed, what a user runs on one process without a launcher)."""
    fp32 = build_unit(base, root, row.shape, bf16=False)
    peer = build_unit(base, root, row.shape, bf16=True) if row.bf16 else fp32
    n, L = str(cycles - 1), str(row.new)
    wrap = [py, "bench/peer_bf16.py"] if row.bf16 else [py]  # the peers' extra modules in bf16 too
    ours = [py, "bench/bench_hybrid.py", "--work", fp32, "--cycles", str(cycles), "--threads", str(threads)]
    ours += ["--bf16"] if row.bf16 else []
    lengths = [f"MAX_NEW_TOKENS={L}", f"MIN_NEW_TOKENS={L}"]
    extra = {"hybrid_ds plain": (ours + ["--launcher", "python"] + lengths, env)} if plain else {}
    return {
        "hybrid_ds": (ours + lengths, env),
        **extra,
        "floor": (wrap + [os.path.join(peers, "floor_bench.py"), "--iters", n, "--new", L], dict(env, PEER_WORK=peer)),
        "original": (wrap + [os.path.join(peers, "seed_trl011_hybrid.py"), "--cycles", n, "--gen", "per_prompt",
                      "--fixed-len", "--max-new-tokens", L], dict(trl_env, PEER_WORK=peer)),
    }


def peak_rss(rec: dict) -> dict:
    """Peak RSS MB per rank: hybrid_ds reports each rank's, a peer script its one process's."""
    r = rec["peak_rss_mb"]
    return r if isinstance(r, dict) else {"rank0": r}


def phase_split(rec: dict) -> dict:
    """Seconds per cycle by phase, as each script reports them."""
    if rec["bench"] == "floor":
        m = rec["median_s"]
        return {"gen": m["gen"], "ref": m["ref_fwd"], "old": m["old_fwd"], "4 x train": 4 * m["train_step"],
                "sft": m["sft_step"]}
    if rec["bench"] == "seed_trl011_hybrid":
        return dict(rec["s_per_cycle"])
    return dict(rec["median_s"])
