"""Reference-based MT/summarisation metrics: sacrebleu (BLEU, chrF, TER) and rouge_score (ROUGE-L).

All scores are sentence-level, computed against the single target string, and scaled to [0, 1]
with higher = closer to the target. The libraries are imported when a reward is built.
"""

from __future__ import annotations

import re

from .text import BatchFn, per_sample


def build_bleu(p: dict, ctx) -> BatchFn:
    """sacrebleu sentence BLEU (effective order, as ``sacrebleu.sentence_bleu``) / 100, capped at 1
    (sacrebleu returns 100.00000000000004 for some identical pairs)."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU(smooth_method=p["smooth_method"], smooth_value=p["smooth_value"],
                lowercase=p["lowercase"], tokenize=p["tokenize"], effective_order=True)
    return per_sample(lambda r, t, _p, _i: min(bleu.sentence_score(r, [t]).score / 100.0, 1.0))


def build_chrf(p: dict, ctx) -> BatchFn:
    """sacrebleu sentence chrF (chrF++ when ``word_order`` is 2) / 100, capped at 1."""
    from sacrebleu.metrics import CHRF

    chrf = CHRF(char_order=p["char_order"], word_order=p["word_order"], beta=p["beta"],
                lowercase=p["lowercase"], whitespace=p["whitespace"])
    return per_sample(lambda r, t, _p, _i: min(chrf.sentence_score(r, [t]).score / 100.0, 1.0))


def ter_to_reward(ter: float, mode: str) -> float:
    """Map a translation edit rate (0 = identical, unbounded above) to a higher-is-better reward:
    ``"clip"``: ``1 - min(ter, 1)`` in [0, 1]; ``"inverse"``: ``1 / (1 + ter)`` in (0, 1]."""
    return 1.0 - min(ter, 1.0) if mode == "clip" else 1.0 / (1.0 + ter)


def build_ter(p: dict, ctx) -> BatchFn:
    """sacrebleu sentence TER (edits / reference words), mapped by ``ter_to_reward``."""
    from sacrebleu.metrics import TER

    ter = TER(normalized=p["normalized"], no_punct=p["no_punct"], asian_support=p["asian_support"],
              case_sensitive=p["case_sensitive"])
    return per_sample(lambda r, t, _p, _i: ter_to_reward(ter.sentence_score(r, [t]).score / 100.0,
                                                          p["mode"]))


class CasePreservingTokenizer:
    """rouge_score-compatible tokenizer that keeps case: alphanumeric runs, optional Porter stems
    for words longer than 3 characters (as rouge_score's default tokenizer does)."""

    def __init__(self, use_stemmer: bool):
        self._stemmer = None
        if use_stemmer:
            from nltk.stem import porter

            self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        tokens = re.sub(r"[^A-Za-z0-9]+", " ", text).split()
        if self._stemmer is not None:
            tokens = [self._stemmer.stem(t, to_lowercase=False) if len(t) > 3 else t for t in tokens]
        return tokens


def build_rouge_l(p: dict, ctx) -> BatchFn:
    """rouge_score ROUGE-L (longest common subsequence) ``measure`` of response vs target."""
    from rouge_score import rouge_scorer

    tokenizer = None if p["lowercase"] else CasePreservingTokenizer(p["use_stemmer"])
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=p["use_stemmer"], tokenizer=tokenizer)
    return per_sample(lambda r, t, _p, _i: getattr(scorer.score(t, r)["rougeL"], p["measure"]))
