"""The preference phases on 2 processes, forked from one interpreter (launch_utils.forked_runs): a hybrid
SFT + DPO run under ZeRO-2, and MODE=rm under ZeRO-3, resumed from its checkpoint."""

import json
import os

import pytest

import inproc
from launch_utils import assert_finite_rows, forked_runs, metrics
from test_dpo import reversal_pairs
from test_rm import reversal_pairs as ranked_pairs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three jobs in one forked_runs call: ``hybrid_dpo``, then ``rm`` (2 steps) and ``rm_resume`` (to 4
    steps in the same OUTPUT_DIR). Returns ({name: (exit code, seconds)}, log, {name: config})."""
    tmp = tmp_path_factory.mktemp("pref_runs")
    (tmp / "dpo_pairs.json").write_text(json.dumps(reversal_pairs(8, 0)))
    (tmp / "rm_pairs.json").write_text(json.dumps(ranked_pairs(8, 0)))
    hybrid = inproc.base(tmp / "hybrid", mode="hybrid", HYBRID_RL="dpo", PREF_FILE=str(tmp / "dpo_pairs.json"),
                         PREF_BATCH=4, LR_PREF=3e-4, DPO_BETA=0.5, SFT_BATCH=4, MAX_STEPS=3, CYCLE_SFT_STEPS=1,
                         CYCLE_PPO_UPDATES=2, MAX_NAN_STEPS=1, ZERO_STAGE=2)
    rm = inproc.base(tmp / "rm", mode="rm", TRAIN_FILE=str(tmp / "rm_pairs.json"), EVAL_FILE=str(tmp / "rm_pairs.json"),
                     PREF_BATCH=4, LR_PREF=1e-3, MAX_STEPS=2, SAVE_EVERY=1, MAX_NAN_STEPS=1, ZERO_STAGE=3)
    resumed = {**rm, "MAX_STEPS": 4}
    dpo = inproc.base(tmp / "dpo", mode="dpo", TRAIN_FILE=str(tmp / "dpo_pairs.json"), PREF_BATCH=4, LR_PREF=3e-4,
                      DPO_BETA=0.5, MAX_STEPS=3, ZERO_STAGE=2)
    separate = {**dpo, "OUTPUT_DIR": str(tmp / "dpo_separate"), "REF_PLACEMENT": "separate", "REF_RANKS": 1}
    cfgs = {"hybrid_dpo": hybrid, "rm": rm, "rm_resume": resumed, "dpo": dpo, "dpo_separate": separate}
    done, log = forked_runs({name: (c, 1 if name == "dpo" else 2) for name, c in cfgs.items()}, tmp)
    return done, log, cfgs


def test_dpo_with_the_reference_on_its_own_rank_equals_the_colocated_run(runs):
    """REF_PLACEMENT=separate: the reference rank scores the pairs' responses (reference/protocol.py's
    log-prob requests); the policy's DPO steps are those of the colocated run."""
    done, log, cfgs = runs
    assert done.get("dpo", (None,))[0] == 0 and done.get("dpo_separate", (None,))[0] == 0, log[-4000:]
    near, far = metrics(cfgs["dpo"]["OUTPUT_DIR"], "dpo"), metrics(cfgs["dpo_separate"]["OUTPUT_DIR"], "dpo")
    assert_finite_rows(far, 3, "dpo")
    assert os.path.isfile(os.path.join(cfgs["dpo_separate"]["OUTPUT_DIR"], "reference-rank-1.pid"))
    for a, b in zip(near, far):
        for k in ("dpo/loss", "dpo/rewards/chosen", "dpo/rewards/rejected", "dpo/rewards/margins"):
            assert abs(a[k] - b[k]) < 1e-5 + 1e-4 * abs(a[k]), (k, a[k], b[k])
    assert far[-1]["dpo/rewards/margins"] > 0


def test_hybrid_sft_and_dpo_on_two_processes_zero2(runs):
    done, log, cfgs = runs
    assert done.get("hybrid_dpo", (None,))[0] == 0, log[-4000:]
    assert "preference pairs: items: 8 in file, 8 used" in log
    out = cfgs["hybrid_dpo"]["OUTPUT_DIR"]
    assert_finite_rows(metrics(out, "sft"), 3, "sft")
    rows = metrics(out, "dpo")
    assert_finite_rows(rows, 6, "dpo")  # CYCLE_PPO_UPDATES counts DPO steps: 2 per cycle
    assert rows[-1]["dpo/rewards/margins"] > rows[0]["dpo/rewards/margins"], rows
    assert rows[-1]["curriculum/ppo_updates"] == 2
    assert not metrics(out, "ppo")
    assert os.path.isfile(os.path.join(out, "inference_lm", "model.safetensors"))
    from hybrid_ds.run.report import summarise

    assert "dpo/rewards/margins" in summarise(out) and "sft/loss" in summarise(out)


def test_rm_under_zero3_resumes_and_writes_a_reward_model(runs):
    from transformers import AutoModelForSequenceClassification

    done, log, cfgs = runs
    assert done.get("rm", (None,))[0] == 0 and done.get("rm_resume", (None,))[0] == 0, log[-4000:]
    out = cfgs["rm"]["OUTPUT_DIR"]
    assert "resum" in log.lower()
    assert_finite_rows(metrics(out, "rm"), 4, "rm")  # steps 1-2, then 3-4 after the resume
    assert [r["step"] for r in metrics(out, "eval")] == [2, 4]
    with open(os.path.join(out, "checkpoints", "latest")) as f:
        assert f.read().strip() == "step-0000004"
    model = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "reward_model"))
    assert model.config.num_labels == 1 and model.score.weight.abs().sum() > 0
