"""Build a hybrid_ds run inside the test process: one process, plain torch (no DeepSpeed), the
builtin tiny GPT-2. The run is the one ``python -m hybrid_ds.train`` builds (run.setup.build_run);
only the launcher is skipped. A build takes a few seconds."""

import json

import torch

from hybrid_ds.algorithms import ppo
from hybrid_ds.run.preflight import load_config


def base(tmp_path, mode="hybrid", **keys) -> dict:
    cfg = {"MODE": mode, "MODEL": "builtin:tiny-gpt2", "TRAIN_FILE": "builtin:demo-tasks",
           "OUTPUT_DIR": str(tmp_path / "out"), "SEED": 0, "SFT_BATCH": 8, "LR_SFT": 1e-3, "PPO_BATCH": 4,
           "PPO_MINI": 4, "PPO_EPOCHS": 1, "LR_PPO": 1e-3, "MAX_NEW_TOKENS": 6, "MIN_NEW_TOKENS": 2,
           "MAXSEQ": 96, "MAX_STEPS": 2, "SCHEDULER": "constant", "REWARD": {"type": "word_f1"}}
    cfg.update(keys)
    return cfg


def make_run(cfg: dict):
    """A ``run.state.Run`` for the config dict ``cfg``, as ``run.cli.run`` builds it on one process."""
    from hybrid_ds.engine.dist import init_dist
    from hybrid_ds.run.setup import build_run

    c = load_config(None, [f"{k}={json.dumps(v)}" for k, v in cfg.items()])
    dist = init_dist(c, sft_micro=c.sft.batch // c.sft.grad_accum, sft_accum=c.sft.grad_accum)
    return build_run(c, dist, c.run.seed)


def weights(run) -> dict:
    """A copy of the policy/value model's parameters."""
    return {k: v.detach().clone() for k, v in run.engine.module.state_dict().items()}


def changed(a: dict, b: dict, prefix: str) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))


def prepared_rollout(run, examples):
    """Steps 1-4 of ``ppo.ppo_update`` (rollout, scores, reference and old log-probs, advantages)."""
    cfg = run.cfg
    ro = ppo.generate(run, examples)
    ppo.score(run, ro, [e for e in examples for _ in range(cfg.ppo.num_generations)])
    ro.ref_logprobs, _ = ppo.forward_logprobs(run.ref, ro, cfg.gen.temperature, 64, with_values=False)
    if ro.logprobs is None:
        ro.logprobs, ro.values = ppo.forward_logprobs(run.engine, ro, cfg.gen.temperature, 64, with_values=True)
    ppo.compute_advantages(run, ro)
    return ro


def train(cfg: dict, tmp_path, name="cfg") -> None:
    """``python -m hybrid_ds.train`` on ``cfg`` in this process (its ``main``: validation, preflight,
    the run, the outputs), for tests whose point is what a run computes, not how it is launched:
    no interpreter start and imports per run."""
    from hybrid_ds.run.cli import main

    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    assert main([str(path)]) == 0, f"{name}: the run failed"


def full_forward_logprobs(model, ro, temperature: float) -> torch.Tensor:
    """Response log-probs ``(B, T)``, float64, of ``model`` on the rollout ``ro`` from one full forward of
    prompt + response (positions counted over real tokens), log_softmax of all logits / temperature,
    gathered at the response ids: the naive computation the reference paths are checked against."""
    ids = torch.cat([ro.query_ids, ro.response_ids], 1)
    att = torch.cat([ro.query_mask, ro.response_mask.long()], 1)
    pos = (torch.cumsum(att, 1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att, position_ids=pos).logits.double()
    P, T = ro.query_ids.shape[1], ro.response_ids.shape[1]
    lp = torch.log_softmax(logits[:, P - 1:P + T - 1] / temperature, -1)
    return lp.gather(2, ro.response_ids.unsqueeze(-1)).squeeze(-1)
