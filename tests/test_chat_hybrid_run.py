"""A hybrid run on conversational data through the real entry point (``hybrid_ds.run.cli.main`` on 2
forked ranks under ZeRO-2), a tiny model whose tokenizer carries a ChatML-like chat template
(tests/chat_data.py)."""

import os

import pytest

from chat_data import chat_model_dir, conversations, write_jsonl
from launch_utils import assert_finite_rows, forked_runs, metrics

pytestmark = pytest.mark.slow


def test_hybrid_on_messages_zero2_two_processes(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(16))
    cfg = {"MODE": "hybrid", "MODEL": chat_model_dir(), "TRAIN_FILE": data, "OUTPUT_DIR": str(tmp_path / "run"),
           "SEED": 0, "SFT_BATCH": 4, "PPO_BATCH": 4, "PPO_EPOCHS": 1, "MAXSEQ": 96, "MAX_NEW_TOKENS": 4,
           "MAX_STEPS": 2, "LR_SFT": 1e-3, "LR_PPO": 1e-4, "SCHEDULER": "constant", "REWARD": {"type": "word_f1"}}
    done, log = forked_runs({"chat": ({**cfg, "ZERO_STAGE": 2}, 2)}, tmp_path)
    assert done.get("chat", (None,))[0] == 0, log
    assert "format: messages (detected)" in log
    out = cfg["OUTPUT_DIR"]
    assert_finite_rows(metrics(out, "sft"), 2, "sft")
    assert_finite_rows(metrics(out, "ppo"), 2, "ppo")
    # the saved tokenizer keeps the template the run rendered with
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(out, "inference_lm"))
    assert "<|im_start|>" in tok.chat_template and tok.convert_tokens_to_ids("<|im_end|>") == len(tok) - 1
