"""Critic-free estimators (GRPO, RLOO, REINFORCE++), LOSS_AGG and KL_IN=loss: the math against hand
computations and naive loops, group statistics split over ranks, and the PPO phase running them."""

import copy
import math

import pytest
import torch

from hybrid_ds.algorithms import estimators as est
from hybrid_ds.algorithms import ppo
from inproc import base, changed, make_run, prepared_rollout, weights


def test_grpo_and_rloo_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1])
    table = est.group_sums(scores, group, 2)
    std = math.sqrt((4 + 1 + 0 + 9) / 3)  # mean 3, unbiased
    grpo = est.group_advantages(scores, group, table, "grpo")
    torch.testing.assert_close(grpo, torch.tensor([-2.0, -1.0, 0.0, 3.0, 0.0, 0.0]) /
                               torch.tensor([std + est.STD_EPS] * 4 + [1.0, 1.0]))
    dr = est.group_advantages(scores, group, table, "grpo", scale_std=False)
    torch.testing.assert_close(dr, torch.tensor([-2.0, -1.0, 0.0, 3.0, 0.0, 0.0]))
    rloo = est.group_advantages(scores, group, table, "rloo")
    torch.testing.assert_close(rloo, torch.tensor([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0, 0.0, 0.0]))


def test_group_estimators_equal_a_naive_loop_with_groups_split_over_ranks():
    """Four groups of 5, interleaved, the rows split over two "ranks" in an order that puts every
    group on both: the summed tables give each rank the advantages of the whole batch."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(20, generator=g)
    group = torch.arange(20) % 4
    for name in ("grpo", "rloo"):
        naive = torch.empty(20)
        for i in range(20):
            mates = scores[group == group[i]]
            if name == "grpo":
                naive[i] = (scores[i] - mates.mean()) / (mates.std() + est.STD_EPS)
            else:
                naive[i] = scores[i] - (mates.sum() - scores[i]) / (len(mates) - 1)
        ranks = [torch.arange(0, 20, 2), torch.arange(1, 20, 2)]
        table = sum(est.group_sums(scores[r], group[r], 4) for r in ranks)  # the all-reduce
        for r in ranks:
            torch.testing.assert_close(est.group_advantages(scores[r], group[r], table, name), naive[r])


def test_discounted_returns_equal_a_naive_loop():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(3, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0] * 6], dtype=torch.float32)
    out = est.discounted_returns(rewards, mask, gamma=0.9)
    for b in range(3):
        for t in range(6):
            want = sum(0.9 ** (k - t) * rewards[b, k] * mask[b, k] for k in range(t, 6)) * mask[b, t]
            assert float(out[b, t]) == pytest.approx(float(want), abs=1e-6)


@pytest.mark.parametrize("agg", est.LOSS_AGGS)
def test_token_weights_split_any_way_give_the_minibatch_loss(agg):
    """The weighted sum over a minibatch equals the sum of its micro-batches' (and ranks') shares,
    and each aggregation is what its name says."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.float32)
    n_tok, n_seq, max_len = mask.sum(), 4, 8
    whole = (x * est.token_weights(mask, agg, n_seq, n_tok, max_len) * mask).sum()
    parts = sum((x[s] * est.token_weights(mask[s], agg, n_seq, n_tok, max_len) * mask[s]).sum()
                for s in (slice(0, 1), slice(1, 3), slice(3, 4)))
    torch.testing.assert_close(parts, whole)
    want = {"token_mean": (x * mask).sum() / n_tok,
            "seq_mean": ((x * mask).sum(1) / mask.sum(1)).mean(),
            "dr_grpo": (x * mask).sum() / (n_seq * max_len)}[agg]
    torch.testing.assert_close(whole, want)


def test_kl_k3_is_nonnegative_zero_at_the_reference_and_has_the_right_gradient():
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    ref = torch.tensor([-1.0, -1.0, -3.0])
    k3 = est.kl_k3(logp, ref)
    assert float(k3[0].detach()) == 0.0 and bool((k3 >= 0).all())
    k3.sum().backward()
    torch.testing.assert_close(logp.grad, 1 - torch.exp(ref - logp.detach()))


# ---------------------------------------------------------------------------------------------
# the PPO phase with the estimators


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    return make_run(base(tmp_path_factory.mktemp("grpo"), "ppo", ADVANTAGE="grpo", NUM_GENERATIONS=4, PPO_BATCH=2,
                         PPO_MINI=2, KL_IN="loss", LOSS_AGG="seq_mean"))


def test_critic_free_runs_build_no_value_head(grpo_run):
    assert grpo_run.engine.module.v_head is None
    assert not [n for n, _ in grpo_run.engine.module.named_parameters() if "v_head" in n]


def test_grpo_rollout_groups_and_advantages(grpo_run):
    """K responses per prompt in consecutive rows, one group id per prompt, the group's advantages
    summing to 0 on every token they share; PPO epochs change the policy and log no value loss."""
    run = grpo_run
    ro = prepared_rollout(run, run.examples[:2])
    assert ro.response_ids.shape[0] == 8 and ro.group.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert ro.values is None and ro.returns is None
    per_seq = (ro.advantages * ro.response_mask).sum(1) / ro.response_mask.sum(1).clamp(min=1)
    for g in range(2):
        s = ro.scores[g * 4:(g + 1) * 4]
        want = (s - s.mean()) / (s.std() + est.STD_EPS)  # KL_IN=loss: the reward is the score
        torch.testing.assert_close(per_seq[g * 4:(g + 1) * 4], want, atol=1e-5, rtol=1e-5)
    w0 = weights(run)
    m = ppo.ppo_epochs(run, copy.deepcopy(ro), None)
    assert changed(w0, weights(run), "lm.")
    assert "ppo/loss/value" not in m and math.isfinite(m["ppo/loss/kl"]) and m["ppo/loss/kl"] >= 0


def test_grpo_rollout_prefills_each_prompt_once(grpo_run):
    """NUM_GENERATIONS rows per prompt, one prefill row per prompt (the sampler's ``repeats``); the
    rollout's own old log-probs (fp32) still equal a recomputed forward on the K rows."""
    run, prefill_rows = grpo_run, []

    def spy(_module, _args, kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            prefill_rows.append(kwargs["input_ids"].shape[0])

    handle = run.engine.module.lm.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        ro = ppo.generate(run, run.examples[:2])
    finally:
        handle.remove()
    assert prefill_rows == [2] and ro.query_ids.shape[0] == 8
    assert torch.equal(ro.query_ids[::4].repeat_interleave(4, 0), ro.query_ids)
    assert ro.logprobs is not None  # OLD_LOGPROBS auto in fp32: the sampler's
    recomputed, _ = ppo.forward_logprobs(run.engine, ro, run.cfg.gen.temperature, 64, with_values=True)
    torch.testing.assert_close(ro.logprobs, recomputed, atol=1e-5, rtol=0)


@pytest.mark.parametrize("keys", [dict(ADVANTAGE="rloo", NUM_GENERATIONS=2, LOSS_AGG="dr_grpo"),
                                  dict(ADVANTAGE="reinforce_pp", PTX_COEF=0.5)], ids=["rloo", "reinforce_pp+ptx"])
def test_other_estimators_run_a_hybrid_cycle(tmp_path, keys):
    from hybrid_ds.run.loop import train

    run = make_run(base(tmp_path, "hybrid", MAX_STEPS=1, **keys))
    assert run.engine.module.v_head is None
    w0 = weights(run)
    train(run)
    assert changed(w0, weights(run), "lm.")
    rows = [line for line in open(f"{run.cfg.run.output_dir}/metrics.jsonl")]
    assert any('"ppo/loss/policy"' in r for r in rows) and not any('"ppo/loss/value"' in r for r in rows)


def test_grpo_needs_a_group():
    from hybrid_ds.config import ConfigError
    from hybrid_ds.run.preflight import load_config

    with pytest.raises(ConfigError, match="NUM_GENERATIONS >= 2"):
        load_config(None, ["MODE=ppo", "MODEL=builtin:tiny-gpt2", "TRAIN_FILE=builtin:demo-tasks",
                           "OUTPUT_DIR=/tmp/unused-hybrid-ds", "ADVANTAGE=grpo"], check_files=False)
