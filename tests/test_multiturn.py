"""Multi-turn rollouts (ENV, MAX_TURNS; hybrid_ds/rollout/multiturn.py, algorithms/turn_math.py, docs/ppo.md §21).

1. The dialogue's ids and action mask, by hand on a 2-turn dialogue with the builtin tokenizer (plain
   rendering) and with a ChatML template; both equal the SFT tokenisation of the same conversation.
2. Environment tokens count for nothing: perturbing their log-probs, reference log-probs and values
   leaves the rewards, KL, advantages, losses and gradients exactly unchanged; GAE over the policy's
   tokens against hand-computed numbers.
3. The toy environment (envs/recall.py) in an in-process run: real dialogues of two turns, finite
   updates that move the policy and value weights, GAE and a critic-free estimator.
4. Bad ENV / MAX_TURNS values are config errors naming the key (exit 2).
"""

import os

import pytest
import torch

from conftest import REPO
from inproc import changed, make_run, weights

from hybrid_ds.algorithms import estimators as est
from hybrid_ds.algorithms import ppo
from hybrid_ds.algorithms import ppo_math as pm
from hybrid_ds.algorithms import turn_math as tm
from hybrid_ds.config import ConfigError
from hybrid_ds.data import tokenize_conversation, tokenize_items
from hybrid_ds.data.reference import builtin_tokenizer, chatml_tokenizer
from hybrid_ds.rollout import multiturn as mt
from hybrid_ds.run.preflight import load_config

RECALL = {"MODE": "ppo", "MODEL": "builtin:tiny-gpt2", "TRAIN_FILE": os.path.join(REPO, "envs", "recall.jsonl"),
          "ENV": "envs.recall:respond", "MAX_TURNS": 2, "SEED": 0, "PPO_BATCH": 4, "PPO_MINI": 2,
          "PPO_EPOCHS": 1, "LR_PPO": 1e-3, "MAX_NEW_TOKENS": 4, "MAXSEQ": 96, "SCHEDULER": "constant",
          "REWARD": {"type": "exact_match"}}
CONVERSATION = [{"role": "user", "content": "Remember knife."}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "Which word?"}, {"role": "assistant", "content": "knife"}]


def ask_once(messages, item):
    """The recall environment's rule, written out: one question after the policy's first turn."""
    return "Which word?" if sum(m["role"] == "assistant" for m in messages) == 1 else None


def ask_with_reward(messages, item):
    """The question after the first turn, with a reward of 0.5 for that turn; then the end."""
    if sum(m["role"] == "assistant" for m in messages) == 1:
        return {"role": "user", "content": "Which word?", "reward": 0.5}
    return None


def scripted(turns):
    """A policy whose i-th turn is ``turns[i]`` (ids) for every row; it records the contexts it saw."""
    seen = []

    def policy_turn(contexts, n):
        seen.append([list(c) for c in contexts])
        return [list(turns[len(seen) - 1])[:n] for _ in contexts]

    policy_turn.seen = seen
    return policy_turn


def two_turn_dialogue(tok, stops, first_turn_ends_with_stop=True):
    """The 2-turn dialogue of CONVERSATION played by a scripted policy: (prompt, dialogue, turn ids)."""
    ex = tokenize_items([{"messages": CONVERSATION}], tok, "output", 256)[0]
    prompt, history = mt.dialogue_start(ex)
    t1 = tok("ok", add_special_tokens=False)["input_ids"] + ([stops[-1]] if first_turn_ends_with_stop else [])
    t2 = tok("knife", add_special_tokens=False)["input_ids"] + [stops[-1]]
    policy = scripted([t1, t2])
    d, = mt.roll_dialogues(policy, ask_once, tok, [prompt], [history], [{}], max_turns=3, max_len=256,
                           max_new_tokens=8, stops=stops)
    return prompt, d, t1, t2, policy


# ---------------------------------------------------------------------------------------------
# 1. the action mask by hand


def test_plain_rendering_two_turns_by_hand():
    tok = builtin_tokenizer()
    eos = tok.eos_token_id
    prompt, d, t1, t2, policy = two_turn_dialogue(tok, [eos])
    assert tok.decode(prompt) == "### User:\nRemember knife.\n\n### Assistant:\n"
    env = tok("\n\n### User:\nWhich word?\n\n### Assistant:\n", add_special_tokens=False)["input_ids"]
    assert t1[-1] == eos and d.ids == t1 + env + t2
    assert d.actions == [1] * len(t1) + [0] * len(env) + [1] * len(t2)
    assert d.turns == ["ok", "knife"] and d.ended
    assert d.messages == CONVERSATION
    # the policy's second turn was sampled after the whole first exchange
    assert policy.seen == [[prompt], [prompt + t1 + env]]
    # the same ids and labels as SFT on the finished conversation: policy tokens = labelled tokens
    ids, flags, _ = tokenize_conversation(CONVERSATION, 0, tok, [eos])
    assert ids == prompt + d.ids and flags == [0] * len(prompt) + d.actions


def test_truncated_turn_gets_eos_from_the_environment_masked():
    tok = builtin_tokenizer()
    eos = tok.eos_token_id
    _, d, t1, t2, _ = two_turn_dialogue(tok, [eos], first_turn_ends_with_stop=False)
    env = tok("\n\n### User:\nWhich word?\n\n### Assistant:\n", add_special_tokens=False)["input_ids"]
    assert d.ids == t1 + [eos] + env + t2  # the EOS the policy did not write is the environment's
    assert d.actions == [1] * len(t1) + [0] * (1 + len(env)) + [1] * len(t2)


def test_chat_template_two_turns_match_sft_labels():
    tok = chatml_tokenizer()
    stops = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    prompt, d, t1, t2, _ = two_turn_dialogue(tok, stops)
    env = tok("\n<|im_start|>user\nWhich word?<|im_end|>\n<|im_start|>assistant\n",
              add_special_tokens=False)["input_ids"]
    assert d.ids == t1 + env + t2 and t1[-1] == stops[-1]
    assert d.actions == [1] * len(t1) + [0] * len(env) + [1] * len(t2)
    ids, flags, _ = tokenize_conversation(CONVERSATION, 0, tok, stops)
    assert ids == prompt + d.ids and flags == [0] * len(prompt) + d.actions


def test_done_and_max_turns_end_the_dialogue():
    tok = builtin_tokenizer()
    eos = tok.eos_token_id

    def never(messages, item):
        raise AssertionError("the environment is not called after the last turn")

    d, = mt.roll_dialogues(scripted([[5, eos]]), never, tok, [[7, 8]], [[]], [{}], max_turns=1, max_len=64,
                           max_new_tokens=4, stops=[eos])
    assert d.ids == [5, eos] and d.actions == [1, 1]
    d, = mt.roll_dialogues(scripted([[5, eos]]), lambda m, it: mt.DONE, tok, [[7, 8]], [[]], [{}], max_turns=4,
                           max_len=64, max_new_tokens=4, stops=[eos])
    assert d.ids == [5, eos] and len(d.turns) == 1
    # MAXSEQ (max_len) bounds prompt + dialogue: the turn is cut, and no environment turn without room after it
    d, = mt.roll_dialogues(scripted([[5] * 9, [6, eos]]), ask_once, tok, [[7, 8]], [[]], [{}], max_turns=2,
                           max_len=10, max_new_tokens=9, stops=[eos])
    assert d.ids == [5] * 8 and d.actions == [1] * 8 and not d.ended and len(d.messages) == 1
    # per-turn rewards: on the turn the environment answers; {"reward": x} alone ends the dialogue
    d, = mt.roll_dialogues(scripted([[5, eos], [6, 6, eos]]), ask_with_reward, tok, [[7]], [[]], [{}],
                           max_turns=3, max_len=64, max_new_tokens=4, stops=[eos])
    assert d.turn_rewards == [0.5, 0.0] and d.turn_ends == [1, len(d.ids) - 1] and d.ids[-3:] == [6, 6, eos]
    d, = mt.roll_dialogues(scripted([[5, eos]]), lambda m, it: {"reward": -1}, tok, [[7]], [[]], [{}], max_turns=3,
                           max_len=64, max_new_tokens=4, stops=[eos])
    assert d.turn_rewards == [-1.0] and d.ids == [5, eos]
    for bad in ({"reward": float("nan")}, {"role": "user", "content": "x", "reward": True}, {"role": "bot"}):
        with pytest.raises(mt.EnvError):
            mt.parse_reply(bad)
    with pytest.raises(mt.EnvError, match="returned 3"):
        mt.roll_dialogues(scripted([[5, eos]]), lambda m, it: 3, tok, [[7]], [[]], [{}], max_turns=2, max_len=64,
                          max_new_tokens=4, stops=[eos])


# ---------------------------------------------------------------------------------------------
# 2. environment tokens count for nothing


def _losses(logp, old, ref, values, new_values, mask, score):
    rewards, kl = pm.shape_rewards(score, old, ref, mask, 0.1)
    adv, ret = tm.gae_over_actions(rewards, values, mask, gamma=1.0, lam=0.95)
    pg, _ = pm.policy_loss(logp, old, adv, mask, 0.2)
    vf, _ = pm.value_loss(new_values, values, ret, mask, 0.2)
    k3 = pm.token_mean(est.kl_k3(logp, ref), mask, None)
    rp = tm.returns_over_actions(rewards, mask, 1.0)
    return rewards, kl, adv, ret, rp, pg, vf, k3


def test_env_tokens_change_no_loss_kl_or_gradient():
    tok = builtin_tokenizer()
    _, d, _, _, _ = two_turn_dialogue(tok, [tok.eos_token_id])
    mask = torch.tensor([d.actions], dtype=torch.float32)
    env = mask == 0
    assert env.any() and mask[0, 0] == 1 and mask[0, -1] == 1  # a gap inside the row
    g = torch.Generator().manual_seed(0)
    base = [-torch.rand(mask.shape, generator=g) for _ in range(3)] + [torch.randn(mask.shape, generator=g)
                                                                        for _ in range(2)]
    score = torch.tensor([1.0])

    def run(tensors):
        logp, new_v = tensors[0].clone().requires_grad_(), tensors[4].clone().requires_grad_()
        out = _losses(logp, tensors[1], tensors[2], tensors[3], new_v, mask, score)
        (out[5] + out[6] + out[7]).backward()
        return out, logp.grad, new_v.grad

    ref_out, ref_glogp, ref_gv = run(base)
    noisy = [torch.where(env, x + 5 * torch.randn(x.shape, generator=g), x) for x in base]
    out, glogp, gv = run(noisy)
    for a, b in zip(ref_out, out):
        assert torch.equal(a, b)
    assert torch.equal(glogp, ref_glogp) and torch.equal(gv, ref_gv)
    assert (glogp[env] == 0).all() and (gv[env] == 0).all() and glogp[~env].abs().sum() > 0
    assert (ref_out[1][env] == 0).all() and (ref_out[2][env] == 0).all()  # no KL, no advantage off the policy


def test_gae_over_actions_by_hand():
    # actions at 0, 1, 4, 5 (positions 2-3 are the environment's); score 1 on the last action token
    mask = torch.tensor([[1.0, 1, 0, 0, 1, 1]])
    rewards = torch.tensor([[0.0, 0, 0, 0, 0, 1]])
    values = torch.tensor([[0.1, 0.2, 9.0, 9.0, 0.3, 0.4]])
    adv, ret = tm.gae_over_actions(rewards, values, mask, gamma=1.0, lam=0.5)
    # packed deltas: 0.2-0.1, 0.3-0.2, 0.4-0.3, 1-0.4 -> A = 0.25, 0.3, 0.4, 0.6 (A_t = d_t + 0.5 A_{t+1})
    torch.testing.assert_close(adv, torch.tensor([[0.25, 0.3, 0, 0, 0.4, 0.6]]))
    torch.testing.assert_close(ret, torch.tensor([[0.35, 0.5, 0, 0, 0.7, 1.0]]))
    plain, _ = pm.gae(rewards, values, mask, gamma=1.0, lam=0.5)  # stops at the gap: not the dialogue's GAE
    assert not torch.allclose(plain, adv)
    torch.testing.assert_close(tm.returns_over_actions(rewards, mask), torch.tensor([[1.0, 1, 0, 0, 1, 1]]))


def test_gae_over_actions_equals_gae_on_single_turn_masks():
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([5, 1, 8, 3])
    mask = (torch.arange(8)[None] < lengths[:, None]).float()
    r, v = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    for a, b in zip(tm.gae_over_actions(r, v, mask, 0.99, 0.9), pm.gae(r, v, mask, gamma=0.99, lam=0.9)):
        assert torch.equal(a, b)
    assert torch.equal(tm.returns_over_actions(r, mask, 0.9), est.discounted_returns(r, mask, 0.9))


# ---------------------------------------------------------------------------------------------
# 3. the toy environment in a run


@pytest.mark.parametrize("advantage, env", [("gae", "envs.recall:respond"),
                                            ("reinforce_pp", "test_multiturn:ask_with_reward")])
def test_recall_environment_updates(tmp_path, monkeypatch, advantage, env):
    monkeypatch.chdir(REPO)  # ENV names envs.recall, beside the config
    run = make_run({**RECALL, "OUTPUT_DIR": str(tmp_path / "out"), "ADVANTAGE": advantage, "ENV": env})
    before = weights(run)
    examples = run.next_batch("ppo")
    ro = ppo.generate_dialogues(run, examples)
    assert [len(d.turns) for d in ro.dialogues] == [2] * 4
    assert all(d.messages[2] == {"role": "user", "content": "Which word?"} for d in ro.dialogues)
    att, act = ro.response_attn, ro.response_mask
    assert ((act <= att).all() and ((att - act).sum(1) > 0).all())  # environment tokens in every row
    first_gap = (act[:, :-1] - act[:, 1:] == 1) & (att[:, 1:] == 1)
    assert first_gap.any(1).all()  # a policy turn, then the environment, inside each row
    assert ro.texts == [d.turns[-1] for d in ro.dialogues]
    # old log-probs on the padded batch = each row's unpadded dialogue through the model on its own:
    # the environment's tokens are attended to, positions come from the attention mask
    T = run.cfg.gen.temperature
    lp, values = ppo.forward_logprobs(run.engine, ro, T, 64, with_values=True)
    for r in range(2):
        q = ro.query_ids[r][ro.query_mask[r].bool()]
        seq = torch.cat([q, ro.response_ids[r][att[r].bool()]])[None]
        with torch.no_grad():
            logits = run.engine.module.lm(input_ids=seq).logits[0, len(q) - 1:-1].float()
        own = torch.log_softmax(logits / T, -1).gather(1, seq[0, len(q):, None])[:, 0]
        n = int(att[r].sum())
        torch.testing.assert_close(lp[r, :n][act[r, :n].bool()], own[act[r, :n].bool()], atol=1e-5, rtol=0)
    # step 4: the task score and KL as for one turn, plus the environment's reward on turn 1's last token
    ppo.score(run, ro, examples)
    ro.logprobs, ro.values = lp, values
    ro.ref_logprobs, _ = ppo.forward_logprobs(run.ref, ro, T, 64, with_values=False)
    ppo.compute_advantages(run, ro)
    shaped, _ = pm.shape_rewards(ro.scores, ro.logprobs, ro.ref_logprobs, act, run.kl_ctl.value)
    ends = torch.tensor([d.turn_ends[0] for d in ro.dialogues])
    expected = torch.zeros_like(shaped)
    expected[torch.arange(4), ends] = 0.5 if env.endswith("reward") else 0.0
    torch.testing.assert_close(ro.rewards, shaped + expected)
    assert (ro.advantages[att.bool() & ~act.bool()] == 0).all()
    for _ in range(2):
        m = ppo.ppo_update(run, run.next_batch("ppo"))
        assert m["ppo/turns"] == 2.0 and m["ppo/dialogue_len"] > m["ppo/response_len"]
        assert m["ppo/env_reward_mean"] == (0.5 if env.endswith("reward") else 0.0)
        assert all(torch.isfinite(torch.tensor(v)) for k, v in m.items() if k.startswith(("ppo/loss", "objective")))
    after = weights(run)
    assert changed(before, after, "lm.")
    assert changed(before, after, "v_head.") == (advantage == "gae")


# ---------------------------------------------------------------------------------------------
# 4. config errors


@pytest.mark.parametrize("keys, needle", [
    ({"ENV": "envs.recall"}, "package.module:name"),
    ({"ENV": "envs.no_such_module:respond"}, "cannot import"),
    ({"ENV": "envs.recall:nothing"}, "module envs.recall has no attribute 'nothing'"),
    ({"ENV": "envs.recall:WORDS"}, "envs.recall.WORDS is a list, not a function"),
    ({"ENV": "json:dumps"}, "cannot be called as dumps(messages, item)"),
    ({"ENV": "", "MAX_TURNS": 2}, "MAX_TURNS (2)"),
    ({"SAMPLER": "hf"}, "ENV: multi-turn rollouts"),
])
def test_bad_env_is_a_config_error(tmp_path, monkeypatch, keys, needle):
    monkeypatch.chdir(REPO)
    overrides = [f"{k}={v}" for k, v in {**RECALL, "OUTPUT_DIR": str(tmp_path / "o"), **keys}.items()
                 if not isinstance(v, dict)]
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides + ['REWARD={"type": "exact_match"}'])
    assert needle in str(e.value) and ("ENV" in str(e.value) or "MAX_TURNS" in str(e.value))


def test_bad_env_exits_2(tmp_path, monkeypatch, capsys):
    from hybrid_ds.run.cli import main

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        main(["examples/multiturn.json", "ENV=envs.recall:nothing", f"OUTPUT_DIR={tmp_path}/o", "--dry-run"])
    assert e.value.code == 2 and "ENV 'envs.recall:nothing'" in capsys.readouterr().err
