"""Cheap, exact rewards computed from the strings alone (no model, no heavy import).

Each ``build_*`` takes the resolved parameters of one spec node (defaults filled in) and the
build context, and returns a batch function ``(responses, targets, prompts, items) -> list[float]``.
The scoring helpers are pure functions of strings, tested against hand-computed values.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Callable, Sequence

BatchFn = Callable[[Sequence, Sequence, Sequence, Sequence], list]

_ARTICLES = frozenset({"a", "an", "the"})


# ---------------------------------------------------------------------------------------------
# Text normalisation shared by the word-level rewards


def words(text: str, lowercase: bool = True, remove_punctuation: bool = True,
          remove_articles: bool = False) -> list[str]:
    """Split ``text`` into words: ``\\w+`` runs when ``remove_punctuation`` else whitespace."""
    if lowercase:
        text = text.lower()
    tokens = re.findall(r"\w+", text) if remove_punctuation else text.split()
    if remove_articles:
        tokens = [t for t in tokens if t.lower() not in _ARTICLES]
    return tokens


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """All contiguous n-grams of ``tokens`` (empty when there are fewer than ``n`` tokens)."""
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def per_sample(fn: Callable[[str, str, object, object], float]) -> BatchFn:
    """Turn a per-sample scorer ``fn(response, target, prompt, item)`` into a batch function."""
    def score(responses, targets, prompts, items):
        return [fn(r, t, p, i) for r, t, p, i in zip(responses, targets, prompts, items)]
    return score


# ---------------------------------------------------------------------------------------------
# Pure scorers


def normalize_exact(text: str, strip: bool, lowercase: bool, collapse_whitespace: bool,
                    remove_punctuation: bool) -> str:
    """Normalise a string for exact comparison."""
    if lowercase:
        text = text.lower()
    if remove_punctuation:
        text = re.sub(r"[^\w\s]", "", text)
    if collapse_whitespace:
        text = " ".join(text.split())
    elif strip:
        text = text.strip()
    return text


def multiset_f1(pred: Sequence[str], ref: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token lists; 1.0 when both are empty, 0.0 when one is."""
    if not pred and not ref:
        return 1.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def jaccard(a: Sequence[str], b: Sequence[str]) -> float:
    """|A ∩ B| / |A ∪ B| of the two token sets; 1.0 when both are empty."""
    sa, sb = set(a), set(b)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def length_score(n: int, low: float | None, high: float | None, decay: float) -> float:
    """1.0 when ``low <= n <= high``; outside, ``exp(-d / (decay * max(bound, 1)))`` where ``d`` is
    the distance to the violated ``bound`` (so ``decay`` is a fraction of the bound)."""
    if low is not None and n < low:
        d, bound = low - n, low
    elif high is not None and n > high:
        d, bound = n - high, high
    else:
        return 1.0
    return math.exp(-d / (decay * max(bound, 1)))


def distinct_ratio(token_lists: Sequence[Sequence[str]], n: int) -> float:
    """Distinct n-grams / all n-grams pooled over ``token_lists``; 0.0 when there are none."""
    grams = [g for tokens in token_lists for g in ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def contains_sequence(tokens: Sequence[str], phrase: Sequence[str]) -> bool:
    """Whether ``phrase`` occurs as a contiguous run of ``tokens``."""
    k = len(phrase)
    return k > 0 and any(tuple(tokens[i:i + k]) == tuple(phrase) for i in range(len(tokens) - k + 1))


# ---------------------------------------------------------------------------------------------
# Builders


def build_exact_match(p: dict, ctx) -> BatchFn:
    """1.0 when the normalised response equals the normalised target, else 0.0."""
    def norm(text):
        return normalize_exact(text, p["strip"], p["lowercase"], p["collapse_whitespace"],
                               p["remove_punctuation"])
    return per_sample(lambda r, t, _p, _i: float(norm(r) == norm(t)))


def build_word_f1(p: dict, ctx) -> BatchFn:
    """Multiset word F1 between response and target (SQuAD-style token F1)."""
    def toks(text):
        return words(text, p["lowercase"], p["remove_punctuation"], p["remove_articles"])
    return per_sample(lambda r, t, _p, _i: multiset_f1(toks(r), toks(t)))


def build_jaccard(p: dict, ctx) -> BatchFn:
    """Jaccard similarity of the word sets of response and target."""
    def toks(text):
        return words(text, p["lowercase"], p["remove_punctuation"])
    return per_sample(lambda r, t, _p, _i: jaccard(toks(r), toks(t)))


def build_levenshtein(p: dict, ctx) -> BatchFn:
    """rapidfuzz normalised Levenshtein similarity (1 - distance / max length), chars or words."""
    from rapidfuzz.distance import Levenshtein

    def prep(text):
        text = text.lower() if p["lowercase"] else text
        return text.split() if p["level"] == "word" else text
    return per_sample(lambda r, t, _p, _i: float(Levenshtein.normalized_similarity(prep(r), prep(t))))


def build_length(p: dict, ctx) -> BatchFn:
    """1.0 inside the length window, decaying exponentially outside (see ``length_score``)."""
    low, high = (p["target"], p["target"]) if p["target"] is not None else (p["min"], p["max"])
    count = _length_counter(p["unit"], p["tokenizer"])
    return per_sample(lambda r, _t, _p, _i: length_score(count(r), low, high, p["decay"]))


def _length_counter(unit: str, tokenizer: str | None) -> Callable[[str], int]:
    if unit == "words":
        return lambda text: len(text.split())
    if unit == "chars":
        return len
    from transformers import AutoTokenizer  # unit == "tokens": load the tokenizer once

    tok = AutoTokenizer.from_pretrained(tokenizer)
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def build_format(p: dict, ctx) -> BatchFn:
    """1.0 when the response has the required format (regex or JSON), else 0.0."""
    if p["mode"] == "json":
        kinds = {"any": object, "object": dict, "array": list}
        want = kinds[p["json_type"]]
        return per_sample(lambda r, _t, _p, _i: float(_json_of_type(r, want)))
    flags = (re.IGNORECASE if p["ignore_case"] else 0) | (re.DOTALL if p["dotall"] else 0)
    regex = re.compile(p["pattern"], flags)
    match = regex.fullmatch if p["mode"] == "fullmatch" else regex.search

    def score(r, _t, _p, _i):
        return float(match(r.strip() if p["strip"] else r) is not None)
    return per_sample(score)


def _json_of_type(text: str, want: type) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, want)


def build_readability(p: dict, ctx) -> BatchFn:
    """textstat readability of the response mapped to [0, 1], higher = easier to read."""
    metric = _readability_metric(p["metric"], p["syllables"])
    if p["metric"] == "flesch_reading_ease":
        return per_sample(lambda r, _t, _p, _i: min(max(metric(r), 0.0), 100.0) / 100.0)
    grade_cap = p["max_grade"]
    return per_sample(lambda r, _t, _p, _i: 1.0 - min(max(metric(r), 0.0), grade_cap) / grade_cap)


def _readability_metric(metric: str, syllables: str) -> Callable[[str], float]:
    import textstat

    if metric != "flesch_reading_ease":
        return getattr(textstat, metric)
    if syllables == "auto":
        syllables = "cmudict" if _has_cmudict() else "pyphen"
    if syllables == "cmudict":
        return textstat.flesch_reading_ease
    import pyphen

    hyphenator = pyphen.Pyphen(lang="en_US")  # built once: loading the dictionary is the slow part
    return lambda text: _flesch_reading_ease_pyphen(text, hyphenator)


def _has_cmudict() -> bool:
    """Whether nltk's cmudict corpus is installed (textstat needs it for English syllables and
    would otherwise try to download it on every call)."""
    try:
        import nltk

        nltk.data.find("corpora/cmudict")
        return True
    except (ImportError, LookupError):
        return False


def _flesch_reading_ease_pyphen(text: str, hyphenator) -> float:
    """Flesch (1948) reading ease, 206.835 - 1.015 words/sentence - 84.6 syllables/word, with
    syllables estimated by pyphen's en_US hyphenation (textstat's fallback) instead of cmudict."""
    import textstat

    tokens = words(text, lowercase=True, remove_punctuation=True)
    sentences = textstat.sentence_count(text)
    if not tokens or not sentences:
        return 0.0
    syllables = sum(len(hyphenator.positions(w)) + 1 for w in tokens)
    return 206.835 - 1.015 * len(tokens) / sentences - 84.6 * syllables / len(tokens)


def build_distinct_n(p: dict, ctx) -> BatchFn:
    """Batch-level diversity: every sample gets distinct/total n-grams pooled over the batch."""
    def score(responses, targets, prompts, items):
        value = distinct_ratio([words(r, p["lowercase"], False) for r in responses], p["n"])
        return [value] * len(responses)
    return score


def build_repetition(p: dict, ctx) -> BatchFn:
    """1 - fraction of repeated n-grams within the response (1.0 when it has no n-gram)."""
    def score(r, _t, _p, _i):
        grams = ngrams(words(r, p["lowercase"], False), p["n"])
        return len(set(grams)) / len(grams) if grams else 1.0
    return per_sample(score)


def build_keyword_coverage(p: dict, ctx) -> BatchFn:
    """Fraction of keywords (``keywords``, ``item[item_field]`` or the target's distinct words)
    found in the response as whole-word phrases; 1.0 when there is nothing to cover."""
    def toks(text):
        return words(text, p["lowercase"], True)

    def score(r, t, _p, item):
        if p["keywords"] is not None:
            phrases = p["keywords"]
        elif p["item_field"] is not None:
            value = item[p["item_field"]]
            phrases = [value] if isinstance(value, str) else list(value)
        else:
            phrases = sorted(set(toks(t)))
        phrases = [toks(k) for k in phrases]
        phrases = [k for k in phrases if k]
        if not phrases:
            return 1.0
        response = toks(r)
        return sum(contains_sequence(response, k) for k in phrases) / len(phrases)
    return per_sample(score)
