"""What a PPO update shows of its rollout (a ``ppo.Rollout``): the per-rank metrics of what it produced
(reward, KL, lengths, ENV dialogues), each REWARD component's mean (``reward/<name>``, a metric every
update) and, every LOG_SAMPLES_EVERY updates, a table of responses with their reward, its components,
KL and length (written by :mod:`hybrid_ds.run.samples`). The rollout's tensors are read, never changed.
"""

from __future__ import annotations

import torch

from hybrid_ds.algorithms import ppo_math as pm
from hybrid_ds.algorithms.context import PhaseContext
from hybrid_ds.data import Example


def component_metrics(components: dict | None) -> dict[str, float]:
    """Per-rank means of each REWARD component, ``{name: B scores}`` (reduced by the caller)."""
    return {f"reward/{name}": sum(v) / len(v) for name, v in (components or {}).items() if v}


def sample_rows(ro, examples: list[Example], n: int) -> list[dict]:
    """The first ``n`` responses of this rank's rollout (a ``ppo.Rollout``) as rows: prompt, response,
    reward and each component, the sequence's KL (summed over its tokens, as ``objective/kl``) and its
    length in tokens."""
    K = len(ro.texts) // max(len(examples), 1)  # NUM_GENERATIONS responses per prompt
    kl = (ro.kl * ro.response_mask).sum(1).tolist()
    lengths = ro.response_mask.sum(1).tolist()
    rows = []
    for i in range(min(n, len(ro.texts))):
        row = {"prompt": examples[i // K].prompt, "response": ro.texts[i], "reward": float(ro.scores[i])}
        row.update({f"reward/{name}": float(v[i]) for name, v in (ro.components or {}).items()})
        rows.append({**row, "kl": kl[i], "length": int(lengths[i])})
    return rows


def rollout_metrics(run: PhaseContext, ro) -> dict[str, float]:
    """Per-rank means of what the rollout produced (reduced by the caller)."""
    m = ro.response_mask
    lengths = m.sum(1)
    seq_kl = (ro.kl * m).sum(1)
    return {
        "ppo/reward_mean": float(ro.scores.mean()),
        "ppo/reward_std": float(ro.scores.std()) if ro.scores.numel() > 1 else 0.0,
        "objective/kl": float(seq_kl.mean()),
        "objective/score_minus_kl": float((ro.scores - run.kl_ctl.value * seq_kl).mean()),
        "ppo/response_len": float(lengths.mean()),
        "ppo/response_len_min": float(lengths.min()),
        "ppo/eos_frac": float(ro.ended.float().mean()),
        "ppo/empty_frac": float((lengths <= 1).float().mean()),  # collapse watch: EOS at once
        "ppo/advantage_mean": float(pm.masked_mean(ro.advantages, m)),
        **({"ppo/return_mean": float(pm.masked_mean(ro.returns, m))} if ro.returns is not None else {}),
        **({"ppo/value_mean_old": float(pm.masked_mean(ro.values, m))} if ro.values is not None else {}),
    }


def reference_kl_metrics(run: PhaseContext, ro) -> dict[str, float]:
    """REFS: per-rank means of each reference's KL per sequence, ``objective/kl/ref<k>`` in REFS order,
    unweighted, by the estimator of ``objective/kl`` (their weighted sum); {} without REFS."""
    if not run.cfg.ppo.refs:
        return {}
    m = ro.response_mask
    out = {}
    for k in range(ro.ref_logprobs.shape[1]):
        kl = pm.kl_penalty(ro.logprobs, ro.ref_logprobs[:, k], run.cfg.ppo.kl_estimator)
        out[f"objective/kl/ref{k}"] = float(torch.where(m != 0, kl * m, torch.zeros_like(kl)).sum(1).mean())
    return out


def dialogue_metrics(ro) -> dict[str, float]:
    """ENV: per-rank means of the policy's turns per dialogue and the dialogue's tokens (reduced by the caller)."""
    if ro.dialogues is None:
        return {}
    return {"ppo/turns": sum(len(d.turns) for d in ro.dialogues) / len(ro.dialogues),
            "ppo/dialogue_len": float(ro.response_attn.sum(1).mean()),
            "ppo/env_reward_mean": float(ro.env_rewards.sum(1).mean())}
