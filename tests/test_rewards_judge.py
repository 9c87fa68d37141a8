"""The ``llm_judge`` and ``python`` reward leaves.

The judge's scores are checked against a forward through AutoModelForCausalLM written out here, one
unpadded sample at a time (the leaf batches with left padding), for each score kind; the ``python``
leaf against the functions of tests/reward_fns.py, inside a weighted_sum and in a PPO step's scoring.
Tiny random-init models from tests/tiny_models.py; one built per module."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import reward_fns  # noqa: E402
from conftest import REPO  # noqa: E402
from hybrid_ds.config import ConfigError  # noqa: E402
from hybrid_ds.data.reference import chatml_tokenizer  # noqa: E402
from hybrid_ds.rewards import RewardError, make_reward, validate_reward_spec  # noqa: E402
from hybrid_ds.rewards.judge import parse_rating  # noqa: E402
from hybrid_ds.rewards.models import _cached_causal_lm, load_causal_lm  # noqa: E402
from tiny_models import tiny_model_dir  # noqa: E402

RESPONSES = ["c b a", "forest", "a much longer answer than the others"]
TARGETS = ["c b a", "rain", "short"]
PROMPTS = ["Reverse: a b c", "<policy's own rendering, not used>", "Say something"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "First word: forest rain"},
        {"role": "assistant", "content": "forest"}]
ITEMS = [{"input": "a b c", "output": "c b a"}, {"messages": CHAT}, None]
# What {prompt} stands for with each item: the prompt, or the conversational item's turns as text.
PROMPT_TEXTS = [PROMPTS[0], "System: Be brief.\n\nUser: First word: forest rain", PROMPTS[2]]
JUDGE = "Question: {prompt}\nReference: {target}\nAnswer: {response}\nCorrect? "
LOGLIK = "Question: {prompt}\nWrite the answer.\n"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny GPT-2 (no chat template), a tiny Llama whose tokenizer has the ChatML template of
    docs/data.md, and a GPT-2 rigged so that its greedy next token is always "7"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gpt2 = tiny_model_dir("gpt2")
    chat = tiny_model_dir("llama", make_tokenizer=chatml_tokenizer, tag="-chatml")
    tok = AutoTokenizer.from_pretrained(gpt2)
    model = AutoModelForCausalLM.from_pretrained(gpt2)
    seven = tok("7", add_special_tokens=False)["input_ids"]
    assert len(seven) == 1
    with torch.no_grad():  # the final LayerNorm outputs a constant: 7's embedding, so 7 has the top logit
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[seven[0]] * 50)
    rated = str(tmp_path_factory.mktemp("rated"))
    model.save_pretrained(rated)
    tok.save_pretrained(rated)
    return {"gpt2": gpt2, "chat": chat, "rated": rated}


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()


def rendered(template, i, response=None):
    values = {"prompt": PROMPT_TEXTS[i], "response": RESPONSES[i] if response is None else response,
              "target": TARGETS[i]}
    return template.format(**values)


def plain_ids(tok, text):
    return [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]


def chat_ids(tok, text):  # the ChatML template's user turn and the assistant's generation prompt, by hand
    full = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    return tok(full, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def next_logprobs(model, ids):
    return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)


@torch.no_grad()
def mean_loglik(model, context, resp):
    ids = torch.tensor([context + resp])
    lp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return sum(lp[len(context) + j - 1, t].item() for j, t in enumerate(resp)) / len(resp)


def score(spec, **kw):
    reward = make_reward(spec, device="cpu", **kw)
    return reward, reward.score_batch(RESPONSES, TARGETS, PROMPTS, ITEMS)


# ---------------------------------------------------------------------------------------------
# llm_judge: each score kind against a hand forward


def test_yes_prob_equals_a_hand_forward(dirs):
    tok, model = load(dirs["gpt2"])
    y, n = tok.convert_tokens_to_ids("Y"), tok.convert_tokens_to_ids("N")
    spec = {"type": "llm_judge", "model": dirs["gpt2"], "template": JUDGE, "yes_token": "Y", "batch_size": 2}
    _, raw = score(spec)
    _, normed = score({**spec, "no_token": "N"})
    lps = [next_logprobs(model, plain_ids(tok, rendered(JUDGE, i))) for i in range(3)]
    assert raw == pytest.approx([lp[y].exp().item() for lp in lps], abs=1e-5)
    assert normed == pytest.approx([(lp[y].exp() / (lp[y].exp() + lp[n].exp())).item() for lp in lps], abs=1e-5)
    assert len({round(s, 6) for s in raw}) == 3  # the rows differ: padding did not blur them


def test_yes_prob_uses_the_judges_chat_template_unless_turned_off(dirs):
    tok, model = load(dirs["chat"])
    assert tok.chat_template
    y = tok.convert_tokens_to_ids("Y")
    spec = {"type": "llm_judge", "model": dirs["chat"], "template": JUDGE, "yes_token": "Y", "batch_size": 3}
    _, templated = score(spec)
    _, plain = score({**spec, "chat_template": False})
    assert templated == pytest.approx(
        [next_logprobs(model, chat_ids(tok, rendered(JUDGE, i)))[y].exp().item() for i in range(3)], abs=1e-5)
    assert plain == pytest.approx(
        [next_logprobs(model, plain_ids(tok, rendered(JUDGE, i)))[y].exp().item() for i in range(3)], abs=1e-5)
    assert all(abs(a - b) > 1e-6 for a, b in zip(templated, plain))


@pytest.mark.parametrize("which", ["gpt2", "chat"])
def test_loglik_is_gptscore_by_hand(dirs, which):
    tok, model = load(dirs[which])
    spec = {"type": "llm_judge", "model": dirs[which], "template": LOGLIK, "score": "loglik", "batch_size": 2}
    _, scores = score(spec)
    context = chat_ids if which == "chat" else plain_ids
    hand = [mean_loglik(model, context(tok, rendered(LOGLIK, i)), tok(RESPONSES[i], add_special_tokens=False)["input_ids"])
            for i in range(3)]
    assert scores == pytest.approx(hand, abs=1e-5)
    assert all(s < 0 for s in scores)


def test_number_parses_the_greedy_rating(dirs):
    tok, model = load(dirs["rated"])
    with torch.no_grad():  # the rigged judge's greedy answer, by hand
        out = model.generate(torch.tensor([plain_ids(tok, rendered(JUDGE, 0))]), max_new_tokens=1, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, -1:]) == "7"
    spec = {"type": "llm_judge", "model": dirs["rated"], "template": JUDGE, "score": "number",
            "max_new_tokens": 1, "batch_size": 2}
    reward, scores = score(spec)
    assert scores == [7.0, 7.0, 7.0] and reward.pop_stats().get("reward/llm_judge/parse_failures", 0) == 0
    reward, scores = score({**spec, "max_score": 5, "default": -1.0})  # 7 is out of range: the default
    assert scores == [-1.0, -1.0, -1.0] and reward.pop_stats()["reward/llm_judge/parse_failures"] == 3


def test_number_on_a_random_judge_matches_generate_and_counts_failures(dirs):
    tok, model = load(dirs["gpt2"])
    hand = []
    for i in range(3):
        with torch.no_grad():
            ids = torch.tensor([plain_ids(tok, rendered(JUDGE, i))])
            out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        hand.append(parse_rating(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), 10))
    spec = {"type": "llm_judge", "model": dirs["gpt2"], "template": JUDGE, "score": "number",
            "max_new_tokens": 4, "default": 0.5, "batch_size": 3}
    reward, scores = score(spec)
    assert scores == [0.5 if h is None else h for h in hand]
    failures = sum(h is None for h in hand)
    assert reward.pop_stats().get("reward/llm_judge/parse_failures", 0) == failures


@pytest.mark.parametrize("text, expected", [("7", 7.0), ("Rating: 8/10", 8.0), (" 2.5 stars", 2.5), ("10", 10.0),
                                            ("0", None), ("11", None), ("great", None), ("", None)])
def test_parse_rating(text, expected):
    assert parse_rating(text, 10) == expected


def test_judges_of_one_model_share_one_load(dirs):
    _cached_causal_lm.cache_clear()
    spec = {"type": "weighted_sum", "components": [
        {"type": "llm_judge", "model": dirs["gpt2"], "template": JUDGE, "yes_token": "Y"},
        {"type": "llm_judge", "model": dirs["gpt2"], "template": LOGLIK, "score": "loglik"},
        {"type": "perplexity", "model": dirs["gpt2"]}]}
    make_reward(spec, device="cpu")
    info = _cached_causal_lm.cache_info()
    assert (info.misses, info.hits) == (1, 2)
    _, model = load_causal_lm(dirs["gpt2"], "cpu")
    assert _cached_causal_lm.cache_info().hits == 3
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_a_model_dir_written_again_is_loaded_again(dirs, tmp_path):
    import shutil

    path = str(tmp_path / "judge")
    shutil.copytree(dirs["gpt2"], path)
    first = load_causal_lm(path, "cpu")[1]
    assert load_causal_lm(path, "cpu")[1] is first and first.transformer.ln_f.weight.abs().sum() > 0
    shutil.copytree(dirs["rated"], path, dirs_exist_ok=True, copy_function=shutil.copy)  # saved again: new mtimes
    second = load_causal_lm(path, "cpu")[1]
    assert second is not first and second.transformer.ln_f.weight.abs().sum() == 0  # the rigged judge's


def test_a_yes_token_of_several_tokens_is_refused_at_build(dirs):
    with pytest.raises(ValueError, match=r"yes_token ' Yes' is 3 tokens .* give a string that is one token"):
        make_reward({"type": "llm_judge", "model": dirs["gpt2"], "template": JUDGE, "yes_token": " Yes"})


JUDGE_ERRORS = [
    ({"template": "Rate {answer}: {response}", "yes_token": "Y"},
     ["REWARD.template: unknown placeholder {answer}; valid: {prompt}, {response}, {target}"]),
    ({"template": LOGLIK + "{response}", "score": "loglik"},
     ["REWARD.template: score 'loglik' scores the response after the rendered template; remove {response} from it"]),
    ({"template": "Is {prompt} answered? ", "yes_token": "Y"},
     ["REWARD.template: score 'yes_prob' needs {response} in the template (the judge must see what it rates)"]),
    ({"template": JUDGE}, ["REWARD.yes_token: required when score is 'yes_prob'"]),
    ({"template": JUDGE, "score": "number", "no_token": "N"},
     ["REWARD.no_token: only used when score is 'yes_prob' (score is 'number')"]),
    ({"template": LOGLIK, "score": "loglik", "max_score": 5},
     ["REWARD.max_score: only used when score is 'number' (score is 'loglik')"]),
    ({"template": JUDGE, "score": "rating"}, ["REWARD.score: 'rating' is not one of 'yes_prob', 'number', 'loglik'"]),
    ({"template": JUDGE, "score": "number", "max_score": 1}, ["REWARD.max_score: must be >= 2, got 1"]),
    ({"yes_token": "Y"}, ["REWARD.template: required parameter of 'llm_judge' is missing"]),
]


@pytest.mark.parametrize("extra, expected", JUDGE_ERRORS)
def test_judge_validation_errors(extra, expected):
    assert validate_reward_spec({"type": "llm_judge", "model": "/models/judge", **extra}) == expected


def test_a_default_written_out_for_another_score_kind_is_accepted():
    assert validate_reward_spec({"type": "llm_judge", "model": "/m", "template": LOGLIK, "score": "loglik",
                                 "max_score": 10, "default": 0.0}) == []


def test_judge_without_a_model_is_refused():
    assert validate_reward_spec({"type": "llm_judge", "template": JUDGE, "yes_token": "Y"}) == [
        "REWARD.model: required parameter of 'llm_judge' is missing"]


# ---------------------------------------------------------------------------------------------
# python: TRL's reward_funcs signature


def test_python_leaf_is_called_once_per_batch_with_trl_arguments():
    reward_fns.CALLS.clear()
    items = [{"keywords": ["c", "a"], "output": "c b a"}, {"messages": CHAT, "keywords": ["forest"]},
             {"prompt": "Say something", "output": "short"}]
    spec = {"type": "weighted_sum", "components": [
        {"type": "python", "function": "reward_fns:keyword_hits", "weight": 3.0},
        {"type": "exact_match", "weight": 1.0}]}
    scores = make_reward(spec).score_batch(RESPONSES, TARGETS, PROMPTS, items)
    assert scores == pytest.approx([(3 * 1.0 + 1) / 4, (3 * 1.0 + 0) / 4, (3 * 0.0 + 0) / 4])
    assert len(reward_fns.CALLS) == 1
    call = reward_fns.CALLS[0]
    assert call["prompts"] == [PROMPTS[0], CHAT[:2], PROMPTS[2]]  # a conversational item: its turns
    assert call["completions"] == [RESPONSES[0], [{"role": "assistant", "content": RESPONSES[1]}], RESPONSES[2]]
    assert call["keywords"] == [["c", "a"], ["forest"], None]
    assert call["output"] == ["c b a", None, "short"] and call["messages"] == [None, CHAT, None]
    assert set(call) == {"prompts", "completions", "keywords", "output", "messages"}  # "prompt" is prompts


def test_python_leaf_scores_a_ppo_batch(tmp_path):
    from hybrid_ds.algorithms import ppo
    from inproc import base, make_run

    reward_fns.CALLS.clear()
    run = make_run(base(tmp_path, mode="ppo", REWARD={"type": "python", "function": "reward_fns:length_per_answer"}))
    examples = run.examples[:2]
    ro = ppo.generate(run, examples)
    ppo.score(run, ro, examples)
    (call,) = reward_fns.CALLS
    assert call["completions"] == ro.texts and call["prompts"] == [e.prompt for e in examples]
    assert call["output"] == [e.item["output"] for e in examples] and call["task"] == [e.item["task"] for e in examples]
    hand = [len(t) / (len(e.item["output"]) + 1) for t, e in zip(ro.texts, examples)]
    assert ro.scores.tolist() == pytest.approx(hand) and any(s > 0 for s in hand)


# The batch call fails, so the leaf retries each sample alone (docs/rewards.md, Faults): the error is
# that of the first sample that fails alone.
BAD_RETURNS = [("one_short", 0, "returned 0 scores for 1 samples"),
               ("not_finite", 1, "returned nan as a score; every score must be a finite number"),
               ("not_a_list", 0, "returned str, not a list of floats \\(one per sample\\)"),
               ("raises", 0, "raised KeyError: 'solution'")]


@pytest.mark.parametrize("name, index, message", BAD_RETURNS)
def test_python_bad_returns_name_the_function(name, index, message):
    responses = ["ok", "bad", "ok", "ok"]
    reward = make_reward({"type": "python", "function": f"reward_fns:{name}"})
    with pytest.raises(RewardError, match=f"reward 'python' failed on sample {index} .*: ValueError: "
                                          f"python reward reward_fns:{name} {message}"):
        reward.score_batch(responses, responses)
    reward = make_reward({"type": "python", "function": f"reward_fns:{name}", "on_error": "fallback",
                          "fallback": -2.0})
    scores = reward.score_batch(responses, responses)
    faulted = [s == -2.0 for s in scores]
    assert faulted == ([False, True, False, False] if name == "not_finite" else [True] * 4)
    assert reward.pop_stats()["reward/faults/python"] == sum(faulted)


def test_python_leaf_passes_prompts_in_kwargs_when_not_named():
    reward = make_reward({"type": "python", "function": "reward_fns:prompt_length"})
    assert reward.score_batch(["abcd"], ["x"], ["ab"], [None]) == [2.0]


PY_ERRORS = [
    ("reward_fns", "'reward_fns': give package.module:name (a Python function to import)"),
    ("reward_fns:keyword_hits()", "'reward_fns:keyword_hits()': give package.module:name"),
    ("no_such_module_here:f", "'no_such_module_here:f': cannot import no_such_module_here (ModuleNotFoundError"),
    ("reward_fns:missing", "'reward_fns:missing': module reward_fns has no attribute 'missing'"),
    ("reward_fns:NOT_CALLABLE", "'reward_fns:NOT_CALLABLE': reward_fns.NOT_CALLABLE is a int, not a function"),
    ("reward_fns:no_kwargs", "'reward_fns:no_kwargs': no_kwargs(prompts, completions) cannot be called as "
                             "fn(prompts, completions, **item_fields): it needs a **kwargs parameter"),
    ("reward_fns:positional_only", "'reward_fns:positional_only': positional_only(prompts, completions, /, "
                                   "**kwargs) has the positional-only parameter 'prompts'"),
]


@pytest.mark.parametrize("function, message", PY_ERRORS)
def test_python_validation_errors(function, message):
    spec = {"type": "weighted_sum", "components": [{"type": "exact_match"},
                                                   {"type": "python", "function": function}]}
    (problem,) = validate_reward_spec(spec)
    assert problem.startswith(f"REWARD.components[1].function: {message}"), problem


def test_python_validation_needs_a_function_string():
    assert validate_reward_spec({"type": "python"}) == ["REWARD.function: required parameter of 'python' is missing"]
    assert validate_reward_spec({"type": "python", "function": 3}) == ["REWARD.function: must be a string, got integer 3"]


def test_an_item_field_that_clashes_with_an_argument_is_an_error():
    reward = make_reward({"type": "python", "function": "reward_fns:keyword_hits"})
    with pytest.raises(RewardError, match="python reward reward_fns:keyword_hits: item field 'completions' would clash"):
        reward.score_batch(["a"], ["a"], ["p"], [{"completions": 1}])


# ---------------------------------------------------------------------------------------------
# the examples and the CLI


def test_bad_reward_specs_are_config_errors_naming_the_path(tmp_path, monkeypatch):
    from hybrid_ds.run.preflight import load_config

    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError) as e:
        load_config("examples/python_reward.json", [f"OUTPUT_DIR={tmp_path}/o", 'REWARD={"type": "weighted_sum", '
                    '"components": [{"type": "python", "function": "examples.rewards_example:nope"}, '
                    '{"type": "llm_judge", "model": "builtin:tiny-gpt2", "template": "{question} {response}", '
                    '"yes_token": "Y"}]}'])
    text = str(e.value)
    assert "REWARD.components[0].function: 'examples.rewards_example:nope': module examples.rewards_example " \
           "has no attribute 'nope'" in text
    assert "REWARD.components[1].template: unknown placeholder {question}" in text


@pytest.mark.parametrize("name", ["judge.json", "python_reward.json"])
def test_examples_dry_run_and_their_rewards_build_and_score(name, tmp_path, monkeypatch, capsys):
    import json

    from hybrid_ds.run.cli import main

    monkeypatch.chdir(REPO)
    main([f"examples/{name}", f"OUTPUT_DIR={tmp_path}/o", "--dry-run"])
    assert "PPO batch" in capsys.readouterr().out
    with open(os.path.join(REPO, "examples", name)) as f:
        spec = json.load(f)["REWARD"]
    reward = make_reward(spec, device="cpu")
    scores = reward.score_batch(["forest", "c b a"], ["forest", "a b c"], ["first: forest rain", "reverse: a b c"],
                                [{"task": "first", "input": "forest rain", "output": "forest"},
                                 {"task": "reverse", "input": "a b c", "output": "a b c"}])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)
    if name == "python_reward.json":  # answer_words: 1 for both (all reference words present); length: 1
        assert scores == pytest.approx([1.0, 1.0])


def test_a_trl_reward_function_runs_unchanged_on_conversational_items():
    pytest.importorskip("trl")
    reward = make_reward({"type": "python", "function": "trl.rewards:think_format_reward"})
    responses = ["<think>\nstep\n</think>\nforest", "forest"]
    items = [{"messages": CHAT}, {"messages": CHAT}]
    assert reward.score_batch(responses, ["forest"] * 2, ["<rendered>"] * 2, items) == [1.0, 0.0]
