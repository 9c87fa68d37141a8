"""SFT end to end through the real entry points: 1 process, 2 processes under ZeRO-2 and ZeRO-3."""

import os

import pytest

from launch_utils import forked_runs, launch, load_weights, max_rel_diff, metrics, rel_norm_diffs

pytestmark = pytest.mark.slow


def sft_cfg(tmp_path, name, **extra):
    cfg = {"MODE": "sft", "MODEL": "builtin:tiny-gpt2", "TRAIN_FILE": "builtin:demo-tasks",
           "OUTPUT_DIR": str(tmp_path / name), "SEED": 0, "SFT_BATCH": 8, "LR_SFT": 3e-3,
           "SCHEDULER": "constant", "MAXSEQ": 96, "MAX_STEPS": 30}
    cfg.update(extra)
    return cfg


def assert_loss_falls(out):
    rows = metrics(out, "sft")
    first = sum(r["sft/loss"] for r in rows[:5]) / 5
    last = sum(r["sft/loss"] for r in rows[-5:]) / 5
    assert last < first - 1.0, f"SFT loss did not fall: first5 {first:.3f} last5 {last:.3f}"


# bf16 is learned from under ZeRO-3 (the partitioned bf16 weights, consolidated into inference_lm);
# bf16 under ZeRO-2 on 2 processes is the session's hybrid run (tests/conftest.py hybrid_zero2_bf16_run:
# its SFT and PPO steps finite and its outputs written, test_ppo_runs; the same metrics as two
# machines, test_multinode), so SFT is not launched a second time in bf16 under ZeRO-2.
@pytest.mark.parametrize("nproc,zero,bf16", [(1, 0, False), (2, 2, False), (2, 3, False), (2, 3, True)],
                         ids=["1proc", "zero2", "zero3", "zero3-bf16"])
def test_sft_loss_falls_and_inference_lm_generates(tmp_path, nproc, zero, bf16):
    cfg = sft_cfg(tmp_path, "run", BF16=bf16)
    launch(cfg, tmp_path, nproc=nproc, zero=zero)
    out = cfg["OUTPUT_DIR"]
    assert_loss_falls(out)
    for f in ("config.json", "metrics.jsonl", "inference_lm/model.safetensors", "inference_lm/tokenizer.json"):
        assert os.path.exists(os.path.join(out, f)), f
    assert any(n.startswith("events.") for n in os.listdir(os.path.join(out, "tensorboard")))
    # vanilla transformers loads and generates
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(out, "inference_lm"))
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "inference_lm"))
    ids = tok("### Prompt:\n\n```task: copy\ninput: apple river\n```\n\n### Response:\n\n", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    assert torch.isfinite(model.lm_head.weight.float()).all()


@pytest.mark.parametrize("zero", [2, 3])
def test_accumulation_and_ranks_are_equivalent(tmp_path, zero):
    """fp32: 1 process x accumulation 4 == 2 processes x accumulation 2 (same global batch, same order).

    Under ZeRO-2 the 1-process run starts in tmp_path, not the repository: launch/zero2.yaml names
    ds_configs/zero2.json relative to the repository, and the log shows it was found; the 2-process run
    is the deepspeed launcher's (its ZeRO-2 default, no accelerate), so one launch is both this
    equivalence and test_torchrun_and_deepspeed_launchers' deepspeed case. Under ZeRO-3 both runs'
    ranks fork from one interpreter (launch_utils.forked_runs): what is compared is what trains."""
    a = sft_cfg(tmp_path, "a", MAX_STEPS=5, GRAD_ACCUM=4, LR_SFT=1e-3)
    b = sft_cfg(tmp_path, "b", MAX_STEPS=5, GRAD_ACCUM=2, LR_SFT=1e-3)
    if zero == 2:
        p = launch(a, tmp_path, nproc=1, zero=zero, name="a", cwd=str(tmp_path))
        log = p.stdout + p.stderr
        assert f"ZeRO stage {zero}" in log and f"ds_configs/zero{zero}.json" in log, log[-3000:]
        run_launcher(b, tmp_path, "deepspeed")
    else:  # the launchers are proven under ZeRO-2; ZeRO-3's ranks fork from one interpreter (one import)
        done, log = forked_runs({"a": ({**a, "ZERO_STAGE": 3}, 1), "b": ({**b, "ZERO_STAGE": 3}, 2)}, tmp_path)
        assert done == {"a": (0, done["a"][1]), "b": (0, done["b"][1])}, log[-3000:]
        assert "ZeRO stage 3" in log, log[-3000:]
    wa = load_weights(os.path.join(a["OUTPUT_DIR"], "inference_lm"))
    wb = load_weights(os.path.join(b["OUTPUT_DIR"], "inference_lm"))
    from hybrid_ds.assets import resolve_model

    w0 = load_weights(resolve_model("builtin:tiny-gpt2"))
    # Without the key third of c_attn.bias: its gradient is identically zero (softmax is invariant to a
    # per-query shift of the key scores), so Adam turns round-off there into +-lr steps (README).
    diffs = rel_norm_diffs(wa, wb)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-5, f"1x4 vs 2x2 differ: {worst} {diffs[worst]:.2e}"
    common = [k for k in wa if k in w0]  # lm_head is tied to wte in the builtin files
    assert max_rel_diff({k: wa[k] for k in common}, {k: w0[k] for k in common}) > 1e-3, "did not train"
    la = [r["sft/loss"] for r in metrics(a["OUTPUT_DIR"], "sft")]
    lb = [r["sft/loss"] for r in metrics(b["OUTPUT_DIR"], "sft")]
    assert len(la) == len(lb) == 5
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-5


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "lion_8bit"])
def test_bitsandbytes_optimizers_train_under_zero2(tmp_path, optimizer):
    lr = 3e-3 if optimizer == "adamw_8bit" else 1e-3  # Lion (a sign update) wants a smaller step
    cfg = sft_cfg(tmp_path, "run", OPTIMIZER=optimizer, LR_SFT=lr)
    launch(cfg, tmp_path, nproc=2, zero=2)
    assert_loss_falls(cfg["OUTPUT_DIR"])


def run_launcher(cfg, tmp_path, launcher):
    """Train ``cfg`` on 2 processes under torchrun (DDP, no DeepSpeed) or the deepspeed launcher (ZeRO-2
    by default) and check the launch: exit 0, both processes, the stage each implies, one row per step."""
    import json
    import subprocess
    import sys

    from launch_utils import REPO, env, free_port

    path = tmp_path / f"{launcher}.json"
    path.write_text(json.dumps(cfg))
    bindir = os.path.dirname(sys.executable)
    e = env()
    if launcher == "torchrun":
        cmd = [os.path.join(bindir, "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "hybrid_ds.train", str(path)]
    else:
        e.update(DS_ACCELERATOR="cpu", PATH=bindir + os.pathsep + e.get("PATH", ""))
        cmd = [os.path.join(bindir, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               "--module", "hybrid_ds.train", str(path)]
    p = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    stage = "ZeRO stage 0" if launcher == "torchrun" else "ZeRO stage 2 (deepspeed launcher)"
    assert "sft on 2 process(es)" in p.stdout + p.stderr and stage in p.stdout + p.stderr
    assert len(metrics(cfg["OUTPUT_DIR"], "sft")) == cfg["MAX_STEPS"]


@pytest.mark.parametrize("launcher", ["torchrun"])
def test_torchrun_and_deepspeed_launchers(tmp_path, launcher):
    """The same module under torchrun (DDP, no DeepSpeed). The deepspeed launcher (ZeRO-2 by default)
    runs the 2-process side of test_accumulation_and_ranks_are_equivalent[2], through run_launcher."""
    run_launcher(sft_cfg(tmp_path, "run", MAX_STEPS=5), tmp_path, launcher)
