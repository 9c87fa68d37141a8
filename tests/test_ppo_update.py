"""PPO update features, in-process on one process (tests/inproc.py): the ratio guard, PPO-ptx,
WHITEN_REWARDS, PPO_GRAD_ACCUM equivalence, REF_INIT=after_warmup, a non-finite PPO update."""

import copy
import math

import pytest
import torch

from inproc import base, changed, make_run, prepared_rollout, weights

from hybrid_ds.algorithms import ppo

pytestmark = pytest.mark.slow


def test_ratio_guard_drops_only_the_exploding_micro_batch(tmp_path):
    """One minibatch of 4 rows in 4 micro-batches; row 0's old log-probs make its ratio overflow.
    Its micro-batch must contribute exactly zero gradient and the other three still step: the
    weights equal those of the same update where row 0 carries no gradient by construction
    (advantage 0, VF_COEF 0)."""
    keys = dict(MODE="ppo", PPO_GRAD_ACCUM=4, VF_COEF=0.0, ENTROPY_COEF=0.0)
    a, b = make_run(base(tmp_path / "a", **keys)), make_run(base(tmp_path / "b", **keys))
    w0 = weights(a)
    assert all(torch.equal(w0[k], v) for k, v in weights(b).items())
    ro = prepared_rollout(a, a.examples[:4])
    ro_a, ro_b = copy.deepcopy(ro), copy.deepcopy(ro)
    ro_a.logprobs[0] = -1e4  # exp(logp - old) overflows: mean ratio inf
    ro_b.advantages[0] = 0.0
    ma = ppo.ppo_epochs(a, ro_a, None)
    mb = ppo.ppo_epochs(b, ro_b, None)
    assert ma["ppo/skipped_microbatches"] == 1.0 and mb["ppo/skipped_microbatches"] == 0.0
    assert math.isfinite(ma["ppo/grad_norm"]), ma["ppo/grad_norm"]
    assert all(math.isfinite(v) for v in ma.values()), {k: v for k, v in ma.items() if not math.isfinite(v)}
    wa, wb = weights(a), weights(b)
    assert changed(w0, wa, "lm."), "the other micro-batches did not step"
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7, msg=k)


def _ce_mean(lm, examples, pad_id) -> float:
    """Mean next-token cross-entropy of the labelled tokens, by transformers' own loss."""
    from hybrid_ds.data import collate_sft

    b = collate_sft(examples, pad_id)
    with torch.no_grad():
        return float(lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss)


def test_ptx_logs_the_sft_loss_and_pulls_the_update_toward_the_sft_data(tmp_path):
    """PTX_COEF > 0: ``ppo/loss/ptx`` is the SFT loss of the labelled batch (as transformers computes
    it, before the step), the PPO losses are those of the PTX_COEF=0 run on the same rollout, and the
    update differs from it in the direction that lowers the SFT loss."""
    from hybrid_ds.algorithms.registry import PHASES
    from hybrid_ds.run.loop import phase_step

    a = make_run(base(tmp_path / "a", "ppo", PTX_COEF=1.0, SFT_BATCH=8))
    b = make_run(base(tmp_path / "b", "ppo", PTX_COEF=0.0))
    pad = a.tokenizer.pad_token_id
    ptx_idx = copy.deepcopy(a.streams["sft"]).next()  # the batch the PPO step draws for ptx
    ptx_examples = [a.examples[i] for i in ptx_idx]
    expected = _ce_mean(a.engine.module.lm, ptx_examples, pad)
    ma, mb = phase_step(a, PHASES["ppo"]), phase_step(b, PHASES["ppo"])
    assert "ppo/loss/ptx" in ma and "ppo/loss/ptx" not in mb
    assert math.isfinite(ma["ppo/loss/ptx"]) and ma["ppo/loss/ptx"] == pytest.approx(expected, rel=1e-5)
    for k in ("ppo/reward_mean", "ppo/loss/policy", "ppo/loss/value", "objective/kl"):
        assert ma[k] == pytest.approx(mb[k], rel=1e-6, abs=1e-7), k  # same rollout, same first step
    assert changed(weights(a), weights(b), "lm.")
    after_a = _ce_mean(a.engine.module.lm, ptx_examples, pad)
    after_b = _ce_mean(b.engine.module.lm, ptx_examples, pad)
    assert after_a < after_b - 1e-3, (expected, after_a, after_b)


def test_whiten_rewards_rescales_the_shaped_rewards_keeping_their_mean(tmp_path):
    """WHITEN_REWARDS: the KL-shaped per-token rewards are divided by their masked standard deviation
    (unbiased, computed here with torch.std), the mean kept; the advantages change accordingly."""
    run = make_run(base(tmp_path, "ppo", PPO_BATCH=8, PPO_MINI=8))
    ro = prepared_rollout(run, run.examples[:8])
    raw, m = ro.rewards.double(), ro.response_mask.bool()
    vals = raw[m]
    expected = torch.zeros_like(raw)
    expected[m] = (vals - vals.mean()) / torch.sqrt(vals.var() + 1e-8) + vals.mean()
    run.cfg.ppo.whiten_rewards = True
    white = copy.deepcopy(ro)
    ppo.compute_advantages(run, white)
    torch.testing.assert_close(white.rewards.double(), expected, rtol=1e-5, atol=1e-6)
    assert float(vals.std()) != pytest.approx(1.0, abs=1e-2)  # else the test could not tell
    assert not torch.allclose(white.returns, ro.returns)
    from hybrid_ds.algorithms.registry import PHASES
    from hybrid_ds.run.loop import phase_step

    m = phase_step(run, PHASES["ppo"])
    assert all(math.isfinite(v) for v in m.values())


@pytest.mark.parametrize("mini,accum", [(4, 4), (4, 2), (2, 1), (2, 2)], ids=["1x4", "2x2", "mini2x1", "mini1x2"])
def test_ppo_accumulation_gives_the_same_update(tmp_path, mini, accum):
    """One PPO update (2 epochs) on the same rollout: micro-batch x PPO_GRAD_ACCUM settings of the same
    PPO_MINI give the same weights (1e-5) as accumulation 1. GPT-2's key third of c_attn.bias is left
    out (launch_utils.rel_norm_diffs): its gradient is identically zero, since softmax is invariant to
    a per-query shift, so Adam turns float round-off there into +-lr steps whatever the split."""
    from launch_utils import rel_norm_diffs

    keys = dict(PPO_BATCH=4, PPO_MINI=mini, PPO_EPOCHS=2)
    ref = make_run(base(tmp_path / "ref", "ppo", PPO_GRAD_ACCUM=1, **keys))
    acc = make_run(base(tmp_path / "acc", "ppo", PPO_GRAD_ACCUM=accum, **keys))
    ro = prepared_rollout(ref, ref.examples[:4])
    w0 = weights(ref)
    m1 = ppo.ppo_epochs(ref, copy.deepcopy(ro), None)
    m2 = ppo.ppo_epochs(acc, copy.deepcopy(ro), None)
    w1, w2 = weights(ref), weights(acc)
    assert changed(w0, w1, "lm.") and changed(w0, w1, "v_head.")
    diffs = rel_norm_diffs(w1, w2)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-5, (worst, diffs[worst])
    for k in ("ppo/loss/policy", "ppo/loss/value", "ppo/grad_norm"):
        assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6), (k, m1[k], m2[k])


def test_ref_init_after_warmup_snapshots_the_warmed_up_policy(tmp_path):
    """examples/demo.json's path, shortened: SFT_WARMUP_STEPS, then the reference is the policy as it
    was after the warm-up, not the initial weights (REF_INIT=start keeps the initial weights)."""
    import json
    import os

    from hybrid_ds.algorithms.registry import PHASES
    from hybrid_ds.run.loop import phase_step, train

    from launch_utils import REPO

    with open(os.path.join(REPO, "examples", "demo.json")) as f:
        demo = json.load(f)
    assert demo["REF_INIT"] == "after_warmup" and demo["SFT_WARMUP_STEPS"] > 0
    short = dict(SFT_WARMUP_STEPS=2, MAX_STEPS=1, SFT_BATCH=8, PPO_BATCH=4, PPO_MINI=4, PPO_EPOCHS=1,
                 MAX_NEW_TOKENS=6, NUM_WARMUP_STEPS=0,
                 REF_SYNC_EVERY=0)  # the reference REF_INIT made, not synced after the cycle's SFT step
    for ref_init in ("after_warmup", "start"):
        run = make_run({**demo, **short, "REF_INIT": ref_init, "OUTPUT_DIR": str(tmp_path / ref_init)})
        lm = run.engine.module.lm
        initial = {k: v.detach().clone() for k, v in lm.state_dict().items()}
        for _ in range(2):  # the warm-up, step by step, to see the policy at its end
            phase_step(run, PHASES["sft"])
        warmed = {k: v.detach().clone() for k, v in lm.state_dict().items()}
        train(run)  # the warm-up is done: takes the snapshot, then runs the cycle
        run.logger.close()
        assert run.counters.cycle == 1 and run.counters.ppo_update == 1
        ref = run.ref.state_dict()
        want = warmed if ref_init == "after_warmup" else initial
        assert all(torch.equal(ref[k], want[k]) for k in want), ref_init
        assert any(not torch.equal(warmed[k], initial[k]) for k in initial)
        assert any(not torch.equal(lm.state_dict()[k], ref[k]) for k in ref)  # the cycle moved the policy on
        assert run.counters.ref_snapshot == (1 if ref_init == "after_warmup" else 0)


def test_nonfinite_ppo_update_is_skipped_counted_and_stops_the_run(tmp_path):
    """NaN value-head outputs in the training forwards (not caught by the ratio guard): the update is
    skipped (weights and KL controller unchanged) and counted; a finite update resets the streak;
    MAX_NAN_STEPS in a row stop the run."""
    from hybrid_ds.run.faults import NonFiniteLossError
    from hybrid_ds.algorithms.registry import PHASES
    from hybrid_ds.run.loop import phase_step

    run = make_run(base(tmp_path, "ppo", MAX_NAN_STEPS=2, MAX_STEPS=5))
    poison = {"on": True}
    run.engine.module.v_head.register_forward_hook(
        lambda mod, inp, out: out * float("nan") if mod.training and poison["on"] else out)
    w0, kl0 = weights(run), run.kl_ctl.state_dict()
    m = phase_step(run, PHASES["ppo"])
    assert not math.isfinite(m["ppo/loss/value"]) and m["faults/nonfinite_total"] == 1.0
    w1 = weights(run)
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "a non-finite update reached the weights"
    assert run.kl_ctl.state_dict() == kl0 and run.counters.nan_streak == 1
    poison["on"] = False
    m = phase_step(run, PHASES["ppo"])
    assert all(math.isfinite(v) for v in m.values()) and run.counters.nan_streak == 0
    assert changed(w1, weights(run), "lm.") and changed(w1, weights(run), "v_head.")
    poison["on"] = True
    phase_step(run, PHASES["ppo"])
    with pytest.raises(NonFiniteLossError, match=r"2 non-finite losses in a row \(MAX_NAN_STEPS=2\), "
                                                 r"the last at PPO update 4 \(ppo/loss/value\)"):
        phase_step(run, PHASES["ppo"])
    run.logger.close()
