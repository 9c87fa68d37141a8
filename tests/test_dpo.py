"""Preference pairs (hybrid_ds/data/pairs.py), their config keys, and the DPO phase (algorithms/dpo.py):
in-process runs with a colocated reference and with LoRA's adapters-off reference (the 2-process runs:
tests/test_pref_runs.py)."""

import json
import random

import pytest

import inproc
from hybrid_ds.algorithms import dpo
from hybrid_ds.config import ConfigError
from hybrid_ds.data import DataError, collate_pairs, load_pairs, tokenize_pairs
from hybrid_ds.run import loop
from hybrid_ds.run.preflight import load_config
from launch_utils import assert_finite_rows, metrics

WORDS = "red blue green cat dog sun moon tree fish bird".split()


def reversal_pairs(n: int, seed: int) -> list[dict]:
    """Checkably ranked pairs: chosen is the prompt's words reversed, rejected the words as given."""
    r, out = random.Random(seed), []
    for _ in range(n):
        w = r.sample(WORDS, 3)
        out.append({"prompt": f"reverse: {' '.join(w)}\nanswer:", "chosen": " " + " ".join(w[::-1]),
                    "rejected": " " + " ".join(w)})
    return out


def write(path, rows) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


# ----------------------------------------------------------------------------------------------
# data


def test_text_pairs_share_the_prompt_and_label_only_the_responses(tmp_path):
    from hybrid_ds.models.policy_value import load_tokenizer

    tok = load_tokenizer("builtin:tiny-gpt2")
    path = write(tmp_path / "p.json", reversal_pairs(3, 0))
    pairs = tokenize_pairs(load_pairs(path, shuffle=False), tok, 96)
    assert len(pairs) == 3
    for p in pairs:
        assert p.chosen.prompt_ids == p.rejected.prompt_ids
        assert tok.decode(p.chosen.target_ids[:-1]) == p.item["chosen"]  # then EOS
        assert p.rejected.target_ids[-1] == tok.eos_token_id
    b = collate_pairs(pairs[:2], tok.pad_token_id)
    assert b["input_ids"].shape[0] == 4  # chosen rows, then rejected rows
    n_labels = (b["labels"] != -100).sum(1).tolist()
    assert n_labels == [len(pairs[0].chosen.target_ids), len(pairs[1].chosen.target_ids),
                        len(pairs[0].rejected.target_ids), len(pairs[1].rejected.target_ids)]


def test_message_pairs_render_through_the_chat_template(tmp_path):
    from hybrid_ds.data.reference import chatml_tokenizer

    tok = chatml_tokenizer()
    prompt = [{"role": "system", "content": "Reverse."}, {"role": "user", "content": "cat dog"}]
    item = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "dog cat"}],
            "rejected": [{"role": "assistant", "content": "cat dog"}]}
    (p,) = tokenize_pairs(load_pairs(write(tmp_path / "m.json", [item])), tok, 96)
    want = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert tok.decode(p.chosen.prompt_ids) == want == tok.decode(p.rejected.prompt_ids)
    assert tok.decode(p.chosen.target_ids).startswith("dog cat")
    assert tok.decode(p.rejected.target_ids).startswith("cat dog")
    assert tok.decode(p.chosen.target_ids[-1:]) == "<|im_end|>"  # the template's end of turn is labelled


@pytest.mark.parametrize("item,says", [
    ({"prompt": "a", "chosen": "b"}, "missing field 'rejected'"),
    ({"prompt": "a", "chosen": " ", "rejected": "c"}, "field 'chosen' is empty"),
    ({"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"}, "all be text or all"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "b"}],
      "rejected": [{"role": "assistant", "content": "c"}]}, "chosen ends with a 'user' turn"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "margin": "high"}, "field 'margin' is 'high'"),
])
def test_bad_pairs_name_the_file_and_item(tmp_path, item, says):
    path = write(tmp_path / "bad.json", reversal_pairs(2, 0) + [item])
    with pytest.raises(DataError) as e:
        load_pairs(path, key="PREF_FILE", shuffle=False)
    assert f"PREF_FILE {path!r} item 2: " in str(e.value) and says in str(e.value), str(e.value)
    assert len(load_pairs(path, on_bad_item="skip")) == 2


def test_builtin_demo_pairs_rank_the_correct_output_first():
    train = load_pairs("builtin:demo-pairs", shuffle=False)
    test = load_pairs("builtin:demo-pairs", split="test", shuffle=False)
    assert (len(train), len(test)) == (350, 50)
    assert all(p["chosen"] != p["rejected"] for p in train + test)
    assert test[0]["chosen"] == "forest" and "input: forest rain" in test[0]["prompt"]  # demo item 0: first word
    with pytest.raises(DataError, match="no split 'validation' \\(has train, test\\)"):
        load_pairs("builtin:demo-pairs", split="validation")


def test_pref_keys_are_checked_against_mode(tmp_path):
    pairs = write(tmp_path / "p.json", reversal_pairs(4, 0))
    cases = [({"MODE": "hybrid", "HYBRID_RL": "dpo"}, "PREF_FILE: required"),
             ({"MODE": "dpo", "PREF_FILE": pairs}, "PREF_FILE applies to MODE=hybrid"),
             ({"MODE": "ppo", "HYBRID_RL": "dpo"}, "HYBRID_RL (dpo) applies to MODE=hybrid"),
             ({"MODE": "dpo", "DPO_LOSS": "ipo", "DPO_LABEL_SMOOTHING": 0.1}, "DPO_LABEL_SMOOTHING applies"),
             ({"MODE": "dpo", "PREF_BATCH": 3, "PREF_GRAD_ACCUM": 2}, "PREF_BATCH (3) must be divisible"),
             ({"MODE": "dpo", "DPO_LOSS": "hinge"}, "DPO_LOSS: 'hinge' is not one of sigmoid, ipo"),
             ({"MODE": "dpo", "DPO_BETA": 0}, "DPO_BETA: 0.0 is out of range")]
    for keys, says in cases:
        cfg = inproc.base(tmp_path, TRAIN_FILE=pairs, **keys)
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"{k}={json.dumps(v)}" for k, v in cfg.items()], world_size=1)
        assert any(says in p for p in e.value.problems), (says, e.value.problems)
    with pytest.raises(ConfigError, match="REF_PLACEMENT=separate with MODE=rm: a reward model uses no reference"):
        load_config(None, [f"{k}={json.dumps(v)}" for k, v in inproc.base(
            tmp_path, mode="rm", TRAIN_FILE=pairs, REF_PLACEMENT="separate").items()], world_size=2)
    load_config(None, [f"{k}={json.dumps(v)}" for k, v in inproc.base(  # DPO's reference may have its own ranks
        tmp_path, mode="dpo", TRAIN_FILE=pairs, REF_PLACEMENT="separate").items()], world_size=2)


# ----------------------------------------------------------------------------------------------
# runs


def _dpo_run(tmp_path, **keys):
    pairs = write(tmp_path / "train.json", reversal_pairs(8, 0))
    cfg = inproc.base(tmp_path, mode="dpo", TRAIN_FILE=pairs, **{"PREF_BATCH": 4, "LR_PREF": 3e-4, "DPO_BETA": 0.5,
                                                                  "MAX_STEPS": 8, **keys})
    run = inproc.make_run(cfg)
    before = dpo.evaluate_pairs(run, run.pairs)
    loop.train(run)
    return run, before, dpo.evaluate_pairs(run, run.pairs)


def test_dpo_raises_the_margin_with_a_colocated_reference(tmp_path):
    run, before, after = _dpo_run(tmp_path)
    assert run.ref is not None and run.engine.module.v_head is None
    # the policy starts as its reference: every implicit reward is 0
    assert before["eval/rewards/margins"] == 0.0 and before["eval/rewards/accuracies"] == 0.0
    assert after["eval/rewards/margins"] > 0.5, after
    assert after["eval/rewards/accuracies"] >= 0.75, after
    assert after["eval/loss"] < before["eval/loss"]
    rows = metrics(run.cfg.run.output_dir, "dpo")
    assert_finite_rows(rows, 8, "dpo")
    for k in ("dpo/loss", "dpo/rewards/chosen", "dpo/rewards/rejected", "dpo/rewards/margins",
              "dpo/rewards/accuracies", "dpo/grad_norm", "dpo/lr"):
        assert k in rows[-1], k
    assert rows[0]["dpo/loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: chosen and rejected tied at start
    assert run.counters.pref_step == 8


def test_dpo_ipo_with_lora_uses_the_adapters_off_reference(tmp_path):
    run, before, after = _dpo_run(tmp_path, LORA_R=4, DPO_LOSS="ipo", LR_PREF=3e-3, DPO_BETA=0.1)
    assert run.ref is None  # the reference is the base, adapters disabled
    assert before["eval/rewards/margins"] == 0.0
    assert after["eval/rewards/margins"] > 0.0 and after["eval/loss"] < before["eval/loss"], (before, after)
