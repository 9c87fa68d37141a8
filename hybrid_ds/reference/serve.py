"""A reference rank's life (REF_PLACEMENT=separate): load the frozen reference (with REFS, every model
it lists, in its order: a request's k picks one), answer log-prob requests from its policy ranks (and
take the policy's weights into the run's own reference with REF_SYNC_EVERY) until they all shut down,
exit."""

from __future__ import annotations

import os

import torch

from hybrid_ds.config import Config
from hybrid_ds.config.batch_plan import BatchPlans
from hybrid_ds.config.refs import RefEntry, ref_entries
from hybrid_ds.engine.dist import peak_rss_mb
from hybrid_ds.models.policy_value import load_dtype, load_lm, load_tokenizer
from hybrid_ds.reference.protocol import RefServer, model_logprob_fn


def serve_reference(cfg: Config, placement, bridge) -> int:
    """The main loop of a reference rank; returns its exit code."""
    dev = torch.device("cuda", placement.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # Inference only: the reference computes in the run's precision (no autocast, no master weights here).
    precision = "bf16" if cfg.run.bf16 else "fp16" if cfg.run.fp16 else "no"
    dtype = load_dtype(cfg.model.torch_dtype, precision, deepspeed=True)
    # REFS (config/refs.py): its models in order, "policy" (model None) being MODEL; without REFS, MODEL alone
    entries = ref_entries(cfg) or [RefEntry(None, 1.0)]
    tokenizer = load_tokenizer(cfg.run.tokenizer or cfg.run.model)
    refs = [load_lm(e.model or cfg.run.model, tokenizer, dtype, cfg.model.attn_implementation).to(dev).eval()
            .requires_grad_(False) for e in entries]
    own = [m for m, e in zip(refs, entries) if e.model is None]  # the one REF_SYNC_EVERY moves, if listed
    # One request per client, each a training micro-batch at most: the same activation bound as colocated.
    # (forward_chunk counts prompts; each prompt has NUM_GENERATIONS rows)
    chunk = (len(bridge.clients) * BatchPlans.from_config(cfg, placement.policy_world).ppo.forward_chunk
             * cfg.ppo.num_generations)
    os.makedirs(cfg.run.output_dir, exist_ok=True)  # operators (and tests) find the process here
    with open(os.path.join(cfg.run.output_dir, f"reference-rank-{placement.rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    # REF_SYNC_EVERY: SYNC rounds mix the policy's weights into these (reference/weights.py)
    fns = [model_logprob_fn(m, chunk=chunk, device=dev) for m in refs]
    stats = RefServer(bridge, fns, weights=list(own[0].parameters()) if own else None).serve()
    print(f"[hybrid_ds] reference rank {placement.rank}: served {stats.requests} requests, took the policy's "
          f"weights {stats.syncs} time(s), peak_rss_mb {peak_rss_mb():.1f}", flush=True)
    return 0
