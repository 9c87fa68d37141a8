"""The ``nli`` leaf: factual consistency as the entailment probability of the response by a premise.

A natural-language-inference cross-encoder reads (premise, hypothesis) = (the target or an item
field, the response) and gives a distribution over its labels; the score is the probability of
``label`` (SummaC, Laban et al. 2022, and TRUE, Honovich et al. 2022, score factual consistency
this way). sentence-transformers is imported by the builder only.
"""

from __future__ import annotations

import functools

from .models import dir_stamp, resolve_device
from .text import BatchFn


@functools.lru_cache(maxsize=None)
def _cached_cross_encoder(name: str, device: str, max_length: int | None, stamp: tuple = ()):
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(name, device=device, max_length=max_length)
    model.model.eval().requires_grad_(False)
    return model


def load_cross_encoder(name: str, device, max_length: int | None):
    """A sentence-transformers ``CrossEncoder`` (local dir or hub name), frozen in eval mode on
    ``device``; loaded once per process per (name, device, max_length), again only if a local dir's
    files change (``models.dir_stamp``, as ``models.load_causal_lm`` does). Callers must not change it."""
    return _cached_cross_encoder(name, str(device), max_length, dir_stamp(name))


def label_index(id2label: dict, label: str, model: str) -> int:
    """The output index of ``label`` (case-insensitive) in the model config's ``id2label``."""
    by_lower = {str(name).lower(): int(i) for i, name in id2label.items()}
    if label.lower() not in by_lower:
        raise ValueError(f"nli: label {label!r} is not a label of model {model!r}; its labels are "
                         f"{[id2label[i] for i in sorted(id2label)]}")
    return by_lower[label.lower()]


def premises(source: str, targets, items) -> list[str]:
    """The premise of each sample: its target (``source == "target"``) or ``item[source]``."""
    if source == "target":
        return [str(t) for t in targets]
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get(source), str):
            raise ValueError(f"nli: premise field {source!r} is missing from the item or not a string")
        out.append(item[source])
    return out


def build_nli(p: dict, ctx) -> BatchFn:
    """Softmax probability of ``label`` for (premise, response), ``batch_size`` pairs per forward."""
    model = load_cross_encoder(p["model"], resolve_device(p["device"], ctx.device), p["max_length"])
    id2label = getattr(model.model.config, "id2label", None) or {}
    if len(id2label) < 2:
        raise ValueError(f"nli: model {p['model']!r} has {len(id2label)} output label(s); an NLI "
                         f"cross-encoder has one per class (e.g. contradiction, entailment, neutral)")
    column = label_index(id2label, p["label"], p["model"])

    def score(responses, targets, prompts, items):
        import torch

        pairs = list(zip(premises(p["premise"], targets, items), responses))
        with torch.inference_mode():
            probs = model.predict(pairs, batch_size=p["batch_size"], apply_softmax=True,
                                  convert_to_numpy=True, show_progress_bar=False)
        return [float(row[column]) for row in probs]
    return score
