"""The fast tier's training smoke: one in-process, one-process run (tests/inproc.py) of an SFT step,
a PPO update and a checkpoint round trip, on the builtin tiny GPT-2 (about 15 s together)."""

import math

import torch

from inproc import base, changed, make_run, weights

from hybrid_ds.run import checkpoint as ck
from hybrid_ds.run import checkpoint_dir as cdir
from hybrid_ds.algorithms.sft import sft_step


def test_sft_steps_lower_the_loss_on_a_repeated_batch(tmp_path):
    run = make_run(base(tmp_path, "sft", LR_SFT=3e-3))
    batch = run.examples[:8]
    w0 = weights(run)
    losses = [sft_step(run.engine, batch, accum=2, lr=3e-3, pad_id=run.tokenizer.pad_token_id,
                       dist=run.dist)["sft/loss"] for _ in range(4)]
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0] - 0.5, losses
    w1 = weights(run)
    assert changed(w0, w1, "lm.") and not changed(w0, w1, "v_head."), "SFT moves the policy only"


def test_ppo_update_changes_policy_and_value_with_finite_metrics(tmp_path):
    from hybrid_ds.algorithms.registry import PHASES
    from hybrid_ds.run.loop import phase_step

    run = make_run(base(tmp_path, "ppo", PPO_MINI=2, PPO_EPOCHS=2))
    w0 = weights(run)
    m = phase_step(run, PHASES["ppo"])
    assert all(math.isfinite(v) for v in m.values()), {k: v for k, v in m.items() if not math.isfinite(v)}
    for k in ("ppo/loss/policy", "ppo/loss/value", "objective/kl", "ppo/reward_mean", "ppo/clipfrac"):
        assert k in m, k
    assert m["ppo/skipped_microbatches"] == 0.0 and run.counters.ppo_update == 1
    w1 = weights(run)
    assert changed(w0, w1, "lm.") and changed(w0, w1, "v_head."), "PPO moves policy and value head"


def test_checkpoint_save_and_load_restore_weights_and_state_exactly(tmp_path):
    from hybrid_ds.algorithms.registry import PHASES
    from hybrid_ds.run.loop import phase_step

    cfg = base(tmp_path, "sft", MAX_STEPS=4)
    run = make_run(cfg)
    for _ in range(2):
        phase_step(run, PHASES["sft"])
    path = ck.save_checkpoint(run)
    saved_w, saved_opt = weights(run), run.engine.optimizer.state_dict()
    run.logger.close()
    assert cdir.find_latest(cfg["OUTPUT_DIR"]) == path and path.endswith("step-0000002")

    fresh = make_run(cfg)
    assert changed(weights(fresh), saved_w, "lm.")  # a fresh build starts from the initial weights
    ck.load_checkpoint(fresh, cdir.read_point(path))
    w = weights(fresh)
    assert w.keys() == saved_w.keys() and all(torch.equal(w[k], saved_w[k]) for k in w)
    opt = fresh.engine.optimizer.state_dict()["state"]
    assert opt.keys() == saved_opt["state"].keys() and opt
    for i, s in saved_opt["state"].items():
        assert all(torch.equal(torch.as_tensor(s[k]), torch.as_tensor(opt[i][k])) for k in s), i
    assert fresh.counters.sft_step == 2
    assert fresh.streams["sft"].state_dict() == run.streams["sft"].state_dict()
    # and the two continue identically
    a, b = phase_step(run, PHASES["sft"]), phase_step(fresh, PHASES["sft"])
    assert a["sft/loss"] == b["sft/loss"]
    fresh.logger.close()
