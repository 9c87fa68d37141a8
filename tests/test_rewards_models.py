"""Model-backed leaves on tiny models built in the test (random init) or the packaged MiniLM,
compared with calling the model directly; batched scoring equals per-sample scoring."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import rewards_helpers as helpers  # noqa: E402

from hybrid_ds.rewards import RewardError, make_reward  # noqa: E402

import torch  # noqa: E402  (hard dependencies: missing, the module fails rather than skips)
import transformers  # noqa: E402,F401

RESPONSES = ["I love this movie, it is wonderful", "the cat sat on the mat", "terrible and sad",
             "a quick brown fox jumps over the lazy dog and the cat", "ok"]
TARGETS = ["the film was great", "the cat is on the mat", "I hate this film",
           "a fast brown fox leaps over a lazy dog", "fine"]
PROMPTS = ["Review:", None, "Say something:", "Describe the scene.", ""]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Paths of the tiny local models, built once for this module."""
    root = tmp_path_factory.mktemp("tiny_models")
    ckpt, detox_hf = helpers.build_tiny_detoxify_checkpoint(root / "detox")
    # like the released checkpoints: the base model is a hub name, unreachable here
    hub_ckpt, _ = helpers.build_tiny_detoxify_checkpoint(root / "detox", model_type="bert-base-uncased")
    return {
        "sentiment": helpers.build_tiny_bert_classifier(root / "sent", ["NEGATIVE", "POSITIVE"]),
        "bert3": helpers.build_tiny_bert_classifier(root / "bert3", ["a", "b", "c"], seed=1),
        "encoder": helpers.build_tiny_bert_encoder(root / "enc"),
        "gpt2": helpers.build_tiny_gpt2(root / "gpt2"),
        "gpt2_rm": helpers.build_tiny_gpt2(root / "gpt2_rm", num_labels=1, seed=2),
        "detox_ckpt": ckpt, "detox_hf": detox_hf, "detox_hub_ckpt": hub_ckpt,
    }


def assert_batched_equals_per_sample(reward, prompts=None, tol=1e-5):
    batched = reward.score_batch(RESPONSES, TARGETS, prompts)
    single = [reward(r, t, p) for r, t, p in zip(RESPONSES, TARGETS, prompts or [None] * len(RESPONSES))]
    assert batched == pytest.approx(single, abs=tol)
    return batched


# --- cosine_sts --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sts():
    """The default reward of the SPEC, on the packaged all-MiniLM-L6-v2 (no hub here)."""
    return make_reward({"type": "cosine_sts", "device": "cpu", "batch_size": 2})


def test_cosine_sts_on_packaged_minilm(sts):
    from sentence_transformers import SentenceTransformer

    reward = sts
    same = reward("The weather is lovely today.", "The weather is lovely today.")
    close = reward("The weather is lovely today.", "It is a beautiful sunny day.")
    far = reward("The weather is lovely today.", "Quarterly earnings fell by three percent.")
    assert same == pytest.approx(1.0, abs=1e-5)
    assert far < close < same
    batched = assert_batched_equals_per_sample(reward)
    model = SentenceTransformer(str(helpers.minilm_dir()), device="cpu")
    emb = model.encode(RESPONSES + TARGETS, convert_to_tensor=True, normalize_embeddings=True)
    cos = (emb[:5] * emb[5:]).sum(-1)
    assert batched == pytest.approx(((cos + 1) / 2).tolist(), abs=1e-5)
    assert make_reward({"type": "sts"}).score_batch(RESPONSES, TARGETS) == pytest.approx(batched, abs=1e-5)


# --- sentiment (pipeline) ----------------------------------------------------------------------

def test_sentiment_pipeline_probability_of_the_target_label(tiny):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    pos = make_reward({"type": "sentiment", "model": str(tiny["sentiment"]), "target": "positive",
                       "batch_size": 2})
    neg = make_reward({"type": "sentiment", "model": str(tiny["sentiment"]), "target": "NEGATIVE"})
    batched = assert_batched_equals_per_sample(pos)
    tok = AutoTokenizer.from_pretrained(str(tiny["sentiment"]))
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny["sentiment"])).eval()
    with torch.no_grad():
        direct = [model(**tok(r, return_tensors="pt")).logits.softmax(-1)[0, 1].item() for r in RESPONSES]
    assert batched == pytest.approx(direct, abs=1e-5)
    assert neg.score_batch(RESPONSES, TARGETS) == pytest.approx([1 - p for p in direct], abs=1e-5)


def test_sentiment_unknown_label_fails_at_build_listing_labels(tiny):
    with pytest.raises(ValueError, match=r"target label 'joy' .* labels are \['NEGATIVE', 'POSITIVE'\]"):
        make_reward({"type": "sentiment", "model": str(tiny["sentiment"]), "target": "joy"})


# --- reward_model ------------------------------------------------------------------------------

def test_reward_model_gpt2_scores_prompt_plus_response(tiny):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(tiny["gpt2_rm"])
    reward = make_reward({"type": "reward_model", "model": path, "batch_size": 3, "separator": " "})
    batched = assert_batched_equals_per_sample(reward, PROMPTS)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    texts = [(p + " " if p else "") + r for r, p in zip(RESPONSES, PROMPTS)]
    with torch.no_grad():
        direct = [model(**tok(t, return_tensors="pt")).logits[0, 0].item() for t in texts]
    assert batched == pytest.approx(direct, abs=1e-5)
    squashed = make_reward({"type": "reward_model", "model": path, "sigmoid": True, "separator": " "})
    assert squashed.score_batch(RESPONSES, TARGETS, PROMPTS) == pytest.approx(
        [1 / (1 + math.exp(-d)) for d in direct], abs=1e-6)


def test_reward_model_label_index_on_a_three_label_bert(tiny):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(tiny["bert3"])
    with pytest.raises(ValueError, match="has 3 outputs; set 'label_index'"):
        make_reward({"type": "reward_model", "model": path})
    reward = make_reward({"type": "reward_model", "model": path, "label_index": 2})
    batched = assert_batched_equals_per_sample(reward)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        direct = [model(**tok(r, return_tensors="pt")).logits[0, 2].item() for r in RESPONSES]
    assert batched == pytest.approx(direct, abs=1e-5)


# --- perplexity --------------------------------------------------------------------------------

def direct_mean_nll(model, tok, response, prompt=None):
    """Naive loop: -log p(token_t | tokens_<t) over the response tokens, averaged."""
    context = [tok.bos_token_id] + (tok(prompt)["input_ids"] if prompt else [])
    ids = context + tok(response)["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    nll = [-logp[t - 1, ids[t]].item() for t in range(len(context), len(ids))]
    return sum(nll) / len(nll)


def test_perplexity_matches_a_direct_computation(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(tiny["gpt2"])
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    nll = [direct_mean_nll(model, tok, r) for r in RESPONSES]
    inverse = make_reward({"type": "perplexity", "model": path, "batch_size": 2})
    assert assert_batched_equals_per_sample(inverse) == pytest.approx([math.exp(-n) for n in nll], rel=1e-5)
    neg_log = make_reward({"type": "perplexity", "model": path, "mode": "neg_log"})
    assert neg_log.score_batch(RESPONSES, TARGETS) == pytest.approx([-n for n in nll], rel=1e-5)
    raw = make_reward({"type": "perplexity", "model": path, "mode": "raw"})
    assert raw.score_batch(RESPONSES, TARGETS) == pytest.approx([math.exp(n) for n in nll], rel=1e-5)
    cond = make_reward({"type": "perplexity", "model": path, "condition_on_prompt": True})
    expected = [math.exp(-direct_mean_nll(model, tok, r, p)) for r, p in zip(RESPONSES, PROMPTS)]
    assert assert_batched_equals_per_sample(cond, PROMPTS) == pytest.approx(expected, rel=1e-5)


def test_perplexity_rewards_fluent_text_more(tiny):
    """Lower perplexity gives a higher reward: text the model memorised scores above noise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(tiny["gpt2"])
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[tok.bos_token_id] + tok(helpers.CORPUS[0])["input_ids"]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = tiny["gpt2"].parent / "gpt2_fit"
    model.save_pretrained(str(trained))
    tok.save_pretrained(str(trained))
    reward = make_reward({"type": "perplexity", "model": str(trained)})
    fluent, noise = reward.score_batch([helpers.CORPUS[0], "mat the dog the on looked sat cat"], ["", ""])
    assert fluent > noise


def test_perplexity_empty_response_is_a_fault(tiny):
    spec = {"type": "perplexity", "model": str(tiny["gpt2"])}
    with pytest.raises(RewardError, match="reward 'perplexity' failed on sample 1 \\(response ''\\)"):
        make_reward(spec).score_batch(["fine text", "", "more"], ["", "", ""])
    reward = make_reward(spec, on_error="fallback", fallback=0.0)
    out = reward.score_batch(["fine text", "", "more"], ["", "", ""])
    assert out[1] == 0.0 and out[0] > 0 and out[2] > 0 and reward.fault_count == 1
    # a sample that breaks the whole batched call (tokenizer error) is isolated by per-sample retry
    reward.pop_stats()
    broken = reward.score_batch(["fine text", None, "more"], ["", "", ""])
    assert broken[0] == pytest.approx(out[0], abs=1e-6) and broken[1] == 0.0
    assert reward.pop_stats() == {"reward/faults": 1.0, "reward/faults/perplexity": 1.0,
                                  "reward/batch_retries": 1.0}


# --- toxicity ----------------------------------------------------------------------------------

def test_toxicity_with_a_local_detoxify_checkpoint(tiny):
    # The toxicity extra is part of the test install (scripts/setup.sh): a missing detoxify fails here.
    from detoxify import Detoxify

    spec = {"type": "toxicity", "checkpoint": str(tiny["detox_ckpt"]),
            "huggingface_config_path": str(tiny["detox_hf"]), "batch_size": 2}
    reward = make_reward(spec)
    batched = assert_batched_equals_per_sample(reward)
    direct = Detoxify(checkpoint=str(tiny["detox_ckpt"]), huggingface_config_path=str(tiny["detox_hf"]))
    tox = [direct.predict(r)["toxicity"] for r in RESPONSES]
    assert batched == pytest.approx([1 - t for t in tox], abs=1e-5)
    raw = make_reward({**spec, "invert": False, "label": "insult"})
    assert raw.score_batch(RESPONSES, TARGETS) == pytest.approx(
        [direct.predict(r)["insult"] for r in RESPONSES], abs=1e-5)
    with pytest.raises(ValueError, match="label 'rude' not in the model's classes"):
        make_reward({**spec, "label": "rude"})
    # checkpoint alone (no config dir): Detoxify's own loader, same numbers
    alone = make_reward({"type": "toxicity", "checkpoint": str(tiny["detox_ckpt"])})
    assert alone.score_batch(RESPONSES, TARGETS) == pytest.approx(batched, abs=1e-5)


def test_toxicity_offline_with_a_checkpoint_naming_a_hub_model(tiny):
    import detoxify  # noqa: F401  (installed with the test extras: missing, the test fails)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward = make_reward({"type": "toxicity", "checkpoint": str(tiny["detox_hub_ckpt"]),
                          "huggingface_config_path": str(tiny["detox_hf"]), "label": "threat"})
    tok = AutoTokenizer.from_pretrained(str(tiny["detox_hf"]))
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny["detox_hf"])).eval()
    with torch.no_grad():
        threat = [model(**tok(r, return_tensors="pt")).logits.sigmoid()[0, 3].item() for r in RESPONSES]
    assert reward.score_batch(RESPONSES, TARGETS) == pytest.approx([1 - t for t in threat], abs=1e-5)


def test_toxicity_load_failure_explains_what_to_pass(tmp_path):
    import detoxify  # noqa: F401  (installed with the test extras: missing, the test fails)
    # (a missing local file, not model "original" alone: that would download where there is network)
    with pytest.raises(RuntimeError, match="could not load Detoxify model 'original' .*offline, pass 'checkpoint'"):
        make_reward({"type": "toxicity", "checkpoint": str(tmp_path / "missing.ckpt")})


# --- bertscore ---------------------------------------------------------------------------------

def naive_bertscore(model, tok, cand, ref):
    """Greedy matching with Python loops over tokens (no special tokens), last layer."""
    def embed(text):
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state[0]
        h = torch.nn.functional.normalize(h, dim=-1)
        return h[1:-1]  # drop [CLS] and [SEP]
    c, r = embed(cand), embed(ref)
    p = sum(max((ci @ rj).item() for rj in r) for ci in c) / len(c)
    rec = sum(max((rj @ ci).item() for ci in c) for rj in r) / len(r)
    return p, rec, 2 * p * rec / (p + rec)


def test_bertscore_matches_a_naive_loop(tiny):
    from transformers import AutoModel, AutoTokenizer

    path = str(tiny["encoder"])
    reward = make_reward({"type": "bertscore", "model_type": path, "batch_size": 2})
    assert reward("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0, abs=1e-5)
    batched = assert_batched_equals_per_sample(reward)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    naive = [naive_bertscore(model, tok, r, t) for r, t in zip(RESPONSES, TARGETS)]
    assert batched == pytest.approx([f for _, _, f in naive], abs=1e-5)
    precision = make_reward({"type": "bertscore", "model_type": path, "measure": "precision"})
    assert precision.score_batch(RESPONSES, TARGETS) == pytest.approx([p for p, _, _ in naive], abs=1e-5)
    with pytest.raises(ValueError, match="num_layers=5 but .* has 2 layers"):
        make_reward({"type": "bertscore", "model_type": path, "num_layers": 5})


# --- length in tokens --------------------------------------------------------------------------

def test_length_in_tokens_uses_the_tokenizer(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny["gpt2"]))
    n = len(tok("the cat sat on the mat", add_special_tokens=False)["input_ids"])
    reward = make_reward({"type": "length", "unit": "tokens", "tokenizer": str(tiny["gpt2"]), "target": n})
    assert reward("the cat sat on the mat", "") == 1.0
    assert reward("the cat sat on the mat and the dog", "") < 1.0


# --- the SPEC example and seed specs -----------------------------------------------------------

def test_seed_specs_build_and_score_with_local_models(tiny, sts):
    spec_example = {"type": "weighted_sum",
                    "components": [{"type": "cosine_sts", "weight": 0.6},
                                   {"type": "perplexity", "model": str(tiny["gpt2"]), "weight": 0.4}],
                    "postprocess": [{"type": "clip", "min": 0, "max": 1}]}
    sim = sts.score_batch(RESPONSES, TARGETS)
    ppl = make_reward({"type": "perplexity", "model": str(tiny["gpt2"])}).score_batch(RESPONSES, TARGETS)
    out = make_reward(spec_example).score_batch(RESPONSES, TARGETS, PROMPTS, [{}] * 5)
    assert out == pytest.approx([min(max(0.6 * s + 0.4 * p, 0), 1) for s, p in zip(sim, ppl)], abs=1e-5)
    assert all(0 <= x <= 1 for x in out)


class _RunsOnLoad:
    """Unpickling this calls os.system, as a malicious checkpoint would."""

    def __reduce__(self):
        return (os.system, ("touch RAN",))


def test_a_toxicity_checkpoint_that_would_run_code_is_refused(tmp_path, tiny, monkeypatch):
    from hybrid_ds.rewards.base import RewardSpecError

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "evil.ckpt"
    torch.save({"config": {"x": _RunsOnLoad()}, "state_dict": {}}, bad)
    with pytest.raises(RewardSpecError, match=f"toxicity checkpoint {bad}: holds objects other than tensors"):
        make_reward({"type": "toxicity", "checkpoint": str(bad), "huggingface_config_path": str(tiny["detox_hf"])})
    assert not (tmp_path / "RAN").exists()
