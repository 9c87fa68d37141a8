"""REFS, several weighted references (hybrid_ds/config/refs.py, docs/ppo.md "Several references").

(a) one reference given as a file (the starting policy's directory) is today's run, bit for bit, and a
    resumed REFS run equals the uninterrupted one (its references are reloaded from their files);
(b) two references: the KL in the reward, the per-reference metrics and GRPO's KL term in the loss
    equal a hand computation from each model's own full forward;
(c, separate placement) tests/test_refproto.py (the reference rank's models, each answering its own
    requests) and tests/test_placement_runs.py (a run with two references on their own rank equals
    the colocated one).
Plus the config checks: each problem named by its REFS entry, exit 2 in --dry-run and in a real run.
"""

import json
import os
import shutil

import pytest
import torch

from conftest import write_json
from hybrid_ds.algorithms import ppo
from hybrid_ds.algorithms import ppo_math as pm
from hybrid_ds.algorithms.samples import reference_kl_metrics
from hybrid_ds.assets import resolve_model
from hybrid_ds.config import ConfigError
from hybrid_ds.run.preflight import load_config
from hybrid_ds.train import main
from inproc import base, full_forward_logprobs, make_run, train
from tiny_models import tiny_model_dir

IGNORED = ("time/", "perf/", "mem/", "time")  # wall-clock and memory keys differ between runs


def rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(IGNORED)} for line in f if line.strip()]


def weights(model_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


# --------------------------------------------------------------------------------------
# (a) one reference as a file = today's run; resume


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three in-process hybrid runs of 2 cycles (SFT moves the policy off its reference, so the KL is not 0):
    today's, REFS with the starting policy's directory, and that REFS run stopped after 1 cycle and resumed."""
    tmp = tmp_path_factory.mktemp("refs")
    refs = [{"model": resolve_model("builtin:tiny-gpt2"), "weight": 1.0}]
    cfgs = {"today": base(tmp / "today", REF_SYNC_EVERY=0, LOG_SAMPLES_EVERY=0),
            "refs": base(tmp / "refs", REF_SYNC_EVERY=0, LOG_SAMPLES_EVERY=0, REFS=refs)}
    for name, cfg in cfgs.items():
        train(cfg, tmp, name)
    resumed = {**cfgs["refs"], "OUTPUT_DIR": str(tmp / "resumed")}
    train({**resumed, "MAX_STEPS": 1}, tmp, "first")
    train(resumed, tmp, "resumed")  # RESUME=auto: from the checkpoint of cycle 1
    return {k: c["OUTPUT_DIR"] for k, c in cfgs.items()} | {"resumed": resumed["OUTPUT_DIR"]}


def test_one_reference_file_is_todays_run_bit_for_bit(runs):
    """The reference file holds the very weights of today's frozen copy and goes through the same forward;
    its KL is weighted by 1.0 and the sum starts from that term (exact in floating point): every metric
    and the final weights are equal, not just close. REFS only adds objective/kl/ref0, = objective/kl."""
    today, refs = rows(runs["today"]), rows(runs["refs"])
    assert [r["phase"] for r in today] == [r["phase"] for r in refs] == ["sft", "ppo"] * 2
    for a, b in zip(today, refs):
        if b["phase"] == "ppo":
            assert b.pop("objective/kl/ref0") == b["objective/kl"]
            assert a["objective/kl"] != 0.0  # SFT moved the policy: the KL is measured, not trivially 0
        assert a == b
    wa, wb = weights(os.path.join(runs["today"], "inference_lm")), weights(os.path.join(runs["refs"], "inference_lm"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resumed_run_with_refs_equals_the_uninterrupted_one(runs):
    """The checkpoint carries no REFS model: the resumed run reloads it from its file, and goes on exactly."""
    assert rows(runs["resumed"]) == rows(runs["refs"])
    assert not any("reference" in f for f in os.listdir(os.path.join(runs["resumed"], "checkpoints", "step-0000001")))


# --------------------------------------------------------------------------------------
# (b) two references against a hand computation


def model_logprobs(model_dir, ro, temperature):
    """inproc.full_forward_logprobs of the model saved in ``model_dir``, loaded here with transformers alone."""
    from transformers import AutoModelForCausalLM

    return full_forward_logprobs(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(),
                                 ro, temperature)


def test_two_references_weighted_kl_equals_the_hand_computation(tmp_path):
    """GRPO with the k3 KL in the loss (KL_IN=loss) and KL_ESTIMATOR=k3, against the starting policy
    (weight 0.75) and another model (weight 0.5): per token, k3 = exp(ref - logp) - (ref - logp) - 1
    for each reference, summed with the weights; objective/kl's per-token KL, each objective/kl/ref<k>
    and the KL term of the loss (ppo/loss/kl, taken before the first step) are that sum."""
    other = tiny_model_dir("gpt2", seed=1)
    policy = resolve_model("builtin:tiny-gpt2")
    run = make_run(base(tmp_path, mode="ppo", MAX_STEPS=1, REFS=[{"model": "policy", "weight": 0.75},
                                                                {"model": other, "weight": 0.5}],
                        KL_IN="loss", KL_ESTIMATOR="k3", ADVANTAGE="grpo", NUM_GENERATIONS=2, PPO_MINI=4))
    assert run.ref is not None and run.ref_models[0] is None and run.ref_models[1] is not None
    examples = run.next_batch("ppo")
    temp = run.cfg.gen.temperature
    ro = ppo.generate(run, examples)
    ppo.score(run, ro, [e for e in examples for _ in range(2)])
    ro.ref_logprobs = ppo.reference_logprobs(run, ro, chunk=3)
    if ro.logprobs is None:
        ro.logprobs, ro.values = ppo.forward_logprobs(run.engine, ro, temp, 64, with_values=True)
    ppo.compute_advantages(run, ro)

    m = ro.response_mask.double()
    logp = model_logprobs(policy, ro, temp)  # the policy before its first step is MODEL
    per_ref = []
    for model_dir in (policy, other):
        d = model_logprobs(model_dir, ro, temp) - logp
        per_ref.append((torch.exp(d) - d - 1) * m)
    hand = 0.75 * per_ref[0] + 0.5 * per_ref[1]
    assert ro.ref_logprobs.shape == (ro.response_ids.shape[0], 2, ro.response_ids.shape[1])
    assert float(per_ref[1].sum()) > 1e-2  # the other model is another distribution: its KL counts
    torch.testing.assert_close(ro.kl.double() * m, hand, atol=1e-5, rtol=0)
    got = reference_kl_metrics(run, ro)
    assert set(got) == {"objective/kl/ref0", "objective/kl/ref1"}
    for k in (0, 1):
        assert abs(got[f"objective/kl/ref{k}"] - float(per_ref[k].sum(1).mean())) < 1e-5
    out = ppo.ppo_epochs(run, ro, None)  # one minibatch, one epoch: the loss reads the policy before its step
    assert abs(out["ppo/loss/kl"] - float(hand.sum() / m.sum())) < 1e-5, (out["ppo/loss/kl"], hand.sum() / m.sum())


def test_weighted_kl_and_shaped_rewards_by_hand():
    """k1 with weights (2, 0.5) on numbers worked out by hand; without weights, kl_penalty's own numbers."""
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    refs = torch.tensor([[[-1.5, -2.0, -1.0], [-0.5, -3.0, -0.5]]])  # (B=1, K=2, T=3)
    # k1 = logp - ref: ref0 (0.5, 0, 0.5), ref1 (-0.5, 1, 0) -> 2 x ref0 + 0.5 x ref1 = (0.75, 0.5, 1.0)
    assert torch.equal(pm.weighted_kl(logp, refs, [2.0, 0.5]), torch.tensor([[0.75, 0.5, 1.0]]))
    assert torch.equal(pm.weighted_kl(logp, refs[:, 0]), pm.kl_penalty(logp, refs[:, 0]))
    rewards, kl = pm.shape_rewards(torch.tensor([3.0]), logp, refs, torch.tensor([[1, 1, 0]]), 0.1,
                                   ref_weights=[2.0, 0.5])
    assert torch.equal(kl, torch.tensor([[0.75, 0.5, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.075, -0.05 + 3.0, 0.0]]))
    with pytest.raises(ValueError, match="expected \\(B, K, T\\)"):
        pm.weighted_kl(logp, refs, [1.0])


# --------------------------------------------------------------------------------------
# config checks


def cfg_args(tmp_path, **keys):
    return [f"{k}={json.dumps(v)}" for k, v in {"MODEL": "builtin:tiny-gpt2", "TRAIN_FILE": "builtin:demo-tasks",
                                                 "OUTPUT_DIR": str(tmp_path / "o"), **keys}.items()]


def test_refs_problems_name_their_entry(tmp_path):
    refs = [{"model": "policy", "weight": float("nan")}, {"model": "policy", "weight": 1, "wieght": 2}, "x",
            {"weight": True}, {"model": str(tmp_path / "missing"), "weight": 0}]
    with pytest.raises(ConfigError) as e:
        load_config(None, cfg_args(tmp_path, REFS=refs))
    text = "\n".join(e.value.problems)
    for want in ("REFS[0].weight: required, a finite number > 0; got nan", "REFS[1].wieght: unknown key",
                 "REFS[2]: expected", "REFS[3].model: required", "REFS[3].weight", "REFS[4].weight",
                 f"REFS[4].model: '{tmp_path / 'missing'}' does not exist", '"policy" is listed 2 times'):
        assert want in text, text
    # MODE without PPO; REF_INIT and REF_SYNC_EVERY move the run's own reference, which must then be listed
    other = [{"model": "builtin:tiny-gpt2", "weight": 1.0}]
    with pytest.raises(ConfigError, match="MODE=dpo has no PPO phase"):
        load_config(None, cfg_args(tmp_path, MODE="dpo", TRAIN_FILE="builtin:demo-pairs", REFS=other))
    with pytest.raises(ConfigError) as e:
        load_config(None, cfg_args(tmp_path, REFS=other, REF_SYNC_EVERY=1, REF_INIT="after_warmup",
                                   SFT_WARMUP_STEPS=1))
    assert len(e.value.problems) == 2 and all("which REFS does not list" in p for p in e.value.problems)
    # REF_SYNC_EVERY's auto: 1 in hybrid with SFT steps, unless REFS leaves out the reference it would move
    assert load_config(None, cfg_args(tmp_path, REFS=other)).hybrid.ref_sync_every == 0
    both = other + [{"model": "policy", "weight": 0.5}]
    assert load_config(None, cfg_args(tmp_path, REFS=both)).hybrid.ref_sync_every == 1


def test_bad_reference_files_exit_2_in_dry_run_and_real_run(tmp_path, capsys):
    """A missing path (a config check), another vocabulary size and another tokenizer (preflight checks,
    before any weight loads): exit 2, each message naming its entry, no traceback."""
    src = tiny_model_dir("gpt2", seed=1)
    sizes, tokens = shutil.copytree(src, tmp_path / "sizes"), shutil.copytree(src, tmp_path / "tokens")
    with open(os.path.join(sizes, "config.json")) as f:
        conf = json.load(f)
    write_json(os.path.join(sizes, "config.json"), {**conf, "vocab_size": conf["vocab_size"] + 8})
    with open(os.path.join(tokens, "tokenizer.json")) as f:
        tok = json.load(f)
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens trade ids
    write_json(os.path.join(tokens, "tokenizer.json"), tok)
    short = shutil.copytree(src, tmp_path / "short")
    write_json(os.path.join(short, "config.json"), {**conf, "n_positions": 16})
    base_cfg = {"MODE": "ppo", "MODEL": "builtin:tiny-gpt2", "TRAIN_FILE": "builtin:demo-tasks",
                "OUTPUT_DIR": str(tmp_path / "o")}
    missing = write_json(tmp_path / "missing.json", {**base_cfg, "REFS": [{"model": "./nowhere", "weight": 1}]})
    mismatched = write_json(tmp_path / "vocab.json", {**base_cfg, "REFS": [
        {"model": "policy", "weight": 1}, {"model": str(sizes), "weight": 1}, {"model": str(tokens), "weight": 1},
        {"model": str(short), "weight": 1}]})
    for argv, wants in (([missing, "--dry-run"], ["REFS[0].model: './nowhere' does not exist"]),
                        ([missing], ["REFS[0].model: './nowhere' does not exist"]),
                        ([mismatched, "--dry-run"], ["REFS[1].model", f"vocabulary of {conf['vocab_size'] + 8}",
                                                     "REFS[2].model: the tokenizer of", "other ids",
                                                     "REFS[3].model", "covers 16 positions, fewer than MAXSEQ"])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err, err
        assert all(w in err for w in wants), err


def test_a_reference_under_home_is_found_through_tilde(tmp_path, monkeypatch):
    """``~`` in a REFS path is expanded before the preflight reads the model's files, as for MODEL."""
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_model_dir("gpt2", seed=1), tmp_path / "ref")
    cfg = load_config(None, cfg_args(tmp_path, MODEL=str(tmp_path / "ref"),
                                     REFS=[{"model": "policy", "weight": 1}, {"model": "~/ref", "weight": 0.5}]))
    assert cfg.ppo.refs[1]["model"] == str(tmp_path / "ref")
    assert main([write_json(tmp_path / "c.json", {**cfg_json(tmp_path), "REFS": [
        {"model": "policy", "weight": 1}, {"model": "~/ref", "weight": 0.5}]}), "--dry-run"]) in (0, None)


def cfg_json(tmp_path):
    return {"MODE": "ppo", "MODEL": str(tmp_path / "ref"), "TRAIN_FILE": "builtin:demo-tasks", "MAXSEQ": 256,
            "OUTPUT_DIR": str(tmp_path / "o2")}


def test_a_hybrid_run_whose_refs_leave_out_the_policy_is_warned(tmp_path, capsys):
    """SFT moves the policy and no listed reference follows it: --dry-run says so (preflight warning)."""
    frozen = [{"model": "builtin:tiny-gpt2", "weight": 1.0}]
    cfg = write_json(tmp_path / "h.json", {"MODE": "hybrid", "MODEL": "builtin:tiny-gpt2",
                                           "TRAIN_FILE": "builtin:demo-tasks", "OUTPUT_DIR": str(tmp_path / "o3"),
                                           "MAXSEQ": 256})
    assert main([cfg, "--dry-run", f"REFS={json.dumps(frozen)}"]) in (0, None)
    assert 'REFS lists no "policy" entry' in capsys.readouterr().out
    assert main([cfg, "--dry-run", f"REFS={json.dumps(frozen + [{'model': 'policy', 'weight': 1.0}])}"]) in (0, None)
    assert 'REFS lists no "policy" entry' not in capsys.readouterr().out
