"""Composition, post-processing, state, and runtime faults."""

import math

import pytest

from hybrid_ds.rewards import FaultPolicy, RewardError, make_reward
from hybrid_ds.rewards.base import Leaf
from hybrid_ds.rewards.compose import EmaNormalize, batch_moments, ema_update

R = ["the cat sat", "a dog ran", "the cat ran"]
T = ["the cat sat", "the cat sat", "the cat sat"]


def test_weighted_sum_is_normalised_by_the_weight_sum():
    f1 = make_reward({"type": "word_f1"}).score_batch(R, T)
    em = make_reward({"type": "exact_match"}).score_batch(R, T)
    ws = make_reward({"type": "weighted_sum", "components": [
        {"type": "word_f1", "weight": 3}, {"type": "exact_match", "weight": 1},
        {"type": "bleu", "weight": 0}]})
    assert ws.score_batch(R, T) == pytest.approx([(3 * a + b) / 4 for a, b in zip(f1, em)])
    default_weights = make_reward({"type": "weighted_sum", "components": [{"type": "word_f1"},
                                                                          {"type": "exact_match"}]})
    assert default_weights.score_batch(R, T) == pytest.approx([(a + b) / 2 for a, b in zip(f1, em)])


def test_nested_weighted_sum_with_postprocess_on_every_level():
    spec = {"type": "weighted_sum", "components": [
        {"type": "weighted_sum", "weight": 1, "components": [{"type": "word_f1"}, {"type": "exact_match"}],
         "postprocess": [{"type": "scale", "mul": 2, "add": -1}]},
        {"type": "exact_match", "weight": 1, "postprocess": [{"type": "scale", "add": 10}]}],
        "postprocess": [{"type": "scale", "mul": 0.5}, {"type": "clip", "min": 0, "max": 3}]}
    f1 = make_reward({"type": "word_f1"}).score_batch(R, T)
    em = make_reward({"type": "exact_match"}).score_batch(R, T)
    inner = [2 * (a + b) / 2 - 1 for a, b in zip(f1, em)]
    expected = [min(max(0.5 * (i + (e + 10)) / 2, 0), 3) for i, e in zip(inner, em)]
    assert make_reward(spec).score_batch(R, T) == pytest.approx(expected)


def test_clip_with_one_bound():
    reward = make_reward({"type": "word_f1", "postprocess": [{"type": "scale", "mul": 10},
                                                             {"type": "clip", "max": 5}]})
    assert reward.score_batch(["a", "z"], ["a", "a"]) == [5.0, 0.0]


def test_ema_update_is_the_weighted_mixture_of_old_and_batch_moments():
    old, batch, d = [1.0, 2.0, 6.0], [10.0, 11.0], 0.7
    m0 = sum(old) / 3
    v0 = sum((x - m0) ** 2 for x in old) / 3
    mb, vb = batch_moments(2, sum(batch), sum(x * x for x in batch), 0.0)
    # the same moments computed directly on the weighted pooled sample
    weights = [d / 3] * 3 + [(1 - d) / 2] * 2
    xs = old + batch
    mean = sum(w * x for w, x in zip(weights, xs))
    var = sum(w * (x - mean) ** 2 for w, x in zip(weights, xs))
    assert ema_update(m0, v0, mb, vb, d) == pytest.approx((mean, var))
    # x = {5, 4} shifted by 3: sums 2 + 1 and 4 + 1
    assert batch_moments(2, 3.0, 5.0, 3.0) == pytest.approx((4.5, 0.25))


def test_ema_normalize_hand_computed():
    ema = EmaNormalize(decay=0.5, eps=0.0)
    assert ema([1.0, 3.0]) == pytest.approx([-1.0, 1.0])  # mean 2, var 1
    # batch mean 6, var 0 -> mean 0.5*2 + 0.5*6 = 4, var 0.5*1 + 0 + 0.25*16 = 4.5
    out = ema([6.0, 6.0])
    assert (ema.mean, ema.var, ema.count) == (4.0, pytest.approx(4.5), 4)
    assert out == pytest.approx([2 / math.sqrt(4.5)] * 2)
    assert ema([]) == [] and ema.count == 4  # empty batch: no update


def test_state_dict_round_trip_resumes_ema_exactly():
    spec = {"type": "weighted_sum",
            "components": [{"type": "word_f1", "postprocess": [{"type": "ema_normalize", "decay": 0.9}]},
                           {"type": "jaccard"}],
            "postprocess": [{"type": "ema_normalize", "decay": 0.8}, {"type": "clip", "min": -3, "max": 3}]}
    batches = [(["a b", "b c d", "x"], ["a b c"] * 3), (["c", "a b c", "q r"], ["a b c"] * 3)]
    first = make_reward(spec)
    first.score_batch(*batches[0])
    state = first.state_dict()
    assert set(state) == {"inner", "postprocess"}
    assert state["postprocess"][0]["count"] == 3 and state["postprocess"][1] == {}
    assert state["inner"]["components"][0]["postprocess"][0]["count"] == 3
    resumed = make_reward(spec)
    resumed.load_state_dict(state)
    assert resumed.score_batch(*batches[1]) == first.score_batch(*batches[1])
    fresh = make_reward(spec)
    assert fresh.score_batch(*batches[1]) != resumed.score_batch(*batches[1])


def test_load_state_dict_rejects_a_different_tree():
    with pytest.raises(ValueError, match="has 1 post-processors, state has 2"):
        make_reward({"type": "bleu", "postprocess": [{"type": "clip", "max": 1}]}).load_state_dict(
            {"inner": {}, "postprocess": [{}, {}]})
    with pytest.raises(ValueError, match="stateless"):
        make_reward({"type": "bleu"}).load_state_dict({"mean": 0})
    assert make_reward({"type": "bleu"}).state_dict() == {}


# --- faults ---------------------------------------------------------------------------------

def flaky(responses, targets, prompts, items):
    """Raises on a response containing BOOM, NaN for 'nan', inf for 'inf', else its length."""
    if any("BOOM" in r for r in responses):
        raise RuntimeError("kaboom")
    return [{"nan": math.nan, "inf": math.inf}.get(r, float(len(r))) for r in responses]


def test_fallback_isolates_the_bad_samples_and_counts_them():
    faults = FaultPolicy("fallback", -1.0)
    leaf = Leaf("flaky", flaky, faults)
    out = leaf.score_batch(["ab", "xBOOMx", "abc", "nan", "inf"], [""] * 5)
    assert out == [2.0, -1.0, 3.0, -1.0, -1.0]
    assert leaf.fault_count == 3
    assert leaf.pop_stats() == {"reward/faults": 3.0, "reward/faults/flaky": 3.0,
                                "reward/batch_retries": 1.0}
    assert leaf.pop_stats() == {"reward/faults": 0.0}
    assert leaf.fault_count == 3


def test_raise_names_type_index_and_truncated_response():
    leaf = Leaf("flaky", flaky, FaultPolicy("raise"))
    long = "BOOM " + "x" * 200
    with pytest.raises(RewardError) as err:
        leaf.score_batch(["fine", long], ["", ""])
    msg = str(err.value)
    assert msg.startswith("reward 'flaky' failed on sample 1 (response 'BOOM xxx")
    assert msg.endswith("...'): RuntimeError: kaboom") and len(msg) < 160
    assert err.value.index == 1 and err.value.kind == "flaky"
    with pytest.raises(RewardError, match="sample 2 .*non-finite score nan"):
        leaf.score_batch(["a", "b", "nan"], ["", "", ""])


def test_fault_policy_from_spec_and_kwargs_through_a_composite():
    spec = {"type": "weighted_sum", "components": [
        {"type": "keyword_coverage", "item_field": "kw", "weight": 1}, {"type": "exact_match", "weight": 1}]}
    items = [{"kw": ["cat"]}, {}, {"kw": "dog"}]
    with pytest.raises(RewardError, match="reward 'keyword_coverage' failed on sample 1 .*KeyError"):
        make_reward(spec).score_batch(R, T, items=items)
    reward = make_reward({**spec, "on_error": "fallback", "fallback": 0.25})
    out = reward.score_batch(R, T, items=items)
    assert out == [(1.0 + 1.0) / 2, (0.25 + 0.0) / 2, (0.0 + 0.0) / 2]
    assert reward.pop_stats()["reward/faults/keyword_coverage"] == 1.0
    by_kwarg = make_reward(spec, on_error="fallback", fallback=1.0)
    assert by_kwarg.score_batch(R, T, items=items)[1] == 0.5
    overridden = make_reward({**spec, "on_error": "fallback"}, on_error="raise")  # the kwarg wins over the spec
    with pytest.raises(RewardError, match=r"^reward 'keyword_coverage' failed on sample 1 \(response 'a dog ran'\): "
                                          r"KeyError: 'kw'$"):
        overridden.score_batch(R, T, items=items)


def test_composite_overflow_is_caught_too():
    reward = make_reward({"type": "word_f1", "postprocess": [{"type": "scale", "mul": 1e308},
                                                             {"type": "scale", "mul": 10}],
                          "on_error": "fallback", "fallback": 0})
    assert reward.score_batch(["a", "b"], ["a", "a"]) == [0.0, 0.0]
    assert reward.fault_count == 1


def test_batch_interface_checks_lengths_and_handles_empty_batches():
    reward = make_reward({"type": "word_f1"})
    with pytest.raises(ValueError, match="batch lengths differ"):
        reward.score_batch(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="prompts=1"):
        reward.score_batch(["a", "b"], ["a", "b"], prompts=["p"])
    assert reward.score_batch([], []) == []
    assert reward("a b", "a b", prompt="p", item={"x": 1}) == 1.0
