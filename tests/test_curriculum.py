"""The SFT->PPO curriculum: closed-form mixes, and a hybrid run that logs the changing composition."""

import pytest

from hybrid_ds.config import build_config
from hybrid_ds.run.curriculum import plan
from inproc import train
from launch_utils import metrics


def cfg_with(**kv):
    cfg, problems = build_config({"MODE": "hybrid", "MODEL": "builtin:tiny-gpt2", "TRAIN_FILE": "x",
                                  "OUTPUT_DIR": "y", **kv})
    assert not problems, problems
    return cfg


def test_linear_and_step_mixes():
    lin = cfg_with(CYCLE_SFT_STEPS=4, CYCLE_PPO_UPDATES=1, CURRICULUM="linear", CURRICULUM_SFT_STEPS_END=1,
                   CURRICULUM_PPO_UPDATES_END=3)
    assert plan(lin, 4) == [(4, 1), (3, 2), (2, 2), (1, 3)]  # 4 - 3c/3, 1 + 2c/3 rounded
    step = cfg_with(CYCLE_SFT_STEPS=4, CYCLE_PPO_UPDATES=0, CURRICULUM="step", CURRICULUM_SFT_STEPS_END=0,
                    CURRICULUM_PPO_UPDATES_END=2, CURRICULUM_STAGES=2)
    assert plan(step, 6) == [(4, 0)] * 3 + [(0, 2)] * 3
    assert plan(cfg_with(CYCLE_SFT_STEPS=2), 3) == [(2, 1)] * 3  # none


@pytest.mark.slow
def test_hybrid_run_follows_the_curriculum(tmp_path):
    """A real run (python -m hybrid_ds.train's main, in this process: tests/inproc.py) logs each
    cycle's planned mix."""
    cfg = {"MODE": "hybrid", "MODEL": "builtin:tiny-gpt2", "TRAIN_FILE": "builtin:demo-tasks",
           "OUTPUT_DIR": str(tmp_path / "out"), "SEED": 0, "SFT_BATCH": 4, "PPO_BATCH": 4, "PPO_EPOCHS": 1,
           "MAX_NEW_TOKENS": 4, "MAXSEQ": 96, "MAX_STEPS": 4, "SCHEDULER": "constant", "REWARD": {"type": "word_f1"},
           "CYCLE_SFT_STEPS": 3, "CYCLE_PPO_UPDATES": 1, "CURRICULUM": "linear", "CURRICULUM_SFT_STEPS_END": 0,
           "CURRICULUM_PPO_UPDATES_END": 2}
    train(cfg, tmp_path)
    sft, ppo = metrics(cfg["OUTPUT_DIR"], "sft"), metrics(cfg["OUTPUT_DIR"], "ppo")
    assert len(sft) == 3 + 2 + 1 + 0 and len(ppo) == 1 + 1 + 2 + 2
    per_cycle = {}
    for row in sft + ppo:
        per_cycle[row["progress/cycle"]] = (row["curriculum/sft_steps"], row["curriculum/ppo_updates"])
    assert [per_cycle[c] for c in sorted(per_cycle)] == [(3, 1), (2, 1), (1, 2), (0, 2)]
