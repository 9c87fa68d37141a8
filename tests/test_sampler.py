"""hybrid_ds.rollout.sampler against transformers' ``generate`` on tiny random models built here.

Same seed -> same tokens as ``model.generate(do_sample=True, ...)`` for every processor setting;
log-probs equal to a recomputed full forward; the candidate-only draw (``hf_rng=False``) checked
statistically against the exact processed distribution.
"""

import math

import pytest
import torch

from hybrid_ds.algorithms import ppo_math as pm
from hybrid_ds.models import logprobs as lp
from hybrid_ds.rollout.decode import Gpt2Step, LlamaStep, make_cache
from hybrid_ds.rollout.processors import Processors
from hybrid_ds.rollout.sampler import SampleOutput, SamplingSettings, sample
from tiny_models import FAMILIES

V, EOS, PAD = 96, 1, 0


def tiny_gpt2(seed=0, eos_logit=0.0, attn="sdpa", peaky=1.0):
    """2-layer, 32-wide GPT-2. ``eos_logit`` raises EOS's logit by about that much (so rows end);
    ``peaky`` scales the logits (a random init is otherwise nearly uniform over V)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_positions=128, n_embd=32, n_layer=2, n_head=2, bos_token_id=EOS,
                     eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False, attn_implementation=attn)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(peaky / (0.02 * 32 ** 0.5))  # init std 0.02: logits' std becomes `peaky`
        b = torch.full((32,), 0.5)  # ln_f's output = normalised part (sums to 0) + b ...
        model.transformer.ln_f.bias.copy_(b)
        model.lm_head.weight[EOS] += eos_logit * b / b.dot(b)  # ... so EOS's logit gains exactly eos_logit
    return model


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, bos_token_id=EOS, eos_token_id=EOS,
                      pad_token_id=PAD)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
    return model


def tiny_family(family: str, seed=0):
    """A 2-layer, 64-wide model of ``family`` (tests/tiny_models.py's configs) over this file's vocabulary,
    its logits scaled up so that sampling is not near-uniform."""
    from transformers import AutoModelForCausalLM

    from tiny_models import family_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, V, eos=EOS, pad=PAD)).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10)  # tied ones scale the input embedding too: harmless
    return model


def prompts(B=5, P=9, pads=(0, 3, 5, 1, 8), seed=1):
    """Left-padded ragged prompts ``(B, P)`` and their mask (``pads[i]`` pad tokens in row i)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    for i, n in enumerate(pads[:B]):
        ids[i, :n], mask[i, :n] = PAD, 0
    return ids, mask


def settings(**kw):
    return SamplingSettings(**{"max_new_tokens": 24, "eos_token_id": EOS, "pad_token_id": PAD, **kw})


def hf_tokens(model, ids, mask, st, seed, min_new=None):
    kw = st.generate_kwargs()
    if min_new is not None:
        kw["min_new_tokens"] = min_new
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, **kw)[:, ids.shape[1]:]


def our_tokens(model, ids, mask, st, seed, **kw) -> SampleOutput:
    torch.manual_seed(seed)
    return sample(model, ids, mask, st, **kw)


CASES = {
    "plain": dict(),
    "temperature_top_k_top_p": dict(temperature=0.7, top_k=20, top_p=0.9),
    "top_p_only": dict(temperature=1.3, top_p=0.8),
    "penalty_ngram": dict(repetition_penalty=1.3, no_repeat_ngram_size=2),
    "design": dict(temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.15, no_repeat_ngram_size=3),
    "reward_repetition": dict(repetition_penalty=0.8, top_k=10, no_repeat_ngram_size=3),
    "min_new_tokens": dict(min_new_tokens=12, top_k=30, top_p=0.95),
}


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2(eos_logit=2.0)


@pytest.mark.parametrize("case", list(CASES))
def test_same_tokens_as_generate(gpt2, case):
    """Ragged left padding, EOS stops rows early (the EOS-biased model), several seeds."""
    ids, mask = prompts()
    st = settings(**CASES[case])
    ended = 0
    for seed in range(3):
        ref = hf_tokens(gpt2, ids, mask, st, seed)
        out = our_tokens(gpt2, ids, mask, st, seed)
        assert out.response_ids.shape == ref.shape
        assert torch.equal(out.response_ids, ref), f"{case} seed {seed}"
        ended += int(out.ended.sum())
        mask_ref, ended_ref = pm.mask_after_eos(ref, EOS)
        assert torch.equal(out.response_mask, mask_ref) and torch.equal(out.ended, ended_ref)
    assert ended > 0  # EOS stopping was exercised


def test_all_rows_stop_at_eos_early(gpt2):
    """With EOS likely, every row ends before max_new_tokens and the output is as short as generate's."""
    ids, mask = prompts()
    st = settings(max_new_tokens=60, top_k=5)
    model = tiny_gpt2(eos_logit=6.0)
    ref = hf_tokens(model, ids, mask, st, seed=4)
    out = our_tokens(model, ids, mask, st, seed=4)
    assert torch.equal(out.response_ids, ref) and out.response_ids.shape[1] < 60 and bool(out.ended.all())
    after = out.response_mask == 0
    assert bool((out.response_ids[after] == PAD).all()) and bool((out.logprobs[after] == 0).all())


def test_unpadded_batch_and_pad_equal_to_eos(gpt2):
    ids, mask = prompts(pads=(0, 0, 0, 0, 0))
    st = SamplingSettings(max_new_tokens=20, eos_token_id=EOS, pad_token_id=EOS, temperature=0.8, top_k=15,
                          top_p=0.9, repetition_penalty=1.2, no_repeat_ngram_size=2)
    for seed in range(2):
        assert torch.equal(our_tokens(gpt2, ids, mask, st, seed).response_ids, hf_tokens(gpt2, ids, mask, st, seed))


def test_fixed_length_equals_generate_with_min_new_tokens(gpt2):
    ids, mask = prompts()
    st = settings(**CASES["design"])
    out = our_tokens(gpt2, ids, mask, st, 7, fixed_length=True)
    assert torch.equal(out.response_ids, hf_tokens(gpt2, ids, mask, st, 7, min_new=st.max_new_tokens))
    assert out.response_ids.shape == (5, 24) and not bool((out.response_ids == EOS).any())
    assert bool((out.response_mask == 1).all()) and not bool(out.ended.any())


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_transformers_caches_give_the_same_tokens(gpt2, cache):
    ids, mask = prompts()
    st = settings(**CASES["design"])
    assert torch.equal(our_tokens(gpt2, ids, mask, st, 3, cache=cache).response_ids,
                       our_tokens(gpt2, ids, mask, st, 3).response_ids)


@pytest.mark.parametrize("model_fn", [lambda: tiny_gpt2(eos_logit=3.0, attn="eager"), tiny_llama],
                         ids=["gpt2_eager", "llama"])
def test_other_models_through_their_forward(model_fn):
    """Models without the GPT-2 fast step decode through their own forward (2D masks for eager)."""
    model = model_fn()
    ids, mask = prompts()
    st = settings(**CASES["design"])
    for seed in range(2):
        assert torch.equal(our_tokens(model, ids, mask, st, seed).response_ids, hf_tokens(model, ids, mask, st, seed))


@pytest.mark.parametrize("pads", [(0, 3, 5, 1, 8), (0, 0, 0, 0, 0)])
def test_gpt2_step_logits_are_bit_identical_to_the_forward(gpt2, pads):
    """The GPT-2 step and the model's forward on the same preallocated cache: equal logits, every step."""
    ids, mask = prompts(pads=pads)
    B, P = ids.shape
    toks = torch.randint(2, V, (B, 6))
    full = torch.cat([mask, torch.ones(B, 6, dtype=torch.long)], 1)
    pos = full.cumsum(-1) - 1
    caches = [make_cache(gpt2, "prealloc", P + 6) for _ in range(2)]
    padded = bool((mask == 0).any())
    with torch.no_grad():
        for kv in caches:
            gpt2(input_ids=ids, attention_mask=mask if padded else None, past_key_values=kv, use_cache=True,
                 position_ids=pos[:, :P].clamp(min=0))
        step = Gpt2Step(gpt2, caches[1], full if padded else None)
        for t in range(6):
            n = P + t
            m = full.bool()[:, None, None, :n + 1] if padded else None
            out = gpt2(input_ids=toks[:, t:t + 1], attention_mask=m, position_ids=pos[:, n:n + 1],
                       past_key_values=caches[0], use_cache=True, output_hidden_states=True)
            logits, hidden = step(toks[:, t], pos[:, n:n + 1], n)
            assert torch.equal(logits, out.logits[:, -1])
            assert torch.equal(hidden, out.hidden_states[-1][:, -1])


def test_fast_candidates_equal_generates_warpers():
    """The top-k/top-p fast path rebuilds exactly the scores of transformers' own warpers (the
    LogitsProcessorList generate builds: temperature, top-k, top-p), in every row it does not flag
    as ambiguous (ties, a mass within rounding of 1 - top_p); the full-vocabulary path
    (``exact_scores``) equals them in every row."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    st = settings(temperature=0.7, top_k=40, top_p=0.9)
    ids = torch.full((64, 4), 5)
    proc = Processors(st, ids, torch.ones_like(ids), ids, 512, 0, True, None)
    hf = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(40), TopPLogitsWarper(0.9)])
    g = torch.Generator().manual_seed(0)
    rows = flagged = 0
    for trial in range(20):
        logits = torch.randn(64, 512, generator=g) * (0.5 + trial / 4)
        if trial % 5 == 4:  # ties: rounded logits
            logits = (logits * 4).round() / 4
        vals, idx, ambiguous = proc.candidates(logits)
        rebuilt = torch.full_like(logits, -math.inf).scatter_(1, idx, vals)
        ok = ~ambiguous
        expected = hf(ids, logits.clone())
        assert torch.isinf(expected).sum(-1).min() > 0  # the warpers did drop tokens
        assert torch.equal(rebuilt[ok], expected[ok])
        assert torch.equal(proc.exact_scores(logits), expected)
        rows, flagged = rows + len(ok), flagged + int(ambiguous.sum())
    assert 0 < flagged < rows / 4


@pytest.mark.parametrize("model_fn", [tiny_gpt2, lambda: tiny_gpt2(attn="eager"), tiny_llama],
                         ids=["gpt2_step", "gpt2_forward", "llama_forward"])
def test_logprobs_and_values_equal_a_recomputed_forward(model_fn):
    """logprobs = log_softmax(logits / T) and values = value_fn(last hidden state) of a full forward on
    prompt + response (fp32, eval), 1e-5, through the GPT-2 step and through models' own forward."""
    model = model_fn()
    ids, mask = prompts()
    st = settings(**CASES["design"])
    g = torch.Generator().manual_seed(3)
    v_head = torch.nn.Linear(model.config.hidden_size, 1)
    with torch.no_grad():
        v_head.weight.copy_(torch.randn(v_head.weight.shape, generator=g))
    out = our_tokens(model, ids, mask, st, 11, value_fn=v_head)
    assert torch.equal(out.response_ids, our_tokens(model, ids, mask, st, 11).response_ids)
    resp, rmask = out.response_ids, out.response_mask
    seq = torch.cat([ids, resp], 1)
    att = torch.cat([mask, rmask.long()], 1)
    pos = (att.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(input_ids=seq, attention_mask=att, position_ids=pos, output_hidden_states=True)
        P = ids.shape[1]
        ref = lp.logprobs_from_logits(full.logits[:, P - 1:-1], resp, st.temperature) * rmask
        ref_v = v_head(full.hidden_states[-1][:, P - 1:-1]).squeeze(-1) * rmask
    torch.testing.assert_close(out.logprobs, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.values, ref_v, atol=1e-5, rtol=0)
    assert float(ref_v.abs().max()) > 0.1  # the values are not trivially zero
    assert out.logprobs.dtype == torch.float32 and bool((out.processed_logprobs <= 0).all())
    # processors change the distribution: the processed log-probs are those of a narrower one
    assert bool((out.processed_logprobs >= out.logprobs - 1e-6)[rmask.bool()].float().mean() > 0.9)


def test_processed_logprobs_equal_logprobs_without_processors(gpt2):
    ids, mask = prompts()
    out = our_tokens(gpt2, ids, mask, settings(temperature=0.8), 2)
    torch.testing.assert_close(out.processed_logprobs, out.logprobs, atol=1e-5, rtol=0)


def test_candidate_draw_matches_the_processed_distribution(gpt2):
    """hf_rng=False: a different random stream, the same distribution. First token of 4000 copies of
    one prompt vs the exact processed probabilities (chi-square), and one later step vs hf_rng=True."""
    st = settings(max_new_tokens=3, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3,
                  no_repeat_ngram_size=2)
    ids, mask = prompts(B=1, pads=(2,))
    n = 4000
    ids, mask = ids.expand(n, -1), mask.expand(n, -1)
    g = torch.Generator().manual_seed(0)
    fast = sample(gpt2, ids, mask, st, generator=g, hf_rng=False)
    exact = sample(gpt2, ids, mask, st, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():  # the exact processed distribution of the first token, from generate's processors
        from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                            TemperatureLogitsWarper, TopKLogitsWarper,
                                                            TopPLogitsWarper)
        pos = (mask[:1].cumsum(-1) - 1).clamp(min=0)
        logits = gpt2(input_ids=ids[:1], attention_mask=mask[:1], position_ids=pos).logits[:, -1]
        procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3, prompt_ignore_length=2),
                                     TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.9)])
        p = procs(ids[:1], logits).softmax(-1)[0]
    counts = torch.bincount(fast.response_ids[:, 0], minlength=V).double()
    support = p > 0
    assert counts[~support].sum() == 0
    chi2 = (((counts - n * p) ** 2) / (n * p))[support].sum().item()
    df = int(support.sum()) - 1
    assert chi2 < df + 5 * math.sqrt(2 * df), (chi2, df)  # ~5 sigma
    torch.testing.assert_close(fast.processed_logprobs[:, 0].exp(), p[fast.response_ids[:, 0]].float(),
                               atol=1e-5, rtol=0)
    # third token: two-sample chi-square between the candidate draw and the exact draw
    a = torch.bincount(fast.response_ids[:, 2], minlength=V).double()
    b = torch.bincount(exact.response_ids[:, 2], minlength=V).double()
    both = (a + b) > 0
    chi2 = (((a - b) ** 2) / (a + b))[both].sum().item()
    df = int(both.sum()) - 1
    assert chi2 < df + 5 * math.sqrt(2 * df), (chi2, df)


def test_generator_makes_runs_reproducible(gpt2):
    ids, mask = prompts()
    st = settings(**CASES["design"])
    for hf_rng in (True, False):
        a = sample(gpt2, ids, mask, st, generator=torch.Generator().manual_seed(5), hf_rng=hf_rng)
        b = sample(gpt2, ids, mask, st, generator=torch.Generator().manual_seed(5), hf_rng=hf_rng)
        c = sample(gpt2, ids, mask, st, generator=torch.Generator().manual_seed(6), hf_rng=hf_rng)
        assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
        assert not torch.equal(a.response_ids, c.response_ids)


def test_settings_are_validated_all_at_once():
    with pytest.raises(ValueError) as err:
        SamplingSettings(max_new_tokens=0, temperature=0.0, top_p=1.5, top_k=-1, eos_token_id=EOS, pad_token_id=PAD)
    for word in ("max_new_tokens", "temperature", "top_p", "top_k"):
        assert word in str(err.value)


def test_settings_from_gen_config():
    from hybrid_ds.config import GenConfig

    st = SamplingSettings.from_gen_config(GenConfig(), eos_token_id=EOS, pad_token_id=PAD)
    assert (st.top_k, st.top_p, st.temperature, st.no_repeat_ngram_size, st.repetition_penalty) == \
        (50, 0.9, 0.7, 3, 1.15)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_same_tokens_as_generate_on_cuda():
    model = tiny_gpt2(eos_logit=3.0).cuda()
    ids, mask = (x.cuda() for x in prompts())
    st = settings(**CASES["design"])
    for seed in range(2):
        assert torch.equal(our_tokens(model, ids, mask, st, seed).response_ids, hf_tokens(model, ids, mask, st, seed))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_shared_prefill_draws_the_repeated_rows_tokens_on_cuda():
    """The shared prefill's exactness rests on the trunk's prefill giving each row the same bits
    whatever the row count; checked on CPU above, here on CUDA (cuBLAS picks kernels by shape): the
    shared prefill draws the tokens of the same sampler on the repeated rows. (Against generate itself
    the lean_exact draw on these 12 rows differed in one token for seed 1 on an H200, shared or not:
    a limit of the decode step's exactness on CUDA, README "GPU tier", not of the sharing.)"""
    K = 4
    for model in (tiny_gpt2(eos_logit=3.0).cuda(), tiny_llama().cuda()):
        ids, mask = (x.cuda() for x in prompts(B=3, pads=(0, 3, 5)))
        rep_ids, rep_mask = ids.repeat_interleave(K, 0), mask.repeat_interleave(K, 0)
        st = settings(**CASES["design"])
        for seed in range(2):
            assert torch.equal(our_tokens(model, ids, mask, st, seed, repeats=K).response_ids,
                               our_tokens(model, rep_ids, rep_mask, st, seed).response_ids)


def recomputed(model, ids, mask, out: SampleOutput, temperature: float, v_head):
    """Log-probs and values of a full forward on prompt + response, computed the pre-hook way: every
    layer's hidden states requested and the last one read."""
    resp, rmask = out.response_ids, out.response_mask
    seq = torch.cat([ids, resp], 1)
    att = torch.cat([mask, rmask.long()], 1)
    pos = (att.cumsum(1) - 1).clamp(min=0)
    P = ids.shape[1]
    with torch.no_grad():
        full = model(input_ids=seq, attention_mask=att, position_ids=pos, output_hidden_states=True)
        ref = lp.logprobs_from_logits(full.logits[:, P - 1:-1], resp, temperature) * rmask
        ref_v = v_head(full.hidden_states[-1][:, P - 1:-1]).squeeze(-1) * rmask
    return ref, ref_v


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_samples_like_generate(family):
    """Each decoder family (tests/tiny_models.py): generate's tokens from the same seed (ragged left
    padding, the design's processors), log-probs and values equal to a recomputed forward, and no
    forward asked for every layer's hidden states (the values come from the LM head's input).
    Mistral's window (16) is shorter than prompt + response (33): it decodes through its forward."""
    model = tiny_family(family)
    ids, mask = prompts()
    st = settings(**CASES["design"])
    lean = LlamaStep.supports(model, ids.shape[1] + st.max_new_tokens) or Gpt2Step.supports(model)
    assert lean == (family in ("gpt2", "llama", "qwen2"))
    v_head = torch.nn.Linear(model.config.hidden_size, 1)
    calls = []

    def spy(_module, _args, kwargs, output):
        calls.append((kwargs.get("output_hidden_states"), output.hidden_states))

    handle = model.register_forward_hook(spy, with_kwargs=True)
    try:
        out = our_tokens(model, ids, mask, st, 5, value_fn=v_head)
    finally:
        handle.remove()
    assert calls and all(not want and hs is None for want, hs in calls)
    assert torch.equal(out.response_ids, hf_tokens(model, ids, mask, st, 5))
    ref, ref_v = recomputed(model, ids, mask, out, st.temperature, v_head)
    torch.testing.assert_close(out.logprobs, ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(out.values, ref_v, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pads", [(0, 3, 5, 1, 8), (0, 0, 0, 0, 0)], ids=["ragged", "unpadded"])
@pytest.mark.parametrize("family", ["llama", "llama_ungrouped", "qwen2", "mistral"])
def test_llama_step_logits_are_bit_identical_to_the_forward(family, pads):
    """The Llama-family step and the model's forward on the same preallocated cache: equal logits and
    final hidden states, every step (the forward gets the masks hf_step gives it: 4D boolean under
    SDPA, 2D for Mistral's sliding window, which the 15 positions here fit). Grouped KV heads
    (2 per group) with and without padding, and one KV head per query head."""
    if family == "llama_ungrouped":
        from transformers import LlamaForCausalLM

        from tiny_models import family_config

        cfg = family_config("llama", V, eos=EOS, pad=PAD)
        cfg.num_key_value_heads = cfg.num_attention_heads
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
    else:
        model = tiny_family(family)
    ids, mask = prompts(pads=pads)
    B, P = ids.shape
    toks = torch.randint(2, V, (B, 6))
    full = torch.cat([mask, torch.ones(B, 6, dtype=torch.long)], 1)
    pos = (full.cumsum(-1) - 1).clamp(min=0)
    assert LlamaStep.supports(model, P + 6) and not LlamaStep.supports(model.train(), P + 6)
    model.eval()
    caches = [make_cache(model, "prealloc", P + 6) for _ in range(2)]
    padded = bool((mask == 0).any())
    four_d = family != "mistral"
    with torch.no_grad():
        for kv in caches:
            model(input_ids=ids, attention_mask=mask if padded else None, past_key_values=kv, use_cache=True,
                  position_ids=pos[:, :P])
        step = LlamaStep(model, caches[1], full if padded else None)
        for t in range(6):
            n = P + t
            m = None if not padded else full.bool()[:, None, None, :n + 1] if four_d else full[:, :n + 1]
            out = model(input_ids=toks[:, t:t + 1], attention_mask=m, position_ids=pos[:, n:n + 1],
                        past_key_values=caches[0], use_cache=True, output_hidden_states=True)
            logits, hidden = step(toks[:, t], pos[:, n:n + 1], n)
            assert torch.equal(logits, out.logits[:, -1])
            assert torch.equal(hidden, out.hidden_states[-1][:, -1])


def prefill_rows(model, fn):
    """``fn()``'s result and the batch size of each forward of ``model`` over more than one position."""
    rows = []

    def spy(_module, _args, kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            rows.append(kwargs["input_ids"].shape[0])

    handle = model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        return fn(), rows
    finally:
        handle.remove()


@pytest.mark.parametrize("model_fn,hf_rng,cache,shared", [
    (tiny_gpt2, True, "prealloc", True),  # GPT-2 step: the head on the repeated hidden state, generate's bits
    (tiny_llama, True, "prealloc", True),  # Llama step, likewise
    (tiny_gpt2, True, "dynamic", True),  # transformers' DynamicCache repeats itself
    (lambda: tiny_family("phi3"), True, "prealloc", False),  # the exact draw without a lean head: not shared
    (lambda: tiny_family("phi3"), False, "prealloc", True),  # the candidate draw: shared, the prefill's own logits
], ids=["gpt2_exact", "llama_exact", "gpt2_dynamic", "phi3_exact", "phi3_candidates"])
def test_shared_prefill_equals_the_repeated_batch(model_fn, hf_rng, cache, shared):
    """``repeats=K`` on B prompts = the same prompts repeat_interleaved K times (generate's tokens where
    ``hf_rng``), log-probs and values equal within the recomputed forward's tolerance and equal to that
    forward; the prompts are prefilled once each (B rows, not B*K) where sharing applies."""
    model, K = model_fn(), 3
    ids, mask = prompts(B=3, pads=(0, 3, 5))
    rep_ids, rep_mask = ids.repeat_interleave(K, 0), mask.repeat_interleave(K, 0)
    st = settings(**CASES["design"])
    v_head = torch.nn.Linear(model.config.hidden_size, 1)
    kw = {"hf_rng": hf_rng, "cache": cache, "value_fn": v_head}
    out, rows = prefill_rows(model, lambda: our_tokens(model, ids, mask, st, 4, repeats=K, **kw))
    ref, ref_rows = prefill_rows(model, lambda: our_tokens(model, rep_ids, rep_mask, st, 4, **kw))
    assert rows == [3 if shared else 9] and ref_rows == [9]
    assert torch.equal(out.response_ids, ref.response_ids) and torch.equal(out.response_mask, ref.response_mask)
    if hf_rng:
        assert torch.equal(out.response_ids, hf_tokens(model, rep_ids, rep_mask, st, 4))
    torch.testing.assert_close(out.logprobs, ref.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.values, ref.values, atol=1e-5, rtol=0)
    full, full_v = recomputed(model, rep_ids, rep_mask, out, st.temperature, v_head)
    torch.testing.assert_close(out.logprobs, full, atol=2e-5, rtol=0)
    torch.testing.assert_close(out.values, full_v, atol=1e-5, rtol=0)
    # rows of one prompt drew different responses: the cache copies are independent
    assert not all(torch.equal(out.response_ids[i * K], out.response_ids[i * K + 1]) for i in range(3))


def test_repeats_one_prefills_every_row_and_bad_repeats_are_refused(gpt2):
    ids, mask = prompts()
    _, rows = prefill_rows(gpt2, lambda: our_tokens(gpt2, ids, mask, settings(), 0, repeats=1))
    assert rows == [5]
    with pytest.raises(ValueError, match="repeats >= 1"):
        sample(gpt2, ids, mask, settings(), repeats=0)
