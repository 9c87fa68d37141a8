"""The ``llm_judge`` reward leaf: a local causal LM asked about each response.

The judge reads its ``template`` with ``{prompt}``, ``{response}`` and ``{target}`` filled in (as the
user turn of its own chat template when its tokenizer has one, else after BOS) and scores in one of
three ways:

- ``yes_prob``: the probability of ``yes_token`` as the next token (LLM-as-a-judge, Zheng et al. 2023,
  "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena"); with ``no_token``, normalised against it,
  ``p(yes) / (p(yes) + p(no))``.
- ``number``: the first number of a short greedy answer, a rating in ``[1, max_score]``; an answer
  without one in range is scored ``default`` and counted as ``reward/llm_judge/parse_failures``.
- ``loglik``: GPTScore (Fu et al. 2023, "GPTScore: Evaluate as You Desire"), the judge's mean token
  log-likelihood of the response after the rendered template.

The model is loaded once per process (:func:`~hybrid_ds.rewards.models.load_causal_lm`), frozen, and
run in chunks of ``batch_size`` under ``torch.inference_mode()``; log-probs come from an fp32
log-softmax. Next-token positions are read from left-padded batches with positions counted from each
row's first real token, so a row scores as it would alone.
"""

from __future__ import annotations

import inspect
import re

from .models import chat_history, load_causal_lm, mean_token_nll, resolve_device, score_in_chunks
from .text import BatchFn

PLACEHOLDERS = ("prompt", "response", "target")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
# Parameters of one score kind, and their defaults (the registry's); another value with another kind is a mistake.
SCORE_ONLY = {"yes_token": "yes_prob", "no_token": "yes_prob", "max_score": "number", "default": "number",
              "max_new_tokens": "number"}
DEFAULTS = {"yes_token": None, "no_token": None, "max_score": 10, "default": 0.0, "max_new_tokens": 8}
PARSE_FAILURES = "reward/llm_judge/parse_failures"


def check_llm_judge(spec: dict, path: str) -> list[str]:
    """Validation of an ``llm_judge`` leaf: the template's placeholders, what each score kind needs,
    and parameters given for another score kind."""
    template, kind = spec.get("template"), spec.get("score", "yes_prob")
    problems = []
    if isinstance(template, str):
        for name in dict.fromkeys(_PLACEHOLDER.findall(template)):
            if name not in PLACEHOLDERS:
                problems.append(f"{path}.template: unknown placeholder {{{name}}}; valid: "
                                + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS))
        has_response = "{response}" in template
        if kind == "loglik" and has_response:
            problems.append(f"{path}.template: score 'loglik' scores the response after the rendered template; "
                            f"remove {{response}} from it")
        if kind in ("yes_prob", "number") and not has_response:
            problems.append(f"{path}.template: score {kind!r} needs {{response}} in the template (the judge "
                            f"must see what it rates)")
    if kind == "yes_prob" and spec.get("yes_token") is None:
        problems.append(f"{path}.yes_token: required when score is 'yes_prob'")
    for key, owner in SCORE_ONLY.items():  # a default value written out changes nothing: not a mistake
        if key in spec and spec[key] != DEFAULTS[key] and kind != owner and isinstance(kind, str):
            problems.append(f"{path}.{key}: only used when score is {owner!r} (score is {kind!r})")
    return problems


def render_template(template: str, prompt: str, response: str, target: str) -> str:
    """``template`` with each ``{prompt}``/``{response}``/``{target}`` replaced in one pass (a response
    holding ``{target}`` stays as written); other text, braces included, is kept."""
    values = {"prompt": prompt, "response": response, "target": target}
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def prompt_text(prompt: str | None, item) -> str:
    """What ``{prompt}`` stands for: the prompt, or, for a conversational item, its turns before the
    response (one turn: its content; several: ``Role: content`` paragraphs), not the policy's
    chat-template rendering of them."""
    history = chat_history(prompt, item)
    if len(history) == 1:
        return history[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in history)


def parse_rating(text: str, max_score: int) -> float | None:
    """The first number in ``text`` when it lies in ``[1, max_score]``, else None."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    value = float(match.group(0))
    return value if 1 <= value <= max_score else None


def single_token(tok, text: str, key: str, model: str) -> int:
    """The id of ``text`` when the judge's tokenizer makes it exactly one token."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"llm_judge: {key} {text!r} is {len(ids)} tokens for {model!r} "
                         f"({tok.convert_ids_to_tokens(ids)}); give a string that is one token")
    return ids[0]


def left_padded(rows: list[list[int]], pad_id: int, device):
    """``input_ids``, ``attention_mask`` and ``position_ids`` ``(B, T)`` of left-padded rows; positions
    count from each row's first real token (pads get 0)."""
    import torch

    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, T - len(r):] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def build_llm_judge(p: dict, ctx) -> BatchFn:
    """The batch function of an ``llm_judge`` leaf (module docstring)."""
    import torch

    device = resolve_device(p["device"], ctx.device)
    tok, model = load_causal_lm(p["model"], device)
    templated = p["chat_template"] and bool(getattr(tok, "chat_template", None))
    pad_id = next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)
    limit = p["max_length"]
    # Only the last position's logits are read: ask for those alone where the model allows (a 150k
    # vocabulary times 1024 positions is gigabytes per batch otherwise).
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def context_ids(prompt, response, target, item) -> list[int]:
        text = render_template(p["template"], prompt_text(prompt, item), response, target or "")
        if templated:  # the rendered text is the user's turn; the judge answers as the assistant
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
            return tok(text, add_special_tokens=False)["input_ids"]
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        return bos + tok(text, add_special_tokens=False)["input_ids"]

    def next_token_logprobs(rows):  # (B, V) fp32 log-softmax after each row's last token
        ids, mask, pos = left_padded([r[-limit:] for r in rows], pad_id, device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **last_only).logits[:, -1].float()
        return torch.log_softmax(logits, dim=-1)

    if p["score"] == "yes_prob":
        yes = single_token(tok, p["yes_token"], "yes_token", p["model"])
        no = single_token(tok, p["no_token"], "no_token", p["model"]) if p["no_token"] is not None else None

        def run(rows):
            lp = next_token_logprobs(rows)
            if no is None:
                return lp[:, yes].exp().tolist()
            return torch.sigmoid(lp[:, yes] - lp[:, no]).tolist()  # p(yes) / (p(yes) + p(no))
    elif p["score"] == "number":
        def run(rows):
            ids, mask, _ = left_padded([r[-limit:] for r in rows], pad_id, device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=p["max_new_tokens"],
                                 do_sample=False, pad_token_id=pad_id)
            answers = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            ratings = [parse_rating(a, p["max_score"]) for a in answers]
            for r in ratings:
                if r is None:
                    ctx.faults.note(PARSE_FAILURES)
            return [p["default"] if r is None else r for r in ratings]
    else:
        def run(rows):  # rows: (context ids, response ids); the context is cut from the left to fit
            seqs = []
            for context, resp in rows:
                resp = resp[:limit]
                context = context[max(0, len(context) + len(resp) - limit):]
                seqs.append((context + resp, len(context)))
            return [-n for n in mean_token_nll(model, seqs, device)]  # NaN (no response token) stays NaN: a fault

    def score(responses, targets, prompts, items):
        if p["score"] == "loglik":
            rows = [(context_ids(q, "", t, it), tok(r, add_special_tokens=False)["input_ids"])
                    for r, t, q, it in zip(responses, targets, prompts, items)]
        else:
            rows = [context_ids(q, r, t, it) for r, t, q, it in zip(responses, targets, prompts, items)]
        return score_in_chunks(run, rows, p["batch_size"])
    return score
