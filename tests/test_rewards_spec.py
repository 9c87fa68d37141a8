"""Reward specs: validation messages, light import, registry and generated docs."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_ds.rewards import (
    ALIASES,
    POSTPROCESS_TYPES,
    REWARD_TYPES,
    RewardSpecError,
    make_reward,
    validate_reward_spec,
)
from hybrid_ds.rewards.docs import EXAMPLES, render

ROOT = Path(__file__).resolve().parents[1]

SPEC_EXAMPLE = {"type": "weighted_sum",
                "components": [{"type": "cosine_sts", "weight": 0.6},
                               {"type": "perplexity", "model": "gpt2", "weight": 0.4}],
                "postprocess": [{"type": "clip", "min": 0, "max": 1}]}
# REWARD default of the SPEC, REWARD of examples/seed/ppo.json, REWARD of examples/seed/hybrid.json
SEED_SPECS = [{"type": "cosine_sts"}, {"type": "cosine_sts"}, SPEC_EXAMPLE]


@pytest.mark.parametrize("spec", SEED_SPECS + [s for _, s in EXAMPLES])
def test_seed_and_example_specs_are_valid(spec):
    assert validate_reward_spec(spec) == []


def test_import_and_validation_load_no_heavy_library():
    code = (
        "import sys, json\n"
        "from hybrid_ds.rewards import validate_reward_spec\n"
        f"specs = json.loads({json.dumps(json.dumps(SEED_SPECS))})\n"
        "assert all(validate_reward_spec(s) == [] for s in specs)\n"
        "heavy = ['torch', 'transformers', 'sentence_transformers', 'sacrebleu', 'rouge_score',\n"
        "         'numpy', 'detoxify', 'textstat', 'vaderSentiment', 'rapidfuzz']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


VALID_TYPES = ", ".join(sorted([*REWARD_TYPES, *ALIASES]))

BAD_SPECS = [
    ({"type": "blue"},
     [f"REWARD.type: unknown reward type 'blue'; did you mean 'bleu'? Valid: {VALID_TYPES}"]),
    ({"type": "zzz"}, [f"REWARD.type: unknown reward type 'zzz'. Valid: {VALID_TYPES}"]),
    ({"components": []}, [f"REWARD.type: missing; valid types: {VALID_TYPES}"]),
    ({"type": 3}, ["REWARD.type: must be a string, got integer 3"]),
    ("cosine_sts", ["REWARD: a reward spec must be a JSON object (dict), got string 'cosine_sts'"]),
    ({"type": "bleu", "smoth_method": "exp"},
     ["REWARD.smoth_method: unknown parameter for 'bleu'; did you mean 'smooth_method'? Valid: "
      "fallback, lowercase, on_error, postprocess, smooth_method, smooth_value, tokenize, type"]),
    ({"type": "bleu", "smooth_method": "expo"},
     ["REWARD.smooth_method: 'expo' is not one of 'exp', 'floor', 'add-k', 'none'; did you mean 'exp'?"]),
    ({"type": "rouge_l", "use_stemmer": "yes"}, ["REWARD.use_stemmer: must be a boolean, got string 'yes'"]),
    ({"type": "repetition", "n": 0}, ["REWARD.n: must be >= 1, got 0"]),
    ({"type": "distinct_n", "n": 2.0}, ["REWARD.n: must be an integer, got number 2.0"]),
    ({"type": "perplexity"}, ["REWARD.model: required parameter of 'perplexity' is missing"]),
    ({"type": "perplexity", "model": "gpt2", "mode": "inverted"},
     ["REWARD.mode: 'inverted' is not one of 'inverse', 'neg_log', 'raw'; did you mean 'inverse'?"]),
    ({"type": "weighted_sum", "components": []}, ["REWARD.components: must contain at least one component"]),
    ({"type": "weighted_sum"}, ["REWARD.components: required parameter of 'weighted_sum' is missing"]),
    ({"type": "weighted_sum", "components": {"type": "bleu"}},
     ["REWARD.components: must be a list of reward specs, got object {'type': 'bleu'}"]),
    ({"type": "weighted_sum", "components": [{"type": "bleu", "weight": -1}, {"type": "chrf", "weight": 1}]},
     ["REWARD.components[0].weight: must be >= 0, got -1"]),
    ({"type": "weighted_sum", "components": [{"type": "bleu", "weight": 0}, {"type": "chrf", "weight": 0.0}]},
     ["REWARD.components: weights sum to zero; give at least one component a positive weight"]),
    ({"type": "weighted_sum", "components": [{"type": "cosine_sts"}, {"type": "blue", "weight": 1}, 7]},
     [f"REWARD.components[1].type: unknown reward type 'blue'; did you mean 'bleu'? Valid: {VALID_TYPES}",
      "REWARD.components[2]: a reward spec must be a JSON object (dict), got integer 7"]),
    ({"type": "weighted_sum", "components": [{"type": "bleu", "weight": "1"}]},
     ["REWARD.components[0].weight: must be a number, got string '1'"]),
    ({"type": "bleu", "weight": 2}, ["REWARD.weight: only allowed inside weighted_sum components"]),
    ({"type": "weighted_sum", "components": [{"type": "bleu", "on_error": "fallback"}]},
     ["REWARD.components[0].on_error: only allowed on the root spec"]),
    ({"type": "bleu", "postprocess": {"type": "clip"}},
     ["REWARD.postprocess: must be a list of post-processors, got object {'type': 'clip'}"]),
    ({"type": "bleu", "postprocess": [{"type": "clamp", "max": 1}, {"type": "zzz"}]},
     ["REWARD.postprocess[0].type: unknown post-processor 'clamp'; did you mean 'clip'? "
      "Valid: clip, ema_normalize, scale",
      "REWARD.postprocess[1].type: unknown post-processor 'zzz'. Valid: clip, ema_normalize, scale"]),
    ({"type": "bleu", "postprocess": [{"type": "ema_normalise"}]},
     ["REWARD.postprocess[0].type: unknown post-processor 'ema_normalise'; did you mean "
      "'ema_normalize'? Valid: clip, ema_normalize, scale"]),
    ({"type": "bleu", "postprocess": [{"type": "ema_normalize", "decay": 1.0, "epsilon": 1e-6}]},
     ["REWARD.postprocess[0].decay: must be in (0, 1), got 1.0",
      "REWARD.postprocess[0].epsilon: unknown parameter for post-processor 'ema_normalize'; "
      "did you mean 'eps'? Valid: decay, eps, type"]),
    ({"type": "bleu", "postprocess": [{"type": "clip"}]}, ["REWARD.postprocess[0]: clip needs 'min' and/or 'max'"]),
    ({"type": "bleu", "postprocess": [{"type": "clip", "min": 1, "max": 0}]},
     ["REWARD.postprocess[0].min: min (1) is greater than max (0)"]),
    ({"type": "bleu", "postprocess": [{"type": "scale", "mul": float("nan")}]},
     ["REWARD.postprocess[0].mul: must be a finite number, got nan"]),
    ({"type": "length"}, ["REWARD: length needs 'target' or at least one of 'min'/'max'"]),
    ({"type": "length", "min": 9, "max": 3}, ["REWARD.min: min (9) is greater than max (3)"]),
    ({"type": "length", "unit": "tokens", "max": 3}, ["REWARD.tokenizer: required when unit is 'tokens'"]),
    ({"type": "format", "pattern": "([a-z]"},
     ["REWARD.pattern: invalid regular expression '([a-z]': missing ), unterminated subpattern at position 0"]),
    ({"type": "format"}, ["REWARD.pattern: required when mode is 'fullmatch'"]),
    ({"type": "sentiment", "backend": "vader", "target": "joy"},
     ["REWARD.target: backend 'vader' supports 'positive' or 'negative', got 'joy'"]),
    ({"type": "keyword_coverage", "keywords": ["a", 1]},
     ["REWARD.keywords: must be a list of strings, got list ['a', 1]"]),
    ({"type": "cosine_sts", "batch_size": 0, "devices": "cpu"},
     ["REWARD.batch_size: must be >= 1, got 0",
      "REWARD.devices: unknown parameter for 'cosine_sts'; did you mean 'device'? Valid: batch_size, "
      "device, fallback, max_length, model, on_error, postprocess, type"]),
    ({"type": "bleu", "on_error": "ignore", "fallback": 0},
     ["REWARD.on_error: 'ignore' is not one of 'raise', 'fallback'",
      "REWARD.fallback: only used with on_error 'fallback' (on_error is 'ignore')"]),
    ({"type": "bleu", "on_error": "fallback", "fallback": None},
     ["REWARD.fallback: must be a finite number, got None"]),
]


@pytest.mark.parametrize("spec,expected", BAD_SPECS, ids=[str(i) for i in range(len(BAD_SPECS))])
def test_bad_spec_messages(spec, expected):
    assert validate_reward_spec(spec) == expected


def test_all_problems_are_reported_at_once_with_custom_path():
    spec = {"type": "weighted_sum", "components": [{"type": "blue"}, {"type": "ter", "mode": "x"}],
            "postprocess": [{"type": "scale", "mull": 2}]}
    problems = validate_reward_spec(spec, path="CFG.REWARD")
    assert len(problems) == 3
    assert problems[0].startswith("CFG.REWARD.components[0].type: unknown reward type 'blue'")
    assert problems[1] == "CFG.REWARD.components[1].mode: 'x' is not one of 'clip', 'inverse'"
    assert problems[2].startswith("CFG.REWARD.postprocess[0].mull: unknown parameter for "
                                  "post-processor 'scale'; did you mean 'mul'?")


def test_make_reward_raises_all_problems_before_loading_anything():
    with pytest.raises(RewardSpecError) as err:
        make_reward({"type": "weighted_sum", "components": [{"type": "perplexity"}, {"type": "sts", "x": 1}]})
    assert len(err.value.problems) == 2
    assert "REWARD.components[0].model: required parameter" in str(err.value)
    with pytest.raises(RewardSpecError, match="make_reward\\(on_error='skip'\\)"):
        make_reward({"type": "bleu"}, on_error="skip")


def test_registry_is_consistent():
    for name, rtype in REWARD_TYPES.items():
        assert rtype.name == name and rtype.summary and rtype.range and rtype.direction
        assert (rtype.build is None) == (name in ("weighted_sum", "self_play"))  # combinators: build.py builds them
        names = [p.name for p in rtype.params]
        assert len(names) == len(set(names)), name
        for p in rtype.params:
            assert p.doc or p.name == "model", (name, p.name)
            if not p.required and p.default is not None:  # defaults satisfy their own checks
                assert validate_reward_spec({"type": name, p.name: p.default, **_required(name)}) == []
    assert ALIASES == {"sts": "cosine_sts"}
    assert set(POSTPROCESS_TYPES) == {"clip", "scale", "ema_normalize"}


def _required(name):
    return {"perplexity": {"model": "m"}, "reward_model": {"model": "m"}, "length": {"max": 3},
            "head": {"name": "h", "run_dir": "r"},
            "format": {"pattern": "x"}, "weighted_sum": {"components": [{"type": "bleu"}]}, "nli": {"model": "m"},
            "llm_judge": {"model": "m", "template": "{response}", "yes_token": "Y"},
            "self_play": {"judge": {"type": "bleu"}}}.get(name, {})


def test_committed_docs_match_the_registry():
    committed = (ROOT / "docs" / "rewards.md").read_text()
    assert committed == render(), "regenerate: python -m hybrid_ds.rewards.docs > docs/rewards.md"
    for name in REWARD_TYPES:
        assert f"### `{name}`" in committed
    blocks = re.findall(r"```json\n(.*?)\n```", committed, re.S)
    assert [json.loads(b) for b in blocks] == [spec for _, spec in EXAMPLES]
