"""What a PPO update shows of its samples: each REWARD component's mean (``reward/<name>``, a metric
every update) and, every LOG_SAMPLES_EVERY updates, a table of responses with their reward, its
components, KL and length (written by :mod:`hybrid_ds.run.samples`). No torch math here: the
rollout's tensors are read, never changed.
"""

from __future__ import annotations

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
