"""weighted_sum with learned weights (learn_weights) and the nli leaf."""

import json
import math

import pytest

from hybrid_ds.rewards import make_reward
from hybrid_ds.rewards.base import RewardSpecError
from hybrid_ds.rewards.compose import eg_weight_update

# exact_match of these responses against "gold" is 0; length (max 100 chars) is 1
BATCHES = [(["a b", "c"], ["gold", "gold"]), (["gold", "x y z"], ["gold", "gold"]),
           (["d"], ["gold"]), (["gold", "gold", "e f"], ["gold", "gold", "gold"])]


def learned_spec(**learn):
    return {"type": "weighted_sum", "components": [
        {"type": "exact_match", "weight": 1}, {"type": "length", "max": 100, "weight": 3}],
        "learn_weights": {"rule": "target", "targets": [0.8, 0.5], "lr": 1.0, "decay": 0.5, **learn}}


def test_eg_weight_update_by_hand():
    # factors exp(+0.3), exp(-0.3): w_1 = 2 / (1 + exp(-0.6)) = 2 / 1.5488116 = 1.2913126
    assert eg_weight_update([1, 1], [0.2, 0.8], [0.5, 0.5], 1.0, 2.0) == pytest.approx(
        [1.2913126, 0.7086874], abs=1e-6)
    # log-weights 2, -2, -2: raw 1, e^-4, e^-4 gives 2.894, 0.053, 0.053; the two below 0.5 are
    # raised to it and the first takes the rest of the sum 3
    assert eg_weight_update([1, 1, 1], [0, 1, 1], [1, 0, 0], 2.0, 3.0, min_weight=0.5) == pytest.approx(
        [2.0, 0.5, 0.5])
    # on target: unchanged; a zero weight stays zero
    assert eg_weight_update([1, 3], [0.5, 0.2], [0.5, 0.2], 5.0, 4.0) == pytest.approx([1, 3])
    assert eg_weight_update([0, 2], [0, 1], [1, 0], 1.0, 2.0) == [0.0, 2.0]


def test_a_lagging_component_gains_weight_and_scores_use_the_updated_weights():
    reward = make_reward(learned_spec())
    em, length = make_reward({"type": "exact_match"}), make_reward({"type": "length", "max": 100})
    weights, means, d = [1.0, 3.0], None, 0.5
    for responses, targets in BATCHES:
        scores = reward.score_batch(responses, targets)
        e, n = em.score_batch(responses, targets), length.score_batch(responses, targets)
        batch = [sum(e) / len(e), sum(n) / len(n)]
        means = batch if means is None else [d * m + (1 - d) * b for m, b in zip(means, batch)]
        new = eg_weight_update(weights, means, [0.8, 0.5], 1.0, 4.0)
        assert new[0] > weights[0] and sum(new) == pytest.approx(4.0)  # exact_match lags 0.8
        weights = new
        assert reward.weights == pytest.approx(weights)
        assert scores == pytest.approx([(weights[0] * a + weights[1] * b) / 4 for a, b in zip(e, n)])
    assert reward.metrics() == {"reward/faults": 0.0, "reward/weight/exact_match": pytest.approx(weights[0]),
                                "reward/weight/length": pytest.approx(weights[1])}
    assert weights[0] > 1.0


def test_resume_from_state_dict_gives_the_same_weights_and_scores():
    spec = learned_spec(min_weight=0.5)
    whole = make_reward(spec)
    for responses, targets in BATCHES[:2]:
        whole.score_batch(responses, targets)
    state = json.loads(json.dumps(whole.state_dict()))
    resumed = make_reward(spec)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == whole.state_dict()
    for responses, targets in BATCHES[2:]:
        assert resumed.score_batch(responses, targets) == whole.score_batch(responses, targets)
        assert resumed.weights == whole.weights and resumed.means == whole.means
    fresh = make_reward(spec)
    fresh.score_batch(*BATCHES[2])
    assert fresh.weights != whole.weights  # the state matters: without it the weights differ
    with pytest.raises(ValueError, match="learn_weights has 2 components"):
        make_reward(spec).load_state_dict({"components": [{}, {}]})


def test_running_means_are_summed_over_ranks():
    """Rank 0 scores batch X while another rank scores Y: with their sums all-reduced, the weights equal
    those of one process scoring X + Y."""
    import torch

    (rx, tx), (ry, ty) = BATCHES[1], BATCHES[3]
    em, length = make_reward({"type": "exact_match"}), make_reward({"type": "length", "max": 100})
    other = torch.tensor([len(ry), sum(em.score_batch(ry, ty)), sum(length.score_batch(ry, ty))],
                         dtype=torch.float64)
    ranked = make_reward(learned_spec(), all_reduce_sum=lambda t: t + other)
    ranked.score_batch(rx, tx)
    single = make_reward(learned_spec())
    single.score_batch(rx + ry, tx + ty)
    assert ranked.means == pytest.approx(single.means) and ranked.weights == pytest.approx(single.weights)
    assert ranked.count == single.count == 5
    ranked.score_batch([], [])  # a rank without samples still joins the reduction and updates
    assert ranked.count == 8


def test_nested_and_postprocessed_sums_report_their_weights():
    spec = {"type": "weighted_sum", "components": [
        {**learned_spec(), "postprocess": [{"type": "clip", "min": 0, "max": 1}]}, {"type": "word_f1"}],
        "postprocess": [{"type": "ema_normalize"}]}
    reward = make_reward(spec)
    reward.score_batch(*BATCHES[0])
    gauges = reward.metrics()
    assert set(gauges) == {"reward/faults", "reward/weight/0/exact_match", "reward/weight/0/length"}
    assert math.isclose(gauges["reward/weight/0/exact_match"] + gauges["reward/weight/0/length"], 4.0)


@pytest.mark.parametrize("learn, message", [
    ({"targets": [1.0]}, "learn_weights.targets: 1 targets for 2 components"),
    ({"targets": [1.0, "x"]}, "learn_weights.targets: must be a list of finite numbers"),
    ({"targets": [1, 1], "lr": 0}, "learn_weights.lr: must be > 0"),
    ({"targets": [1, 1], "rule": "normalise"}, "learn_weights.rule: 'normalise' is not one of 'target'"),
    ({"targets": [1, 1], "step": 1}, "learn_weights.step: unknown parameter"),
    ({"targets": [1, 1], "min_weight": 3}, "learn_weights.min_weight: 3 x 2 components exceeds"),
])
def test_bad_learn_weights_name_their_key(learn, message):
    spec = {"type": "weighted_sum", "components": [{"type": "exact_match"}, {"type": "word_f1", "weight": 2}],
            "learn_weights": learn}
    with pytest.raises(RewardSpecError, match=message.replace("(", r"\(")):
        make_reward(spec)
    zero = {**spec, "components": [{"type": "exact_match", "weight": 0}, {"type": "word_f1"}],
            "learn_weights": {"targets": [1, 1]}}
    with pytest.raises(RewardSpecError, match="every weight must be > 0 with learn_weights"):
        make_reward(zero)


# ---------------------------------------------------------------------------------------------
# nli

NLI_LABELS = ["contradiction", "entailment", "neutral"]
RESPONSES = ["the cat sat on the mat", "a dog ran", "the weather is sunny"]
PREMISES = ["the cat sat on the mat and looked at the dog", "the cat sat", "it rains all day"]


@pytest.fixture(scope="module")
def nli_dir(tmp_path_factory):
    from rewards_helpers import build_tiny_bert_classifier

    return str(build_tiny_bert_classifier(tmp_path_factory.mktemp("nli"), NLI_LABELS, seed=3))


def direct_entailment(model_dir, premises, responses):
    from sentence_transformers import CrossEncoder

    probs = CrossEncoder(model_dir, device="cpu", max_length=512).predict(
        list(zip(premises, responses)), apply_softmax=True, show_progress_bar=False)
    return [float(p[NLI_LABELS.index("entailment")]) for p in probs]


def test_nli_is_the_cross_encoders_entailment_probability(nli_dir):
    expected = direct_entailment(nli_dir, PREMISES, RESPONSES)
    reward = make_reward({"type": "nli", "model": nli_dir, "batch_size": 2, "device": "cpu"})
    assert reward.score_batch(RESPONSES, PREMISES) == pytest.approx(expected, abs=1e-6)
    assert len(set(round(e, 6) for e in expected)) == 3  # the premises matter
    contradiction = make_reward({"type": "nli", "model": nli_dir, "label": "Contradiction", "device": "cpu"})
    assert [c < 1 - e for c, e in zip(contradiction.score_batch(RESPONSES, PREMISES), expected)] == [True] * 3
    # the premise from an item field; an item without it faults (here: the fallback value)
    items = [{"context": p} for p in PREMISES[:2]] + [{}]
    from_items = make_reward({"type": "nli", "model": nli_dir, "premise": "context", "device": "cpu",
                              "on_error": "fallback", "fallback": -1.0})
    assert from_items.score_batch(RESPONSES, ["unused"] * 3, None, items) == pytest.approx(
        expected[:2] + [-1.0], abs=1e-6)
    assert from_items.pop_stats()["reward/faults/nli"] == 1.0


def test_nli_model_is_loaded_once_and_labels_are_checked(nli_dir):
    from hybrid_ds.rewards import nli

    first = nli.load_cross_encoder(nli_dir, "cpu", 512)
    make_reward({"type": "nli", "model": nli_dir, "device": "cpu"})
    assert nli.load_cross_encoder(nli_dir, "cpu", 512) is first
    with pytest.raises(ValueError, match=r"nli: label 'yes' is not a label of model .*contradiction"):
        make_reward({"type": "nli", "model": nli_dir, "label": "yes", "device": "cpu"})


def test_safety_bundle_runs_dry_and_scores_with_local_models(nli_dir, tmp_path, capsys):
    """examples/safety_bundle.json with its models pointed at local ones (as README says): --dry-run
    passes, and the reward it names builds and scores, reporting its learned weights."""
    from pathlib import Path

    from rewards_helpers import build_tiny_detoxify_checkpoint

    from hybrid_ds.run.cli import main
    from hybrid_ds.run.preflight import load_config

    path = Path(__file__).resolve().parents[1] / "examples" / "safety_bundle.json"
    spec = json.loads(path.read_text())["REWARD"]
    ckpt, hf_dir = build_tiny_detoxify_checkpoint(tmp_path / "detox")
    spec["components"][1]["model"] = nli_dir
    spec["components"][2].update(checkpoint=str(ckpt), huggingface_config_path=str(hf_dir))
    overrides = [f"OUTPUT_DIR={tmp_path}/out", f"REWARD={json.dumps(spec)}"]
    assert main([str(path), *overrides, "--dry-run"]) == 0
    assert "mode: ppo" in capsys.readouterr().out
    reward = make_reward(load_config(str(path), overrides).reward, device="cpu")
    scores = reward.score_batch(RESPONSES, PREMISES)
    assert len(scores) == 3 and all(-5 <= s <= 5 for s in scores)
    weights = {k: v for k, v in reward.metrics().items() if k.startswith("reward/weight/")}
    assert set(weights) == {"reward/weight/word_f1", "reward/weight/nli", "reward/weight/toxicity"}
    assert sum(weights.values()) == pytest.approx(4.0) and weights["reward/weight/word_f1"] != 2.0


def test_learned_weights_move_in_a_ppo_step_and_survive_a_checkpoint(tmp_path):
    """A real PPO update (tests/inproc.py) scores its rollouts and moves the weights; the checkpoint that
    run/checkpoint saves then, loaded back after more scoring, restores them: scoring again repeats the
    scores and weights of the uninterrupted reward."""
    from inproc import base, make_run

    from hybrid_ds.algorithms.registry import PHASES
    from hybrid_ds.run import checkpoint as ck
    from hybrid_ds.run import checkpoint_dir as cdir
    from hybrid_ds.run.loop import phase_step

    run = make_run(base(tmp_path, "ppo", MAX_STEPS=2, REWARD=learned_spec()))
    m = phase_step(run, PHASES["ppo"])
    assert run.reward.count == 4 and run.reward.weights[0] > 1.0  # random responses never match
    # the update's metrics carry the weights it ended with and the reward's (summed) fault counter
    assert [m["reward/weight/exact_match"], m["reward/weight/length"]] == pytest.approx(run.reward.weights)
    assert m["reward/faults"] == 0.0
    saved = json.loads(json.dumps(run.reward.state_dict()))
    path = ck.save_checkpoint(run)
    uninterrupted = [(run.reward.score_batch(r, t), list(run.reward.weights)) for r, t in BATCHES]
    assert run.reward.state_dict() != saved
    ck.load_checkpoint(run, cdir.read_point(path))
    assert run.reward.state_dict() == saved
    assert [(run.reward.score_batch(r, t), list(run.reward.weights)) for r, t in BATCHES] == uninterrupted
    run.logger.close()
