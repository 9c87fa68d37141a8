"""The ``head`` reward leaf: a task head trained with HEADS (hybrid_ds/models/heads.py) scores responses.

It loads a run's trained trunk (``inference_lm/``) and one of its heads (``heads/<name>.pt`` with
``heads/heads.json``) and scores each prompt + response as the head was trained: prompt and
response tokenised separately, EOS appended, the trunk's final hidden state (the LM head's input,
``hidden_states[-1]``) read at that EOS. A classification head gives the probability of ``label``
(softmax over its logits), so a classifier trained on labels steers generation toward that label;
a regression head gives its prediction.

The files are read here with torch alone (the format :func:`hybrid_ds.models.heads.save_heads`
writes: ``heads.json`` and a ``{"weight", "bias"}`` state dict per head), because the rewards layer
does not import the models layer; tests/test_heads.py checks that this leaf and
:func:`hybrid_ds.models.heads.load_heads` give the same numbers.
"""

from __future__ import annotations

import json
import os

from .models import load_causal_lm, resolve_device, score_in_chunks
from .text import BatchFn

SPEC_FILE = "heads.json"  # models/heads.py's names of the files it writes
HEADS_DIR = "heads"
LM_DIR = "inference_lm"


def head_paths(p: dict) -> tuple[str, str]:
    """``(heads dir, trunk)`` of a leaf: ``run_dir``'s ``heads/`` and ``inference_lm/``, or ``path`` (a
    heads dir) with ``model`` (default: ``inference_lm/`` beside ``path``)."""
    if p.get("run_dir"):
        return os.path.join(p["run_dir"], HEADS_DIR), p.get("model") or os.path.join(p["run_dir"], LM_DIR)
    path = p["path"]
    return path, p.get("model") or os.path.join(os.path.dirname(os.path.normpath(path)), LM_DIR)


def check_head(spec: dict, path: str) -> list[str]:
    """Validation of a ``head`` leaf: exactly one of ``run_dir``/``path``; when the heads dir is there,
    the head ``name`` exists and ``label`` fits its type (checked again when it is built)."""
    if bool(spec.get("run_dir")) == bool(spec.get("path")):
        return [f"{path}: give exactly one of run_dir (a run's OUTPUT_DIR) or path (its heads/ directory)"]
    heads_dir, _ = head_paths(spec)
    f = os.path.join(heads_dir, SPEC_FILE)
    if not os.path.isfile(f):
        return []  # a run still to come (PPO after the SFT run that trains the head): checked at build
    try:
        _, problem = read_head_spec(heads_dir, spec.get("name"), spec.get("label"))
    except (OSError, ValueError) as e:
        return [f"{path}: {f} cannot be read ({e})"]
    return [f"{path}: {problem}"] if problem else []


def read_head_spec(heads_dir: str, name, label) -> tuple[dict, str | None]:
    """``(meta, problem)``: heads.json of ``heads_dir`` and why ``name``/``label`` do not fit it, or None."""
    with open(os.path.join(heads_dir, SPEC_FILE)) as f:
        meta = json.load(f)
    specs = {s["name"]: s for s in meta["heads"]}
    if name not in specs:
        return meta, f"name: no head {name!r} in {heads_dir} (heads: {', '.join(specs)})"
    s = specs[name]
    if s["type"] == "regression":
        return meta, (f"label: head {name!r} is a regression head; it scores its prediction, omit label"
                      if label is not None else None)
    if label_index(s, label) is None:
        names = s.get("labels") or []
        return meta, (f"label: head {name!r} needs label, one of {names} or an index in [0, {s['num_labels']}); "
                      f"got {label!r}")
    return meta, None


def label_index(spec: dict, label) -> int | None:
    """The class index of ``label`` (a label name, or an index as an int or a decimal string), or None."""
    names = spec.get("labels") or []
    if isinstance(label, str) and label in names:
        return names.index(label)
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < spec["num_labels"]:
        return label
    return None


def build_head(p: dict, ctx) -> BatchFn:
    """The batch function of a ``head`` leaf (module docstring)."""
    import torch

    heads_dir, trunk = head_paths(p)
    meta, problem = read_head_spec(heads_dir, p["name"], p["label"])
    if problem:
        raise ValueError(f"head reward: {problem}")
    spec = next(s for s in meta["heads"] if s["name"] == p["name"])
    device = resolve_device(p["device"], ctx.device)
    tok, model = load_causal_lm(trunk, device)
    state = torch.load(os.path.join(heads_dir, f"{p['name']}.pt"), map_location="cpu", weights_only=True)
    weight, bias = state["weight"].float().to(device), state["bias"].float().to(device)
    if weight.shape[1] != model.config.get_text_config().hidden_size:
        raise ValueError(f"head reward: head {p['name']!r} reads hidden size {weight.shape[1]}, the trunk {trunk!r} "
                         f"has {model.config.get_text_config().hidden_size}")
    cls = label_index(spec, p["label"]) if spec["type"] == "classification" else None
    pad_id = next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)
    limit = p["max_length"]

    def run(rows):  # rows: prompt + response + EOS ids, cut from the left to fit
        rows = [r[-limit:] for r in rows]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        last = hidden[torch.arange(len(rows), device=device), mask.sum(1) - 1].float()  # (B, C) at each EOS
        out = last @ weight.T + bias
        return (torch.softmax(out, -1)[:, cls] if cls is not None else out[:, 0]).tolist()

    def score(responses, targets, prompts, items):
        rows = []
        for q, r in zip(prompts, responses):
            if not isinstance(q, str):
                raise ValueError("head reward: needs the prompt as text (a plain item's rendered prompt)")
            rows.append(tok(q, add_special_tokens=False)["input_ids"] + tok(r, add_special_tokens=False)["input_ids"]
                        + [tok.eos_token_id])
        return score_in_chunks(run, rows, p["batch_size"])
    return score
