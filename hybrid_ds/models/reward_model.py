"""The reward model of MODE=rm: the causal LM's trunk with a scalar ``score`` head, saved as the family's
``ForSequenceClassification`` model (``AutoModelForSequenceClassification``), which the
``reward_model`` reward loads (docs/preference.md).

In training the head is :class:`~hybrid_ds.models.policy_value.PolicyValue`'s value head with no bias:
it reads the LM head's input, the trunk's final hidden state after its final norm, which is what a
``ForSequenceClassification`` model's ``score`` reads; the reward is its value at a sequence's last
non-pad token, where transformers' sequence classifiers pool. A Bradley-Terry loss cannot see a bias
(it cancels in ``r_chosen - r_rejected``), and ``score`` has none, so the saved model gives the very
scores of training.
"""

from __future__ import annotations

import os

import torch
from torch import nn


def score_head(lm: nn.Module, seed: int) -> nn.Linear:
    """A bias-free ``hidden -> 1`` head, initialised near zero from ``seed`` (every pair starts tied)."""
    hidden = lm.config.hidden_size if hasattr(lm.config, "hidden_size") else lm.config.n_embd
    head = nn.Linear(hidden, 1, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(seed)) * 1e-3)
    return head


def last_token_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)``: each right-padded row's value ``(B, L)`` at its last attended position."""
    last = attention_mask.long().sum(1).clamp(min=1) - 1
    return values.gather(1, last[:, None]).squeeze(1)


def save_reward_model(state: dict, lm_config, tokenizer, out_dir: str) -> None:
    """Write ``state`` (PolicyValue keys: the trunk under 'lm.', the head as 'v_head.weight') as a
    ``ForSequenceClassification`` model of ``lm_config``'s family with one label and the tokenizer's pad
    id, plus the tokenizer. Every trunk weight must land in it (the LM head is left out).

    The class is built on the meta device by its constructor only to read its parameter names, and the
    files are written directly: ``from_config`` or ``save_pretrained`` would start DeepSpeed's ZeRO-3
    partitioning (a collective) while only the main rank is here."""
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification

    config = type(lm_config).from_dict(lm_config.to_dict())
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    cls = AutoModelForSequenceClassification._model_mapping[type(config)]
    with torch.device("meta"):
        wanted = cls(config).state_dict()
    lm_sd = {k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")}
    sd = {k: lm_sd[k] for k in wanted if k in lm_sd}
    sd["score.weight"] = state["v_head.weight"].reshape(wanted["score.weight"].shape)
    missing = sorted(set(wanted) - set(sd))
    if missing:
        raise ValueError(f"reward model: the trunk's weights do not name {missing[:3]} of {cls.__name__}; "
                         f"this family cannot be saved as a sequence classifier")
    config.architectures = [cls.__name__]
    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(out_dir)
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)
