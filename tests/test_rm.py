"""MODE=rm (hybrid_ds/algorithms/rm.py): a reward model trained on preference pairs raises held-out pair
accuracy, is written as an AutoModelForSequenceClassification directory that scores as it did in
training, and drives a PPO run as its ``reward_model`` reward; with LoRA too."""

import json
import os
import random

import pytest
import torch

import inproc
from hybrid_ds.algorithms import rm
from hybrid_ds.run import loop
from hybrid_ds.run.outputs import REWARD_MODEL_DIR, save_outputs
from launch_utils import assert_finite_rows, metrics

WORDS = "red blue green cat dog sun moon tree fish bird".split()


def reversal_pairs(n: int, seed: int) -> list[dict]:
    """Checkably ranked pairs: chosen reverses the prompt's three words, rejected drops one of them."""
    r, out = random.Random(seed), []
    for _ in range(n):
        w = r.sample(WORDS, 3)
        wrong = w[::-1]
        del wrong[r.randrange(3)]
        out.append({"prompt": f"reverse: {' '.join(w)}\nanswer:", "chosen": " " + " ".join(w[::-1]),
                    "rejected": " " + " ".join(wrong)})
    return out


def rm_cfg(tmp_path, **keys):
    train, held_out = tmp_path / "train.json", tmp_path / "eval.json"
    train.write_text(json.dumps(reversal_pairs(32, 0)))
    held_out.write_text(json.dumps(reversal_pairs(16, 1)))
    return inproc.base(tmp_path, mode="rm", TRAIN_FILE=str(train), **{
        "EVAL_FILE": str(held_out), "PREF_BATCH": 8, "LR_PREF": 1e-3, "MAX_STEPS": 12, "EVAL_EVERY": 6, **keys})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One MODE=rm run: the run, held-out metrics before training, and its reward_model/ directory."""
    tmp = tmp_path_factory.mktemp("rm")
    run = inproc.make_run(rm_cfg(tmp))
    before = rm.evaluate_pairs(run, run.eval_pairs)
    loop.train(run)
    save_outputs(run)
    return run, before, os.path.join(run.cfg.run.output_dir, REWARD_MODEL_DIR)


def test_rm_raises_held_out_pair_accuracy(trained):
    run, before, _ = trained
    evals = metrics(run.cfg.run.output_dir, "eval")
    assert [r["step"] for r in evals] == [6, 12]
    assert evals[-1]["eval/items"] == 16
    assert evals[-1]["eval/accuracy"] >= 0.75 and evals[-1]["eval/accuracy"] > before["eval/accuracy"], \
        (before, evals)
    assert evals[-1]["eval/loss"] < before["eval/loss"]
    rows = metrics(run.cfg.run.output_dir, "rm")
    assert_finite_rows(rows, 12, "rm")
    assert rows[0]["rm/loss"] == pytest.approx(0.6931, abs=1e-2)  # a near-zero head: every pair about tied
    assert run.engine.module.v_head.bias is None


def test_reward_model_dir_scores_as_in_training(trained):
    """AutoModelForSequenceClassification loads reward_model/, and the reward_model reward on
    prompt + response gives the scores the trained engine gave the same pairs."""
    from transformers import AutoModelForSequenceClassification

    from hybrid_ds.rewards import make_reward

    run, _, path = trained
    model = AutoModelForSequenceClassification.from_pretrained(path)
    assert model.config.num_labels == 1 and model.config.pad_token_id == run.tokenizer.pad_token_id
    pairs = run.eval_pairs[:4]
    with torch.no_grad():
        run.engine.eval()
        want, _ = rm.pair_scores(run.engine, rm.collate_scored(pairs, run.tokenizer.pad_token_id,
                                                               run.tokenizer.eos_token_id), "cpu")
    reward = make_reward({"type": "reward_model", "model": path}, device="cpu")
    got = reward.score_batch([p.item[s] for s in ("chosen", "rejected") for p in pairs],
                             [""] * 8, [p.item["prompt"] for s in ("chosen", "rejected") for p in pairs])
    assert torch.allclose(torch.tensor(got), want.float(), atol=1e-4), (got, want)


def test_the_reward_model_drives_ppo(trained, tmp_path):
    _, _, path = trained
    cfg = inproc.base(tmp_path, mode="ppo", MAX_STEPS=1, REWARD={"type": "reward_model", "model": path})
    run = inproc.make_run(cfg)
    loop.train(run)
    (row,) = metrics(run.cfg.run.output_dir, "ppo")
    assert torch.isfinite(torch.tensor(row["ppo/reward_mean"])) and row["ppo/reward_std"] > 0, row


def test_rm_with_lora_writes_a_merged_reward_model(tmp_path):
    from transformers import AutoModelForSequenceClassification

    run = inproc.make_run(rm_cfg(tmp_path, LORA_R=4, MAX_STEPS=1, EVAL_FILE="", EVAL_EVERY=0))
    loop.train(run)
    save_outputs(run)
    assert metrics(run.cfg.run.output_dir, "rm")[-1]["rm/loss"] < 1.0
    model = AutoModelForSequenceClassification.from_pretrained(os.path.join(run.cfg.run.output_dir,
                                                                            REWARD_MODEL_DIR))
    head = {k: v for k, v in run.engine.module.state_dict().items() if k.startswith("v_head.")}
    assert torch.equal(model.score.weight, head["v_head.weight"])  # the trained head, saved as score
