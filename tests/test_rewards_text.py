"""Cheap exact leaves: hand-computed values, equality with the libraries called directly, and
batched scoring equal to per-sample scoring."""

import math

import pytest

from hybrid_ds.rewards import make_reward
from hybrid_ds.rewards.text import multiset_f1

RESPONSES = ["the cat sat on the mat", "The quick brown fox jumps.", "", "a b a b a b",
             '{"answer": 42}', "Hello,   World!", "completely unrelated words here"]
TARGETS = ["the cat is on the mat", "a quick brown dog jumps", "something", "a b c",
           '{"answer": 41}', "hello world", "the cat sat"]


def score(spec, response, target, **kw):
    return make_reward(spec)(response, target, **kw)


def test_bleu_identical_is_one_and_partial_equals_sacrebleu():
    import sacrebleu

    assert score({"type": "bleu"}, "the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert score({"type": "chrf"}, "the cat sat on the mat", "the cat sat on the mat") == 1.0
    for smooth in ("exp", "floor", "add-k", "none"):
        for lower in (False, True):
            spec = {"type": "bleu", "smooth_method": smooth, "lowercase": lower}
            direct = sacrebleu.sentence_bleu("The cat sat on a mat", ["the cat is on the mat"],
                                             smooth_method=smooth, lowercase=lower).score / 100
            assert score(spec, "The cat sat on a mat", "the cat is on the mat") == direct
    assert 0 < score({"type": "bleu"}, "the cat sat", "the cat is on the mat") < 1


def test_chrf_and_ter_equal_sacrebleu():
    import sacrebleu

    h, r = "the cat sat on a mat", "the cat is on the mat"
    assert score({"type": "chrf"}, h, r) == sacrebleu.sentence_chrf(h, [r]).score / 100
    assert score({"type": "chrf", "word_order": 2}, h, r) == \
        sacrebleu.sentence_chrf(h, [r], word_order=2).score / 100
    ter = sacrebleu.sentence_ter(h, [r]).score / 100  # 2 substitutions / 6 words
    assert ter == pytest.approx(2 / 6)
    assert score({"type": "ter"}, h, r) == pytest.approx(1 - 2 / 6)
    assert score({"type": "ter", "mode": "inverse"}, h, r) == pytest.approx(1 / (1 + 2 / 6))
    assert score({"type": "ter"}, h, h) == 1.0
    assert score({"type": "ter"}, "x y z w v u t s r q", "a b") == 0.0  # TER 5 clipped


def test_rouge_l_equals_rouge_score_and_respects_case():
    from rouge_score import rouge_scorer

    h, r = "The cats were sitting on mats", "the cat sat on the mat"
    for stem in (False, True):
        direct = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem).score(r, h)["rougeL"]
        assert score({"type": "rouge_l", "use_stemmer": stem}, h, r) == direct.fmeasure
        assert score({"type": "rouge_l", "use_stemmer": stem, "measure": "recall"}, h, r) == direct.recall
    assert score({"type": "rouge_l"}, "The Cat", "the cat") == 1.0
    assert score({"type": "rouge_l", "lowercase": False}, "The Cat", "the cat") == 0.0
    assert score({"type": "rouge_l", "lowercase": False}, "The cat", "The cat") == 1.0


def test_exact_match_normalisation():
    assert score({"type": "exact_match"}, "  Hello   World \n", "Hello World") == 1.0
    assert score({"type": "exact_match"}, "hello world", "Hello World") == 0.0
    assert score({"type": "exact_match", "lowercase": True}, "hello world", "Hello World") == 1.0
    assert score({"type": "exact_match", "collapse_whitespace": False}, " Hello  World ", "Hello World") == 0.0
    assert score({"type": "exact_match", "collapse_whitespace": False}, " Hello World ", "Hello World") == 1.0
    assert score({"type": "exact_match", "collapse_whitespace": False, "strip": False},
                 " Hello World", "Hello World") == 0.0
    assert score({"type": "exact_match", "remove_punctuation": True}, "Hello, World!", "Hello World") == 1.0


def test_word_f1_hand_computed():
    # common 3 (the, cat, sat); P = 3/3, R = 3/6 -> F1 = 2/3
    assert score({"type": "word_f1"}, "The cat sat!", "the cat sat on the mat") == pytest.approx(2 / 3)
    # multiset: "the" counted once in the overlap; P = 1/3, R = 1/2 -> F1 = 0.4
    assert multiset_f1(["the", "the", "the"], ["the", "cat"]) == pytest.approx(0.4)
    assert score({"type": "word_f1"}, "", "") == 1.0
    assert score({"type": "word_f1"}, "", "x") == 0.0
    assert score({"type": "word_f1", "remove_articles": True}, "a cat", "the cat") == 1.0
    assert score({"type": "word_f1", "lowercase": False}, "Cat", "cat") == 0.0


def test_jaccard_and_levenshtein_hand_computed():
    assert score({"type": "jaccard"}, "a b c c", "b c d") == pytest.approx(2 / 4)
    assert score({"type": "levenshtein"}, "kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert score({"type": "levenshtein", "level": "word"}, "a b c d", "a x c") == pytest.approx(1 - 2 / 4)
    assert score({"type": "levenshtein"}, "ABC", "abc") == 0.0
    assert score({"type": "levenshtein", "lowercase": True}, "ABC", "abc") == 1.0


def test_length_window_and_decay():
    spec = {"type": "length", "min": 3, "max": 5}
    assert score(spec, "a b c d", "") == 1.0
    assert score(spec, "a", "") == pytest.approx(math.exp(-2 / (0.5 * 3)))
    assert score(spec, "a b c d e f g", "") == pytest.approx(math.exp(-2 / (0.5 * 5)))
    assert score({"type": "length", "target": 4, "unit": "chars", "decay": 1.0}, "abcdef", "") == \
        pytest.approx(math.exp(-2 / 4))
    assert score({"type": "length", "max": 0}, "a b", "") == pytest.approx(math.exp(-2 / 0.5))


def test_format_regex_and_json():
    phone = {"type": "format", "pattern": r"\d{3}-\d{4}"}
    assert score(phone, " 555-1234\n", "") == 1.0
    assert score(phone, "call 555-1234", "") == 0.0
    assert score({**phone, "mode": "search"}, "call 555-1234", "") == 1.0
    assert score({"type": "format", "pattern": "yes", "ignore_case": True}, "YES", "") == 1.0
    assert score({"type": "format", "mode": "json"}, '{"a": [1, 2]}', "") == 1.0
    assert score({"type": "format", "mode": "json"}, "{a: 1}", "") == 0.0
    assert score({"type": "format", "mode": "json", "json_type": "array"}, '{"a": 1}', "") == 0.0
    assert score({"type": "format", "mode": "json", "json_type": "array"}, " [1] ", "") == 1.0


def test_readability():
    import pyphen
    import textstat

    from hybrid_ds.rewards.text import _flesch_reading_ease_pyphen

    # 6 one-syllable words, one sentence: 206.835 - 1.015 * 6 - 84.6 * 1
    en = pyphen.Pyphen(lang="en_US")
    assert _flesch_reading_ease_pyphen("The cat sat on the mat.", en) == pytest.approx(116.145)
    # 8 words, 2 sentences, 9 syllables (win-dow has two)
    assert _flesch_reading_ease_pyphen("The cat sat down. Open the window now.", en) == \
        pytest.approx(206.835 - 1.015 * 8 / 2 - 84.6 * 9 / 8)
    assert score({"type": "readability", "syllables": "pyphen"}, "The cat sat on the mat.", "") == 1.0
    hard = ("Notwithstanding considerable methodological heterogeneity, institutional "
            "administrators systematically underestimated organisational interdependencies.")
    assert score({"type": "readability", "syllables": "pyphen"}, hard, "") == 0.0
    ari = textstat.automated_readability_index(hard)
    assert score({"type": "readability", "metric": "automated_readability_index"}, hard, "") == \
        pytest.approx(1 - min(max(ari, 0), 20) / 20)


def test_distinct_n_is_batch_level():
    reward = make_reward({"type": "distinct_n", "n": 2})
    # bigrams: ab ba ab | ab bc -> 5 in all, 3 distinct
    assert reward.score_batch(["a b a b", "A b c"], ["", ""]) == [0.6, 0.6]
    assert reward("a b a b", "") == pytest.approx(2 / 3)
    assert reward("a", "") == 0.0


def test_repetition():
    reward = make_reward({"type": "repetition", "n": 2})
    assert reward("a b a b", "") == pytest.approx(2 / 3)
    assert reward("a b c d", "") == 1.0
    assert reward("a", "") == 1.0
    assert make_reward({"type": "repetition", "n": 1})("go go go go", "") == 0.25


def test_keyword_coverage_sources():
    fixed = {"type": "keyword_coverage", "keywords": ["cat", "big dog", "fish", "Dog big"]}
    assert score(fixed, "The cat and the BIG dog.", "") == pytest.approx(2 / 4)
    assert score({"type": "keyword_coverage"}, "a cat", "The cat") == pytest.approx(1 / 2)
    by_item = {"type": "keyword_coverage", "item_field": "kw"}
    assert score(by_item, "a mat", "", item={"kw": ["mat", "hat"]}) == 0.5
    assert score(by_item, "a mat", "", item={"kw": "a mat"}) == 1.0
    assert score({"type": "keyword_coverage"}, "anything", "!!") == 1.0


def test_vader_sentiment():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    compound = SentimentIntensityAnalyzer().polarity_scores("I love this, it is wonderful!")["compound"]
    pos = score({"type": "sentiment", "backend": "vader"}, "I love this, it is wonderful!", "")
    neg = score({"type": "sentiment", "backend": "vader", "target": "negative"},
                "I love this, it is wonderful!", "")
    assert pos == pytest.approx((compound + 1) / 2) and pos > 0.9
    assert neg == pytest.approx(1 - pos)
    assert score({"type": "sentiment", "backend": "vader"}, "This is awful and I hate it.", "") < 0.2


CHEAP_SPECS = [
    {"type": "bleu"}, {"type": "bleu", "smooth_method": "floor", "tokenize": "char"}, {"type": "chrf"},
    {"type": "ter"}, {"type": "rouge_l", "use_stemmer": True}, {"type": "rouge_l", "lowercase": False},
    {"type": "exact_match"}, {"type": "word_f1"}, {"type": "jaccard"}, {"type": "levenshtein"},
    {"type": "length", "min": 2, "max": 4}, {"type": "format", "pattern": r"\{.*\}"},
    {"type": "format", "mode": "json"}, {"type": "readability"}, {"type": "repetition"},
    {"type": "keyword_coverage"}, {"type": "sentiment", "backend": "vader"},
]


@pytest.mark.parametrize("spec", CHEAP_SPECS, ids=lambda s: s["type"])
def test_batched_equals_per_sample(spec):
    reward = make_reward(spec)
    batched = reward.score_batch(RESPONSES, TARGETS)
    assert batched == [reward(r, t) for r, t in zip(RESPONSES, TARGETS)]
    assert all(isinstance(s, float) and math.isfinite(s) for s in batched)


def _levenshtein(a, b):
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def _independent():
    """Per-sample values computed here, from the libraries or by hand, never through hybrid_ds."""
    import sacrebleu
    from rouge_score import rouge_scorer
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    vader = SentimentIntensityAnalyzer()
    return {
        "bleu": lambda h, r: sacrebleu.sentence_bleu(h, [r]).score / 100,
        "chrf": lambda h, r: sacrebleu.sentence_chrf(h, [r]).score / 100,
        "ter": lambda h, r: 1 - min(sacrebleu.sentence_ter(h, [r]).score / 100, 1.0),
        "rouge_l": lambda h, r: rouge.score(r.lower(), h.lower())["rougeL"].fmeasure,
        "exact_match": lambda h, r: float(" ".join(h.split()) == " ".join(r.split())),
        "levenshtein": lambda h, r: 1 - _levenshtein(h, r) / max(len(h), len(r), 1),
        "sentiment": lambda h, r: (vader.polarity_scores(h)["compound"] + 1) / 2,
    }


@pytest.mark.parametrize("spec", [{"type": "bleu"}, {"type": "chrf"}, {"type": "ter"},
                                  {"type": "rouge_l", "use_stemmer": True}, {"type": "exact_match"},
                                  {"type": "levenshtein"}, {"type": "sentiment", "backend": "vader"}],
                         ids=lambda s: s["type"])
def test_batched_scores_equal_independent_values(spec):
    expected = [_independent()[spec["type"]](h, r) for h, r in zip(RESPONSES, TARGETS)]
    assert make_reward(spec).score_batch(RESPONSES, TARGETS) == pytest.approx(expected, abs=1e-9)
