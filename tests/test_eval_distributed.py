"""Evaluation does not depend on the world size: 2 processes under ZeRO-3 (shards of 3 and 2 items, so
one rank runs a dropped dummy forward to keep ZeRO-3's parameter gathers in step) report the loss and
the greedy responses' reward of 1 process on the same weights."""

import json

import pytest
from inproc import base, make_run
from launch_utils import launch, metrics

from hybrid_ds.assets import DEMO_TASKS
from hybrid_ds.run.loop import train
from hybrid_ds.run.metrics import read_metrics

pytestmark = pytest.mark.slow


def test_two_ranks_zero3_evaluate_as_one(tmp_path):
    with open(DEMO_TASKS) as f:
        items = json.load(f)[-5:]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(it) + "\n" for it in items))
    # Hybrid cycles of one SFT step and no PPO update: the reward is built, and a learning rate of 1e-9
    # leaves the weights the same to far below what the loss or a greedy token could show.
    keys = dict(EVAL_FILE=str(eval_file), MAX_STEPS=1, CYCLE_PPO_UPDATES=0, LR_SFT=1e-9, SFT_BATCH=2, MAXSEQ=64,
                REWARD={"type": "levenshtein"})
    two = base(tmp_path / "two", "hybrid", **keys)
    launch(two, tmp_path, nproc=2, zero=3)
    (row,) = metrics(two["OUTPUT_DIR"], "eval")
    run = make_run(base(tmp_path / "one", "hybrid", **keys))
    train(run)
    run.logger.close()
    (ref,) = read_metrics(run.cfg.run.output_dir, "eval")
    assert row["eval/items"] == ref["eval/items"] == 5 and row["eval/tokens"] == ref["eval/tokens"]
    assert row["eval/loss"] == pytest.approx(ref["eval/loss"], rel=1e-5)
    assert row["eval/reward_mean"] == pytest.approx(ref["eval/reward_mean"], abs=1e-6)
    assert row["eval/response_len"] == ref["eval/response_len"]
