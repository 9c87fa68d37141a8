"""Task heads (HEADS, hybrid_ds/models/heads.py): a head learns a label with the SFT loss, its saved
files reproduce the run's predictions, the ``head`` reward leaf scores with it, and bad specs are
ConfigErrors naming HEADS[i].key.

One tiny SFT run (builtin tiny GPT-2, builtin demo tasks, in process) serves every test of the run.
"""

import glob
import json
import os

import pytest
import torch
from inproc import base, make_run

from hybrid_ds.config import ConfigError
from hybrid_ds.data.batches import collate_sft, tokenize_items
from hybrid_ds.models.heads import head_loss_sums, head_targets, load_heads, pool_last, task_heads_of
from hybrid_ds.models.policy_value import final_hidden
from hybrid_ds.run.preflight import load_config

KINDS = ["reverse", "uppercase", "sort", "copy"]
TEMPLATE = "task: {task}\ninput: {input}\n"  # the label field itself stays out of the prompt
HEADS = [{"name": "kind", "type": "classification", "field": "kind", "num_labels": 4, "labels": KINDS, "weight": 1.0},
         {"name": "words", "type": "regression", "field": "n_words", "weight": 0.1}]


def demo_items():
    from hybrid_ds.assets import DEMO_TASKS

    with open(DEMO_TASKS) as f:
        return [it for it in json.load(f) if it["task"] in KINDS]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An 80-step SFT run with a 4-way `kind` classifier and a regression head; held-out items."""
    from hybrid_ds.run import checkpoint as ckpt
    from hybrid_ds.run.loop import train

    tmp = tmp_path_factory.mktemp("heads")
    items = demo_items()
    held = [it for k in KINDS for it in [x for x in items if x["task"] == k][:10]]
    rest = [it for it in items if it not in held]
    data = tmp / "train.jsonl"
    with open(data, "w") as f:
        for i, it in enumerate(rest):
            row = dict(it)
            if i % 5:  # every fifth item carries no labels: it contributes the LM loss only
                row.update(kind=it["task"], n_words=len(it["input"].split()))
            f.write(json.dumps(row) + "\n")
    run = make_run(base(tmp, "sft", TRAIN_FILE=str(data), HEADS=HEADS, PROMPT_TEMPLATE=TEMPLATE, MAX_STEPS=80,
                        SFT_BATCH=8, LR_SFT=2e-3, SAVE_EVERY=0))
    ckpt.attach(run, None)
    train(run)
    ckpt.finish(run)
    examples = tokenize_items(held, run.tokenizer, "output", 96, prompt_template=TEMPLATE)
    return run, examples, held, tmp / "out"


def in_run_outputs(run, examples):
    """The heads' outputs for ``examples`` from the run's own model (its SFT forward's hidden state)."""
    model = run.engine.module
    b = collate_sft(examples, run.tokenizer.pad_token_id)
    with torch.no_grad(), final_hidden(model.lm) as final:
        model(b["input_ids"], b["attention_mask"])
    return task_heads_of(model)(pool_last(final.hidden, b["attention_mask"]))


def loaded_outputs(out_dir, examples, pad_id):
    """The same from the saved files only: ``inference_lm/`` through transformers plus ``load_heads``."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(os.path.join(out_dir, "inference_lm")).eval()
    heads = load_heads(os.path.join(out_dir, "heads"))
    b = collate_sft(examples, pad_id)
    with torch.no_grad():
        hidden = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                    output_hidden_states=True).hidden_states[-1]
        return heads(pool_last(hidden, b["attention_mask"]))


def test_head_learns_the_kind_of_held_out_items(trained):
    run, examples, held, _ = trained
    pred = in_run_outputs(run, examples)["kind"].argmax(-1)
    truth = torch.tensor([KINDS.index(it["task"]) for it in held])
    acc = float((pred == truth).float().mean())
    print(f"held-out kind accuracy {acc:.2f} (chance 0.25)")
    assert acc >= 0.6, f"held-out accuracy {acc:.2f}"


def test_head_losses_fall_and_are_logged(trained):
    _, _, _, out = trained
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kind = [r["sft/head/kind/loss"] for r in rows if "sft/head/kind/loss" in r]
    words = [r["sft/head/words/loss"] for r in rows if "sft/head/words/loss" in r]
    assert len(kind) == 80 and len(words) == 80
    assert sum(kind[-5:]) < sum(kind[:5]) and sum(words[-5:]) < sum(words[:5])


def test_heads_are_their_own_optimizer_groups(trained):
    run = trained[0]
    ids = {id(p) for g in run.engine.optimizer.param_groups if g["role"] == "heads" for p in g["params"]}
    assert ids == {id(p) for p in task_heads_of(run.engine.module).parameters()}


def test_saved_heads_and_loader_reproduce_the_run(trained):
    run, examples, _, out = trained
    assert sorted(os.listdir(out / "heads")) == ["heads.json", "kind.pt", "words.pt"]
    mine, loaded = in_run_outputs(run, examples), loaded_outputs(out, examples, run.tokenizer.pad_token_id)
    for name in ("kind", "words"):
        torch.testing.assert_close(loaded[name], mine[name], rtol=1e-4, atol=1e-5)


def test_checkpoint_carries_the_heads(trained):
    run, _, _, out = trained
    [model_file] = glob.glob(str(out / "checkpoints" / "*" / "**" / "model.pt"), recursive=True)
    state = torch.load(model_file, map_location="cpu", weights_only=True)
    mine = run.engine.module.state_dict()
    keys = [k for k in mine if k.startswith("task_heads.")]
    assert len(keys) == 4
    for k in keys:
        assert torch.equal(state[k], mine[k]), k


def test_head_reward_is_the_loaded_heads_probability(trained):
    from hybrid_ds.rewards import make_reward

    run, examples, held, out = trained
    reward = make_reward({"type": "head", "name": "kind", "run_dir": str(out), "label": "uppercase"}, device="cpu")
    prompts = [e.prompt for e in examples]
    responses = [it["output"] for it in held]
    got = torch.tensor(reward.score_batch(responses, [""] * len(held), prompts, held))
    # prompt + target + EOS is exactly an SFT example's sequence: the reward is the head's probability there
    want = loaded_outputs(out, examples, run.tokenizer.pad_token_id)["kind"].softmax(-1)[:, KINDS.index("uppercase")]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    upper = torch.tensor([it["task"] == "uppercase" for it in held])
    assert got[upper].mean() > got[~upper].mean() + 0.2  # it steers toward uppercase answers
    by_path = make_reward({"type": "head", "name": "kind", "path": str(out / "heads"), "label": "1"}, device="cpu")
    torch.testing.assert_close(torch.tensor(by_path.score_batch(responses, [""] * len(held), prompts, held)), got)


@pytest.mark.parametrize("leaf,problem", [
    ({"name": "kind", "label": "copy"}, "give exactly one of run_dir"),
    ({"name": "kind", "label": "shout", "run_dir": "RUN"}, "label: head 'kind' needs label, one of"),
    ({"name": "kind", "run_dir": "RUN"}, "label: head 'kind' needs label"),
    ({"name": "words", "label": "copy", "run_dir": "RUN"}, "label: head 'words' is a regression head"),
    ({"name": "mood", "label": "copy", "run_dir": "RUN"}, "name: no head 'mood'"),
])
def test_head_reward_spec_problems(trained, leaf, problem):
    from hybrid_ds.rewards import validate_reward_spec

    spec = {"type": "head", **{k: str(trained[3]) if v == "RUN" else v for k, v in leaf.items()}}
    [found] = validate_reward_spec(spec)
    assert problem in found, found


def test_head_loss_sums_by_hand():
    specs = [{"name": "c", "type": "classification", "field": "y", "num_labels": 3, "labels": ["a", "b", "c"]},
             {"name": "r", "type": "regression", "field": "v"}]
    items = [{"y": "b", "v": 2.0}, {"y": 2}, {"v": -1}]
    targets = head_targets(items, specs)
    assert targets[0][0].tolist() == [True, True, False] and targets[0][1].tolist() == [1, 2, 0]
    logits = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    reg = torch.tensor([1.5, 9.0, 0.0])
    sums = head_loss_sums({"c": logits, "r": reg}, specs, targets)
    ce = -torch.log_softmax(logits, -1)
    torch.testing.assert_close(sums, torch.stack([ce[0, 1] + ce[1, 2], torch.tensor(0.25 + 1.0)]))
    with pytest.raises(ValueError, match="an item: head 'c' field 'y': 'd' is not one of"):
        head_targets([{"y": "d"}], specs)


@pytest.mark.parametrize("spec,key", [
    ({"name": "k", "type": "ordinal", "field": "f", "num_labels": 2}, "HEADS[0].type"),
    ({"name": "k", "type": "classification", "field": "f", "num_labels": 1}, "HEADS[0].num_labels"),
    ({"name": "k", "type": "classification", "field": "", "num_labels": 2}, "HEADS[0].field"),
    ({"name": "k", "type": "classification", "field": "f", "num_labels": 2, "weight": 0}, "HEADS[0].weight"),
    ({"name": "k", "type": "classification", "field": "f", "num_labels": 3, "labels": ["a", "b"]}, "HEADS[0].labels"),
    ({"name": "k", "type": "regression", "field": "f", "num_labels": 2}, "HEADS[0].num_labels"),
    ({"name": "k", "type": "regression", "field": "f", "bias": 1}, "HEADS[0].bias"),
])
def test_bad_heads_are_config_errors_naming_the_key(tmp_path, spec, key):
    cfg = base(tmp_path, "sft", HEADS=[spec])
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{k}={json.dumps(v)}" for k, v in cfg.items()])
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(key), e.value.problems


def test_duplicate_head_names_and_a_run_without_sft(tmp_path):
    spec = {"name": "k", "type": "regression", "field": "f"}
    with pytest.raises(ConfigError, match=r"HEADS\[1\].name"):
        load_config(None, [f"{k}={json.dumps(v)}" for k, v in base(tmp_path, "sft", HEADS=[spec, spec]).items()])
    with pytest.raises(ConfigError, match="MODE=ppo has no SFT step"):
        load_config(None, [f"{k}={json.dumps(v)}" for k, v in base(tmp_path, "ppo", HEADS=[spec]).items()])


def test_resume_restores_the_heads_exactly(trained, tmp_path):
    """A new run given the final checkpoint's state continues exactly: the same step on both moves
    the heads (weights and Adam moments restored) to the same numbers. Runs last: it steps the run."""
    from hybrid_ds.algorithms.sft import sft_step

    run, _, _, out = trained
    [ckpt_dir] = glob.glob(str(out / "checkpoints" / "step-*"))
    cfg = base(tmp_path, "sft", TRAIN_FILE=run.cfg.run.train_file, HEADS=HEADS, PROMPT_TEMPLATE=TEMPLATE,
               MAX_STEPS=80, SFT_BATCH=8, LR_SFT=2e-3)
    again = make_run(cfg)
    assert again.engine.load_state(ckpt_dir, "", lambda f, d: torch.load(f, map_location=d, weights_only=True))
    batch = run.examples[:8]
    assert any("kind" in e.item for e in batch)
    for r in (run, again):
        sft_step(r.engine, batch, accum=1, lr=2e-3, pad_id=r.tokenizer.pad_token_id, dist=r.dist)
    mine, theirs = run.engine.module.state_dict(), again.engine.module.state_dict()
    for k in [k for k in mine if k.startswith("task_heads.")]:
        assert torch.equal(mine[k], theirs[k]), k


def test_sft_trains_the_heads_and_ppo_leaves_them(tmp_path):
    """In a hybrid run the heads follow the SFT rate and get lr 0 (and a zero gradient) in PPO updates."""
    from inproc import weights

    from hybrid_ds.algorithms import ppo, sft

    spec = [{"name": "task", "type": "classification", "field": "task", "num_labels": 7,
             "labels": ["add", "copy", "first", "last", "reverse", "sort", "uppercase"]}]
    run = make_run(base(tmp_path, "hybrid", HEADS=spec, MAX_STEPS=1))
    before = weights(run)
    sft.run_step(run, run.next_batch)
    after_sft = weights(run)
    ppo.run_update(run, run.next_batch)
    after_ppo = weights(run)
    heads = [k for k in before if k.startswith("task_heads.")]
    assert all(not torch.equal(before[k], after_sft[k]) for k in heads)
    assert all(torch.equal(after_sft[k], after_ppo[k]) for k in heads)
    assert any(not torch.equal(after_sft[k], after_ppo[k]) for k in after_ppo if k.startswith("lm."))


def test_labels_that_do_not_fit_are_found_before_the_run(tmp_path):
    from hybrid_ds.run.preflight import preflight

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({**it, "kind": it["task"] if i != 3 else "shout"}) + "\n"
                            for i, it in enumerate(demo_items()[:16])))
    heads = [dict(HEADS[0]), {"name": "r", "type": "regression", "field": "score"}]
    cfg = base(tmp_path, "sft", TRAIN_FILE=str(data), HEADS=heads, PROMPT_TEMPLATE=TEMPLATE)
    with pytest.raises(ConfigError) as e:
        preflight(load_config(None, [f"{k}={json.dumps(v)}" for k, v in cfg.items()]), 0)
    assert e.value.problems == [
        ("TRAIN_FILE: head 'kind' field 'kind': 'shout' is not one of "
         "['reverse', 'uppercase', 'sort', 'copy']"),
        "HEADS[1].field: no item of TRAIN_FILE has field 'score'; name the field that holds the head's label."]
