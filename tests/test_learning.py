"""Real learning on the embedded tasks (CPU, a few minutes): SFT warm-up, then PPO raises a reward.

The word tasks (copy/reverse/sort/first/last) make word-F1 a reward the policy can climb: the right
words are in the prompt. Sampling uses plain temperature/top-p: the seed defaults' no-repeat-ngram
and repetition penalty count prompt tokens, so they forbid exactly the copying these tasks need.
Each run is ``python -m hybrid_ds.train``'s main in this process (tests/inproc.py): learning, not the
launcher, is the point here.
"""

import json

import pytest

from inproc import train
from launch_utils import metrics

pytestmark = pytest.mark.slow
WORD_TASKS = ("copy", "reverse", "sort", "first", "last")
PPO = {"MODE": "ppo", "SEED": 0, "PPO_BATCH": 32, "PPO_MINI": 16, "PPO_EPOCHS": 4, "LR_PPO": 2e-4,
       "VF_COEF": 0.5, "TEMPERATURE": 1.0, "NO_REPEAT_NGRAM_SIZE": 0, "REPETITION_PENALTY": 1.0,
       "MAX_NEW_TOKENS": 12, "MAXSEQ": 128, "SCHEDULER": "constant"}


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """An SFT warm-up on the word tasks; returns (model dir, data file)."""
    from hybrid_ds.assets import DEMO_TASKS

    tmp = tmp_path_factory.mktemp("learn")
    with open(DEMO_TASKS) as f:
        items = [i for i in json.load(f) if i["task"] in WORD_TASKS]
    data = tmp / "words.json"
    data.write_text(json.dumps(items))
    cfg = {"MODE": "sft", "MODEL": "builtin:tiny-gpt2", "TRAIN_FILE": str(data), "OUTPUT_DIR": str(tmp / "sft"),
           "SEED": 0, "SFT_BATCH": 16, "LR_SFT": 2e-3, "MAX_STEPS": 500, "SCHEDULER": "constant_with_warmup",
           "NUM_WARMUP_STEPS": 20, "MAXSEQ": 128, "LOG_EVERY": 50}
    train(cfg, tmp, name="sft")
    return str(tmp / "sft" / "inference_lm"), str(data), tmp


def curve(out, key="ppo/reward_mean", window=10):
    r = [row[key] for row in metrics(out, "ppo")]
    return [round(sum(r[i:i + window]) / len(r[i:i + window]), 3) for i in range(0, len(r), window)]


def test_ppo_raises_word_f1_after_sft_warmup(warm):
    model, data, tmp = warm
    cfg = {**PPO, "MODEL": model, "TRAIN_FILE": data, "OUTPUT_DIR": str(tmp / "f1"), "MAX_STEPS": 80,
           "REWARD": {"type": "word_f1"}}
    train(cfg, tmp, name="f1")
    c = curve(cfg["OUTPUT_DIR"])
    r = [row["ppo/reward_mean"] for row in metrics(cfg["OUTPUT_DIR"], "ppo")]
    before, after = sum(r[:10]) / 10, sum(r[-30:]) / 30  # one 10-update window is +-0.02 noise
    print("word_f1 reward, mean per 10 updates:", c, f"first 10: {before:.3f}, last 30: {after:.3f}")
    assert after > before + 0.04, f"PPO did not raise word-F1 measurably: {c}"


def test_ppo_moves_a_target_free_reward_toward_its_goal(warm):
    """A reward that ignores targets: responses should start with a letter a-h."""
    model, data, tmp = warm
    cfg = {**PPO, "MODEL": model, "TRAIN_FILE": data, "OUTPUT_DIR": str(tmp / "fmt"), "MAX_STEPS": 30,
           "REWARD": {"type": "format", "mode": "search", "pattern": "^[a-h]"}}
    train(cfg, tmp, name="fmt")
    c = curve(cfg["OUTPUT_DIR"])
    print("format reward, mean per 10 updates:", c)
    assert c[-1] > c[0] + 0.15 and c[-1] > 0.75, f"PPO did not move the format reward: {c}"
