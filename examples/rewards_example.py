"""An example ``python`` reward (examples/python_reward.json): TRL's ``reward_funcs`` signature,
``fn(prompts, completions, **item_fields) -> list[float]``, one call per batch. The demo items
(hybrid_ds/assets/demo_tasks.json) hold ``task``, ``input`` and ``output``; they arrive as lists
aligned with the batch."""


def answer_words(prompts, completions, output, **item_fields):
    """Fraction of the reference answer's words (the item field ``output``) that the completion holds,
    in any order; a conversational completion is a one-message list."""
    scores = []
    for completion, reference in zip(completions, output):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        words = (reference or "").split()
        scores.append(sum(w in text.split() for w in words) / len(words) if words else 0.0)
    return scores
