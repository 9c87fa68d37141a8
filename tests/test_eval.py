"""Evaluation on EVAL_FILE (hybrid_ds/algorithms/evaluate.py), in-process runs on the builtin tiny GPT-2:
eval rows at EVAL_EVERY and at the end, the loss equal to one recomputed by hand on the same items, the
reward of greedy responses equal to scoring responses generated one prompt at a time, and the reward's
EMA state untouched."""

import json

import pytest
import torch
from inproc import base, make_run

from hybrid_ds.algorithms.evaluate import evaluate
from hybrid_ds.assets import DEMO_TASKS
from hybrid_ds.data import IGNORE_INDEX, stop_token_ids
from hybrid_ds.run.loop import train
from hybrid_ds.run.metrics import read_metrics

EMA_REWARD = {"type": "levenshtein", "postprocess": [{"type": "ema_normalize", "decay": 0.9}]}


def _eval_file(tmp_path, n=5):
    with open(DEMO_TASKS) as f:
        items = json.load(f)[-n:]  # the demo file's last items, as a held-out set
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    return str(path)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """A 3-cycle hybrid run evaluated every 2 cycles (and at the end) on 5 held-out items."""
    tmp = tmp_path_factory.mktemp("eval_hybrid")
    run = make_run(base(tmp, "hybrid", EVAL_FILE=_eval_file(tmp), EVAL_EVERY=2, MAX_STEPS=3, REWARD=EMA_REWARD,
                        SFT_BATCH=4))
    train(run)
    run.logger.close()
    return run, read_metrics(run.cfg.run.output_dir, "eval")


def test_eval_rows_at_eval_every_and_at_the_end(hybrid):
    run, rows = hybrid
    assert [r["step"] for r in rows] == [2, 3]
    for r in rows:
        assert r["eval/items"] == 5 and r["eval/tokens"] > 0 and r["eval/loss"] > 0
        assert {"eval/reward_mean", "eval/reward_std", "eval/response_len", "eval/eos_frac"} <= set(r)
    assert rows[0]["eval/loss"] != rows[1]["eval/loss"]  # a cycle of training in between


def test_eval_loss_equals_a_recomputed_loss(hybrid):
    run, rows = hybrid
    lm = run.engine.module.lm
    ce, n = 0.0, 0
    with torch.no_grad():
        for ex in run.eval_examples:
            ids, labels = ex.sft_sequence()
            logits = lm(torch.tensor([ids])).logits[0, :-1].double()
            target = torch.tensor(labels[1:])
            keep = target != IGNORE_INDEX
            ce += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
            n += int(keep.sum())
    assert rows[-1]["eval/tokens"] == n
    assert rows[-1]["eval/loss"] == pytest.approx(ce / n, rel=1e-5)  # the weights of the last evaluation


def test_eval_reward_is_greedy_and_leaves_the_reward_state(hybrid):
    run, rows = hybrid
    state = json.dumps(run.reward.state_dict())
    again = evaluate(run, run.eval_examples)
    assert json.dumps(run.reward.state_dict()) == state  # EMA moments put back
    assert again["eval/reward_mean"] == pytest.approx(rows[-1]["eval/reward_mean"], abs=1e-9)
    assert again["eval/loss"] == pytest.approx(rows[-1]["eval/loss"], rel=1e-9)
    # Responses generated one prompt at a time (no padding), scored by the same reward from the same state.
    g, tok, lm = run.cfg.gen, run.tokenizer, run.engine.module.lm
    stops = stop_token_ids(tok)
    texts = []
    with torch.no_grad():
        for ex in run.eval_examples:
            out = lm.generate(input_ids=torch.tensor([ex.prompt_ids]), do_sample=False,
                              max_new_tokens=g.max_new_tokens, min_new_tokens=g.min_new_tokens,
                              no_repeat_ngram_size=g.no_repeat_ngram_size, repetition_penalty=g.repetition_penalty,
                              eos_token_id=stops, pad_token_id=tok.pad_token_id)
            resp = out[0, len(ex.prompt_ids):].tolist()
            cut = next((i for i, t in enumerate(resp) if t in stops), len(resp))
            texts.append(tok.decode(resp[:cut], skip_special_tokens=True))
    ex = run.eval_examples
    scores = run.reward.score_batch(texts, [e.target for e in ex], [e.prompt for e in ex], [e.item for e in ex])
    run.reward.load_state_dict(json.loads(state))
    assert again["eval/reward_mean"] == pytest.approx(sum(scores) / len(scores), abs=1e-6)


def test_sft_mode_evaluates_the_loss_only_and_trains_as_without(tmp_path):
    keys = dict(MAX_STEPS=2, SFT_BATCH=4)
    run = make_run(base(tmp_path / "a", "sft", EVAL_FILE=_eval_file(tmp_path, 3), EVAL_EVERY=1, **keys))
    train(run)
    run.logger.close()
    rows = read_metrics(run.cfg.run.output_dir, "eval")
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["eval/items"] == 3
    assert not any(k.startswith("eval/reward") for k in rows[0])
    plain = make_run(base(tmp_path / "b", "sft", **keys))  # no evaluation: the same training, bit for bit
    train(plain)
    plain.logger.close()
    a, b = run.engine.module.state_dict(), plain.engine.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["sft/loss"] for r in read_metrics(run.cfg.run.output_dir, "sft")] == \
        [r["sft/loss"] for r in read_metrics(plain.cfg.run.output_dir, "sft")]
