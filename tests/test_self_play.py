"""The ``self_play`` reward (hybrid_ds/rewards/self_play.py, hybrid_ds/algorithms/self_play.py).

(a) the reward of a fixed pair of responses is the judge's preference computed here from the judge leaf
called on each response; (b) PPO updates in this process with the reference as opponent (its responses
checked against transformers ``generate`` on the reference, which is made to differ from the policy)
and with a snapshot opponent (retaken every ``snapshot_every`` updates, and an interrupted run resumed
from a checkpoint ending where the uninterrupted one does); (c) config errors naming the node's path.
The builtin tiny GPT-2 is the policy and the judge."""

import json
import math
import os

import pytest
import torch

from conftest import write_json
from inproc import base, make_run
from hybrid_ds.algorithms import ppo
from hybrid_ds.algorithms.self_play import SNAPSHOT_FILE, self_play_node
from hybrid_ds.config import ConfigError
from hybrid_ds.data import collate_prompts, stop_token_ids
from hybrid_ds.rewards import make_reward
from hybrid_ds.rewards.self_play import SelfPlay, preference
from hybrid_ds.rollout.settings import SamplingSettings
from hybrid_ds.run.preflight import load_config

JUDGE = {"type": "llm_judge", "model": "builtin:tiny-gpt2", "score": "yes_prob", "yes_token": "Y", "no_token": "N",
         "template": "Task: {prompt}\nAnswer: {response}\nGood (Y/N)? "}
POLICY = ["c b a", "forest rain"]
OPPONENT = ["a b c", "rain"]
TARGETS = ["c b a", "forest"]
PROMPTS = ["Reverse: a b c", "First word: forest rain"]


# --------------------------------------------------------------------------------------
# (a) the reward of a fixed pair, by hand


@pytest.mark.parametrize("rule", ["difference", "win_prob"])
def test_reward_of_a_fixed_pair_is_the_judges_preference_by_hand(rule):
    judge = make_reward(JUDGE, device="cpu")
    mine = [judge(r, t, p) for r, t, p in zip(POLICY, TARGETS, PROMPTS)]  # one sample at a time, unbatched
    theirs = [judge(r, t, p) for r, t, p in zip(OPPONENT, TARGETS, PROMPTS)]
    assert mine != theirs
    node = make_reward({"type": "self_play", "judge": JUDGE, "score": rule}, device="cpu")
    node.set_opponents(OPPONENT)
    got = node.score_batch(POLICY, TARGETS, PROMPTS)
    by_hand = [a - b if rule == "difference" else 1 / (1 + math.exp(b - a)) for a, b in zip(mine, theirs)]
    assert got == pytest.approx(by_hand, abs=1e-6)
    assert node.components() == {"self_play/judge_policy": pytest.approx(mine, abs=1e-6),
                                 "self_play/judge_opponent": pytest.approx(theirs, abs=1e-6)}
    # the opponent's responses serve one batch: without them the node scores with the judge alone
    assert node.score_batch(POLICY, TARGETS, PROMPTS) == pytest.approx(mine, abs=1e-6)


def test_win_prob_is_a_sigmoid_for_any_margin_and_a_sum_nests_the_node():
    assert preference(0.5, 0.5, "win_prob") == 0.5
    assert preference(900.0, 0.0, "win_prob") == 1.0 and preference(0.0, 900.0, "win_prob") == 0.0  # no overflow
    assert preference(0.2, 0.7, "difference") == pytest.approx(-0.5)
    reward = make_reward({"type": "weighted_sum", "components": [
        {"type": "self_play", "judge": {"type": "word_f1"}, "weight": 3}, {"type": "exact_match", "weight": 1}]})
    [node] = [r for _, r in reward.parts if isinstance(r, SelfPlay)]
    node.set_opponents(["a b", "x"])
    # word_f1: policy 1 and 1, opponent 0.8 and 0; exact_match 1 and 0
    assert reward.score_batch(["a b c", "y z"], ["a b c", "y z w"]) == pytest.approx(
        [(3 * (1 - 0.8) + 1) / 4, (3 * (0.8 - 0) + 0) / 4])


# --------------------------------------------------------------------------------------
# (b) PPO updates


def spy_on_opponents(node: SelfPlay) -> list:
    """The opponent responses the PPO phase hands to ``node``, one list per update."""
    seen, set_opponents = [], node.set_opponents

    def record(texts):
        seen.append(list(texts))
        set_opponents(texts)
    node.set_opponents = record
    return seen


def sampled_texts(run, lm, examples, seed: int) -> list:
    """transformers ``generate`` on ``lm`` with the run's sampling settings from ``seed``, decoded as the rollout."""
    tok, K = run.tokenizer, run.cfg.ppo.num_generations
    stops = stop_token_ids(tok)
    q_ids, q_mask = collate_prompts(examples, tok.pad_token_id, run.cfg.data.maxseq - run.cfg.gen.max_new_tokens)
    q_ids, q_mask = q_ids.repeat_interleave(K, 0), q_mask.repeat_interleave(K, 0)
    kwargs = SamplingSettings.from_gen_config(run.cfg.gen, ppo.eos_arg(stops), tok.pad_token_id).generate_kwargs()
    torch.manual_seed(seed)
    out = lm.generate(input_ids=q_ids, attention_mask=q_mask, **kwargs)[:, q_ids.shape[1]:]
    return ppo.finish_responses(out, stops, tok, q_ids.shape[0])[3]


def test_reference_opponent_answers_the_same_prompts_and_the_update_logs_its_costs(tmp_path):
    """SAMPLER=lean_exact samples generate's very tokens: the opponent's responses are those of the
    reference from the self-play seed, and not the policy's from that seed (the reference is moved away
    from the policy first, so the check can fail)."""
    run = make_run(base(tmp_path, "ppo", SAMPLER="lean_exact", REWARD={"type": "self_play", "judge": JUDGE, "score": "win_prob"}))
    node = self_play_node(run)
    assert node is run.reward and node.opponent == "reference"
    with torch.no_grad():
        torch.manual_seed(1)
        for p in run.ref.parameters():
            p.add_(0.5 * torch.randn_like(p))
    seen = spy_on_opponents(node)
    examples = run.next_batch("ppo")
    m = ppo.ppo_update(run, examples)
    assert seen == [sampled_texts(run, run.ref, examples, run.seed_for("self_play", 0))]
    assert seen[0] != sampled_texts(run, run.engine.module.lm, examples, run.seed_for("self_play", 0))
    for key in ("time/self_play_generate_s", "time/self_play_judge_s"):
        assert 0 < m[key] < m["perf/ppo_update_s"], key
    # the reward is the sigmoid of the logged judge margins (means of per-row values: a bound, not equality)
    assert 0 < m["ppo/reward_mean"] < 1 and math.isfinite(m["reward/self_play/judge_policy"])
    assert "reward/self_play/judge_opponent" in m and "self_play/snapshot_update" not in m
    assert len(seen[0]) == len(examples) == 4  # one per prompt, row for row with the policy's


def test_under_lora_the_opponent_is_the_base_with_the_adapters_off(tmp_path):
    """LoRA's reference is the policy's own model with its adapters disabled: the opponent samples from
    it. The adapters are moved off zero first, so the policy's responses from the same seed differ."""
    from hybrid_ds.models.lora import adapters_disabled

    run = make_run(base(tmp_path, "ppo", LORA_R=4, LORA_ALPHA=8, SAMPLER="lean_exact",
                        REWARD={"type": "self_play", "judge": {"type": "word_f1"}}))
    assert run.ref is None
    lm = run.engine.module.lm
    with torch.no_grad():
        torch.manual_seed(1)
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.add_(2.0 * torch.randn_like(p))
    seen = spy_on_opponents(self_play_node(run))
    examples = run.next_batch("ppo")
    seed = run.seed_for("self_play", 0)
    with adapters_disabled(lm) as base_lm:
        from_base = sampled_texts(run, base_lm, examples, seed)
    assert from_base != sampled_texts(run, lm, examples, seed)
    m = ppo.ppo_update(run, examples)
    assert seen == [from_base] and m["time/self_play_generate_s"] > 0


def metrics(out: str) -> list:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"ppo"' in line]


def snapshot_cfg(out, **keys) -> dict:
    return base(out, "hybrid", MAX_STEPS=3, CYCLE_SFT_STEPS=1, CYCLE_PPO_UPDATES=1, LR_SFT=5e-3, LR_PPO=5e-3,
                REWARD={"type": "self_play", "judge": JUDGE, "opponent": "snapshot", "snapshot_every": 2}, **keys)


def train_in_process(cfg: dict, path) -> None:
    from hybrid_ds.run.cli import main

    assert main([write_json(path, cfg)]) == 0


def test_snapshot_is_retaken_every_n_updates_and_an_interrupted_run_resumes_exactly(tmp_path):
    """Hybrid cycles of one SFT step and one PPO update, snapshots at updates 0 and 2. B stops after
    update 0 and is started again: update 1 plays against the checkpoint's snapshot (the policy after
    cycle 0's SFT step, which neither MODEL nor the policy at update 1 equals), update 2 against a new
    one. Every metric but wall clock and memory equals A's, which ran without a stop."""
    a, b = snapshot_cfg(tmp_path / "A"), snapshot_cfg(tmp_path / "B")
    train_in_process(a, tmp_path / "a.json")
    train_in_process({**b, "MAX_STEPS": 1}, tmp_path / "b1.json")
    saved = torch.load(os.path.join(b["OUTPUT_DIR"], "checkpoints", "step-0000001", SNAPSHOT_FILE), weights_only=True)
    assert saved["update"] == 0 and saved["weights"]
    train_in_process(b, tmp_path / "b2.json")
    strip = ("time", "perf/", "mem/")
    rows = [[{k: v for k, v in r.items() if not k.startswith(strip)} for r in metrics(c["OUTPUT_DIR"])] for c in (a, b)]
    assert [r["self_play/snapshot_update"] for r in rows[0]] == [0.0, 0.0, 2.0]
    assert rows[0] == rows[1]
    # the snapshot played against at update 1 was not the policy then: the margins are not all zero
    assert any(r["reward/self_play/judge_policy"] != r["reward/self_play/judge_opponent"] for r in rows[0])
    assert all(k in rows[0][0] for k in ("reward/self_play/judge_policy", "reward/self_play/judge_opponent"))


def test_snapshot_weights_are_the_policy_at_the_snapshot_update(tmp_path):
    """Updates 0, 1, 2 with snapshot_every=2: the snapshot is the policy as update 2 began (after two
    updates moved it), not as it was at 0, and the update-2 opponent's responses come from it."""
    run = make_run(base(tmp_path, "ppo", MAX_STEPS=3, LR_PPO=5e-3, SAMPLER="lean_exact",
                        REWARD={"type": "self_play", "judge": {"type": "word_f1"}, "opponent": "snapshot",
                                "snapshot_every": 2}))
    node = self_play_node(run)
    seen = spy_on_opponents(node)
    start = {k: v.clone() for k, v in run.engine.module.lm.state_dict().items()}
    for _ in range(2):
        ppo.run_update(run, run.next_batch)
        run.counters.ppo_update += 1
    at_two = {k: v.clone() for k, v in run.engine.module.lm.state_dict().items()}
    assert any(not torch.equal(start[k], at_two[k]) for k in start)
    examples = run.next_batch("ppo")
    m = ppo.ppo_update(run, examples)
    snap = node.snapshot.state_dict()
    assert node.snapshot_update == 2 and m["self_play/snapshot_update"] == 2.0
    assert all(torch.equal(snap[k], at_two[k]) for k in at_two)
    assert seen[2] == sampled_texts(run, node.snapshot, examples, run.seed_for("self_play", 2))


# --------------------------------------------------------------------------------------
# (c) config errors


@pytest.mark.parametrize("reward, keys, expected", [
    ({"type": "self_play", "judge": JUDGE, "opponent": "policy"}, {},
     "REWARD.opponent: 'policy' is not one of 'reference', 'snapshot'"),
    ({"type": "self_play", "judge": JUDGE, "opponent": "snapshot", "snapshot_every": 0}, {},
     "REWARD.snapshot_every: must be >= 1, got 0"),
    ({"type": "self_play", "opponent": "snapshot"}, {}, "REWARD.judge: required parameter of 'self_play' is missing"),
    ({"type": "weighted_sum", "components": [{"type": "self_play", "judge": {"type": "word_f1", "weight": 2}}]}, {},
     "REWARD.components[0].judge.weight: only allowed inside weighted_sum components"),
    ({"type": "self_play", "judge": {"type": "self_play", "judge": JUDGE}}, {},
     "REWARD.judge: a self_play judge cannot itself hold a self_play node"),
    ({"type": "self_play", "judge": {"type": "word_f1", "on_error": "fallback"}}, {},
     "REWARD.judge.on_error: only allowed on the root spec"),
    ({"type": "self_play", "judge": {**JUDGE, "model": "./no/such/judge"}}, {},
     "REWARD.judge.model: './no/such/judge' does not exist"),
    ({"type": "self_play", "judge": JUDGE, "opponent": "snapshot"}, {"LORA_R": 4},
     "REWARD.opponent: 'snapshot' with LORA_R > 0 is not supported"),
    ({"type": "self_play", "judge": JUDGE}, {"ZERO_STAGE": 3}, "REWARD.opponent: self-play under ZeRO stage 3"),
    ({"type": "weighted_sum", "components": [{"type": "self_play", "judge": JUDGE}, {"type": "self_play",
                                                                                    "judge": JUDGE}]}, {},
     "REWARD: 2 self_play nodes (REWARD.components[0], REWARD.components[1]); a reward holds at most one"),
    ({"type": "weighted_sum", "components": [{"type": "word_f1", "weight": 1},
                                             {"type": "self_play", "judge": JUDGE, "weight": 0}]}, {},
     "REWARD.components[1].weight: 0 would sample the opponent every update"),
    ({"type": "self_play", "judge": JUDGE}, {"REFS": [{"model": "builtin:tiny-gpt2", "weight": 1.0}]},
     "REWARD.opponent: 'reference' is the run's own reference, which REFS does not list"),
])
def test_config_errors_name_the_nodes_path(reward, keys, expected, tmp_path):
    cfg = base(tmp_path, "ppo", REWARD=reward, **keys)
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{k}={json.dumps(v)}" for k, v in cfg.items()])
    assert expected in str(e.value)


def test_the_reference_on_its_own_ranks_cannot_be_the_opponent(tmp_path):
    cfg = base(tmp_path, "ppo", REF_PLACEMENT="separate", REF_RANKS=1,
               REWARD={"type": "self_play", "judge": JUDGE})
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{k}={json.dumps(v)}" for k, v in cfg.items()], world_size=2)
    assert "REWARD.opponent: 'reference' with REF_PLACEMENT=separate" in str(e.value)
    cfg["REWARD"]["opponent"] = "snapshot"  # the snapshot is kept on the policy's ranks
    load_config(None, [f"{k}={json.dumps(v)}" for k, v in cfg.items()], world_size=2)


def test_a_perplexity_judge_gets_the_policys_model_as_a_top_level_leaf_does(tmp_path):
    """MODEL fills a perplexity judge's missing ``model`` inside self_play too, as it does for a
    top-level or weighted_sum leaf (config/load.py)."""
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in base(
        tmp_path, "ppo", REWARD={"type": "self_play", "judge": {"type": "perplexity"}}).items()])
    assert cfg.reward["judge"]["model"] == cfg.run.model
