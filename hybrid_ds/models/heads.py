"""Task heads (HEADS): small linear heads on the shared trunk, trained with the SFT loss.

A head reads the LM head's input, as the value head does (:func:`hybrid_ds.models.policy_value.final_hidden`),
pooled at **the last token of prompt + target** (the EOS that ends the target). That position has
read the whole prompt and the whole response, so a head trained there judges a response, which is
what the ``head`` reward leaf (hybrid_ds/rewards/head.py) asks of it when it scores prompt + response
during PPO; the prompt's last token has seen no response and could only predict the label from
the prompt. It is also inside the SFT forward's labelled tail (``algorithms/sft.labelled_tail``:
the EOS is labelled), so the head costs no extra forward.

- classification: ``num_labels`` logits, cross-entropy; an item's label is an int in
  ``[0, num_labels)`` or one of the spec's ``labels`` names.
- regression: one number, squared error.

Items without the head's field add nothing to that head's loss. The heads are a submodule of
:class:`~hybrid_ds.models.policy_value.PolicyValue` (``task_heads``), so ZeRO shards them, the
checkpoints (``TrainEngine.save_state``) carry them and a resume restores them exactly, as for the
value head; ``build_param_groups`` gives them the role ``heads``.

Saved as ``OUTPUT_DIR/heads/``: ``heads.json`` (the specs and the hidden size) and one
``<name>.pt`` per head (its ``weight`` and ``bias``); :func:`load_heads` reads them back.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

HEADS_DIR = "heads"
SPEC_FILE = "heads.json"
PREFIX = "task_heads.heads."  # the heads' parameter names in PolicyValue's state dict


def out_features(spec: dict) -> int:
    return spec["num_labels"] if spec["type"] == "classification" else 1


class TaskHeads(nn.Module):
    """One ``nn.Linear(hidden, num_labels or 1)`` per spec, initialised near zero from ``seed``."""

    def __init__(self, specs: list[dict], hidden: int, seed: int = 0):
        super().__init__()
        self.specs = [dict(s) for s in specs]
        self.hidden = hidden
        g = torch.Generator().manual_seed(seed + 1)  # not the value head's stream (PolicyValue uses seed)
        self.heads = nn.ModuleDict()
        for s in self.specs:
            lin = nn.Linear(hidden, out_features(s))
            with torch.no_grad():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 1e-2)
                lin.bias.zero_()
            self.heads[s["name"]] = lin

    def forward(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pooled`` ``(B, C)`` -> ``{name: (B, num_labels)}`` logits or ``{name: (B,)}`` predictions, fp32."""
        out = {}
        for s in self.specs:
            lin = self.heads[s["name"]]
            y = lin(pooled.to(lin.weight.dtype)).float()
            out[s["name"]] = y if s["type"] == "classification" else y.squeeze(-1)
        return out


def attach_task_heads(model: nn.Module, specs: list[dict], seed: int = 0) -> Optional[TaskHeads]:
    """Give ``model`` (a PolicyValue) its ``task_heads`` for HEADS ``specs`` (none for ``[]``)."""
    if not specs:
        return None
    cfg = model.lm.config
    model.task_heads = TaskHeads(specs, cfg.hidden_size if hasattr(cfg, "hidden_size") else cfg.n_embd, seed)
    return model.task_heads


def task_heads_of(model: nn.Module) -> Optional[TaskHeads]:
    """``model``'s task heads, or None for a run without HEADS."""
    return model._modules.get("task_heads")


def untrained_heads_term(model: nn.Module):
    """0 x the task heads' outputs on a zero input (0.0 without heads): added to a loss that does not
    train them (PPO's), it puts every head parameter in the graph with a zero gradient, so DDP and
    ZeRO see each parameter's gradient every step, as SFT's ``0 x values`` does for the value head.
    The heads are called as modules, so ZeRO-3 gathers their partitions as in any forward (a bare
    ``p.sum()`` would read an empty partition). With lr 0 for the ``heads`` role
    (``build_param_groups``) the heads then stay bit-identical."""
    heads = task_heads_of(model)
    if heads is None:
        return 0.0
    zero = torch.zeros(1, heads.hidden, device=next(heads.parameters()).device)
    return 0.0 * sum(y.sum() for y in heads(zero).values())


def pool_last(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's hidden state at its last real token: ``hidden`` ``(B, K, C)`` holds the last ``K``
    of ``L`` positions of a right-padded batch with ``attention_mask`` ``(B, L)``. Returns ``(B, C)``."""
    B, K, _ = hidden.shape
    last = attention_mask.sum(1).long() - 1 - (attention_mask.shape[1] - K)
    if bool((last < 0).any()):
        raise ValueError("pool_last: a row's last token is outside the positions the forward kept")
    return hidden[torch.arange(B, device=hidden.device), last.to(hidden.device)]


def label_of(spec: dict, value, where: str):
    """An item's field value as the head's target: a class index or a float. ValueError names ``where``."""
    if spec["type"] == "regression":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: head {spec['name']!r} needs a number in field {spec['field']!r}, got {value!r}")
        return float(value)
    names = spec.get("labels") or []
    if isinstance(value, str) and value in names:
        return names.index(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < spec["num_labels"]:
        return value
    valid = f"one of {names}" if names else f"an int in [0, {spec['num_labels']})"
    raise ValueError(f"{where}: head {spec['name']!r} field {spec['field']!r}: {value!r} is not {valid}")


def label_problems(items: list[dict], specs: list[dict], limit: int = 3) -> list[str]:
    """Why HEADS cannot train on these items (checked before the run): a head whose ``field`` no item
    carries, or labels that do not fit their head (the first ``limit`` per head)."""
    problems = []
    for h, s in enumerate(specs):
        carried = [it[s["field"]] for it in items if it.get(s["field"]) is not None]
        if not carried:
            problems.append(f"HEADS[{h}].field: no item of TRAIN_FILE has field {s['field']!r}; name the field "
                            f"that holds the head's label.")
        bad = []
        for v in carried:
            try:
                label_of(s, v, "TRAIN_FILE")
            except ValueError as e:
                bad.append(str(e))
        problems += bad[:limit] + ([f"... and {len(bad) - limit} more such items"] if len(bad) > limit else [])
    return problems


def head_targets(items: list[dict], specs: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per head, ``(has (B,) bool, target (B,))`` for a batch's ``items``: whether the item carries the
    head's field, and its label (class index, long) or value (float); 0 where it has none. The
    preflight has checked every label (:func:`label_problems`)."""
    out = []
    for s in specs:
        has = [s["field"] in it and it[s["field"]] is not None for it in items]
        vals = [label_of(s, it[s["field"]], "an item") if h else 0
                for it, h in zip(items, has)]
        dtype = torch.long if s["type"] == "classification" else torch.float32
        out.append((torch.tensor(has, dtype=torch.bool), torch.tensor(vals, dtype=dtype)))
    return out


def head_loss_sums(outputs: dict[str, torch.Tensor], specs: list[dict],
                   targets: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``(H,)`` per-head loss summed over the items that carry the head's field: cross-entropy of the
    logits (classification) or squared error (regression). Items without the field enter with
    weight 0, so every head's parameters are in the graph (a zero gradient, never a missing one)."""
    sums = []
    for s, (has, y) in zip(specs, targets):
        pred = outputs[s["name"]]
        has, y = has.to(pred.device), y.to(pred.device)
        per = (F.cross_entropy(pred, y, reduction="none") if s["type"] == "classification"
               else (pred - y) ** 2)
        sums.append((per * has).sum())
    return torch.stack(sums)


def save_heads(state: dict, heads: TaskHeads, out_dir: str) -> None:
    """Write the heads of ``state`` (PolicyValue's keys, ``task_heads.heads.<name>.*``) to ``out_dir``:
    ``heads.json`` plus one ``<name>.pt`` per head."""
    os.makedirs(out_dir, exist_ok=True)
    for s in heads.specs:
        pre = f"{PREFIX}{s['name']}."
        sd = {k[len(pre):]: v.detach().float().cpu().clone() for k, v in state.items() if k.startswith(pre)}
        torch.save(sd, os.path.join(out_dir, f"{s['name']}.pt"))
    with open(os.path.join(out_dir, SPEC_FILE), "w") as f:
        json.dump({"hidden_size": heads.hidden, "pooling": "last_token", "heads": heads.specs}, f, indent=2)


def load_heads(path: str) -> TaskHeads:
    """The heads saved by :func:`save_heads` in ``path`` (an ``OUTPUT_DIR/heads/``), in float32."""
    with open(os.path.join(path, SPEC_FILE)) as f:
        meta = json.load(f)
    heads = TaskHeads(meta["heads"], meta["hidden_size"])
    for s in heads.specs:
        sd = torch.load(os.path.join(path, f"{s['name']}.pt"), map_location="cpu", weights_only=True)
        heads.heads[s["name"]].load_state_dict(sd)
    return heads.eval()
