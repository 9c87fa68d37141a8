"""What real models need beyond the tiny GPT-2: the load dtype, the attention kernel, gradient
checkpointing, cross-entropy in fp32 blocks, and a ppo_full/ that continues RL with its value head."""

import json
import os
import subprocess

import pytest
import torch
import torch.nn.functional as F

import hybrid_ds.models.logprobs as logprobs_mod
from conftest import PYTHON, REPO, write_json
from hybrid_ds.algorithms.sft import token_ce_sum
from hybrid_ds.config import ConfigError
from hybrid_ds.models.policy_value import (PolicyValue, attention_problem, dtype_problem, load_dtype,
                                           load_model_config, value_head_problem)
from hybrid_ds.run.preflight import load_config
from inproc import base, make_run
from tiny_models import tiny_model_dir


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_model_dir("llama", str(tmp_path_factory.mktemp("models")))


def _labels(B, L, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :5] = -100  # a prompt
    labels[1, :2] = -100
    labels[2, 7:] = -100  # right padding
    return labels


# ---------------------------------------------------------------------------------------------
# cross-entropy in blocks


@pytest.mark.parametrize("chunk", [1 << 24, 50])  # one block; blocks smaller than one position's V
def test_blocked_ce_equals_cross_entropy_values_and_gradients(monkeypatch, chunk):
    monkeypatch.setattr(logprobs_mod, "_CHUNK_ELEMENTS", chunk)
    B, L, V = 3, 9, 37
    labels = _labels(B, L, V)
    logits = torch.randn(B, L, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float()
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    ours = token_ce_sum(a, labels)
    ref = F.cross_entropy(b[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_blocked_ce_keeps_half_precision_logits_half(monkeypatch):
    """bf16 logits: the value is fp32 cross-entropy of the bf16 logits, and the gradient reaching the
    logits is bf16, as large as the logits: no fp32 (B, L, V) tensor is kept for backward."""
    monkeypatch.setattr(logprobs_mod, "_CHUNK_ELEMENTS", 64)
    B, L, V = 3, 6, 40
    labels = _labels(B, L, V)
    logits = torch.randn(B, L, V, generator=torch.Generator().manual_seed(2)).bfloat16().requires_grad_(True)
    saved = []  # every tensor autograd keeps for backward, custom functions' included
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours = token_ce_sum(logits, labels)
    ref = F.cross_entropy(logits.detach()[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1),
                          ignore_index=-100, reduction="sum")
    torch.testing.assert_close(ours.detach(), ref, rtol=1e-6, atol=1e-5)
    assert not [t for t in saved if t.dtype == torch.float32 and t.numel() >= B * (L - 1) * V]
    assert any(t.dtype == torch.bfloat16 and t.dim() == 3 for t in saved)
    ours.backward()
    assert logits.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# gradient checkpointing


def test_gradient_checkpointing_gives_the_same_gradients(llama_dir):
    """The policy trunk recomputed in backward: SFT loss + value loss gradients equal the stored-
    activation run's to 1e-6 (fp32), on every parameter, value head included."""
    from transformers import AutoModelForCausalLM

    grads = []
    for ckpt in (False, True):
        lm = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
        if ckpt:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = PolicyValue(lm, seed=0).train()
        assert lm.is_gradient_checkpointing == ckpt
        B, L = 3, 10
        ids = torch.randint(0, lm.config.vocab_size, (B, L), generator=torch.Generator().manual_seed(3))
        att = torch.ones(B, L, dtype=torch.long)
        att[1, :3] = 0
        logits, values = model(ids, att, position_ids=(att.cumsum(1) - 1).clamp(min=0), with_values=True)
        loss = token_ce_sum(logits, ids.masked_fill(att == 0, -100)) + (values ** 2).sum()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("v_head") for k in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=1e-6, msg=n)


# ---------------------------------------------------------------------------------------------
# TORCH_DTYPE and ATTN_IMPLEMENTATION


def test_load_dtype_and_its_rules():
    assert load_dtype("auto", "no", deepspeed=True) == torch.float32
    assert load_dtype("auto", "bf16", deepspeed=True) == torch.bfloat16  # DeepSpeed casts to it anyway
    assert load_dtype("auto", "bf16", deepspeed=False) == torch.float32  # autocast over fp32 weights
    assert load_dtype("float16", "no", deepspeed=False) == torch.float16
    assert dtype_problem("bfloat16", "bf16", deepspeed=True) is None
    assert dtype_problem("bfloat16", "no", deepspeed=False) is None  # pure bf16, no master copy
    assert "BF16=true" in dtype_problem("bfloat16", "no", deepspeed=True)
    assert "FP16=true" in dtype_problem("float16", "bf16", deepspeed=True)
    assert "underflow" in dtype_problem("float16", "no", deepspeed=False)
    assert dtype_problem("float16", "no", deepspeed=False, frozen_base=True) is None


def test_attention_problem_checks_names_support_and_kernels(llama_dir):
    gpt2 = load_model_config("builtin:tiny-gpt2")
    assert attention_problem(gpt2, "") is None and attention_problem(gpt2, "eager") is None
    assert attention_problem(gpt2, "sdpa") is None
    assert "not an attention implementation" in attention_problem(gpt2, "spda")
    assert "does not support 'flex_attention'" in attention_problem(gpt2, "flex_attention")
    assert attention_problem(load_model_config(llama_dir), "flex_attention") is None
    if not torch.cuda.is_available():
        assert "CUDA GPU" in attention_problem(gpt2, "flash_attention_2")


def test_dtype_and_attention_reach_the_models(tmp_path, llama_dir):
    """TORCH_DTYPE=bfloat16 without DeepSpeed trains bf16 weights (policy and colocated reference);
    ATTN_IMPLEMENTATION=eager is what both run; one PPO update and one SFT step change the weights."""
    from hybrid_ds.run.loop import train

    run = make_run(base(tmp_path, MODEL=llama_dir, TORCH_DTYPE="bfloat16", ATTN_IMPLEMENTATION="eager",
                        GRADIENT_CHECKPOINTING=True, MAX_STEPS=1))
    lm = run.engine.module.lm
    assert lm.dtype == torch.bfloat16 and run.ref.dtype == torch.bfloat16
    assert lm.config._attn_implementation == "eager" and run.ref.config._attn_implementation == "eager"
    assert lm.is_gradient_checkpointing and not run.ref.is_gradient_checkpointing
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    train(run)
    assert any(not torch.equal(before[k], v) for k, v in lm.state_dict().items())
    assert all(torch.isfinite(v.float()).all() for v in lm.state_dict().values())


def _cli(cfg_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([PYTHON, "-m", "hybrid_ds.train", cfg_path, "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_bad_dtype_attention_and_value_head_are_exit_2(tmp_path, llama_dir):
    """Each problem named with its key and what to do; in the CLI, exit 2 and no traceback."""
    bad = tmp_path / "model"
    os.makedirs(bad)
    for f in os.listdir(llama_dir):
        os.symlink(os.path.join(llama_dir, f), bad / f)
    torch.save({"weight": torch.zeros(1, 7), "bias": torch.zeros(1)}, bad / "value_head.pt")
    keys = base(tmp_path, MODEL=str(bad), ATTN_IMPLEMENTATION="spda", TORCH_DTYPE="bfloat16")
    with pytest.raises(ConfigError, match="TORCH_DTYPE=bfloat16 under DeepSpeed needs BF16=true"):
        load_config(None, [f"{k}={json.dumps(v)}" for k, v in {**keys, "ZERO_STAGE": 2}.items()])
    r = _cli(write_json(tmp_path / "c.json", keys))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "ATTN_IMPLEMENTATION: 'spda' is not an attention implementation" in r.stderr
    assert "holds a value head of shape (1, 7)" in r.stderr and "value_head.pt" in r.stderr
    # a critic-free run builds no value head, so the file is neither read nor a problem
    from hybrid_ds.run.preflight import preflight

    grpo = {**keys, "ATTN_IMPLEMENTATION": "", "ADVANTAGE": "grpo", "NUM_GENERATIONS": 2}
    preflight(load_config(None, [f"{k}={json.dumps(v)}" for k, v in grpo.items()]), 0)


# ---------------------------------------------------------------------------------------------
# ppo_full/ continues RL


def test_ppo_full_carries_its_value_head_over_exactly(tmp_path, capsys):
    from hybrid_ds.run.outputs import save_outputs

    run = make_run(base(tmp_path, MODE="ppo"))
    with torch.no_grad():  # a head that is not the fresh seeded init, so only loading can reproduce it
        run.engine.module.v_head.weight.normal_(generator=torch.Generator().manual_seed(7))
        run.engine.module.v_head.bias.fill_(0.25)
    trained = {k: v.clone() for k, v in run.engine.module.v_head.state_dict().items()}
    save_outputs(run)
    full = os.path.join(run.cfg.run.output_dir, "ppo_full")
    assert value_head_problem(full, load_model_config(full)) is None
    cont = make_run(base(tmp_path / "next", MODE="ppo", MODEL=full))
    assert f"value head loaded from {os.path.join(full, 'value_head.pt')}" in capsys.readouterr().out
    for k, v in cont.engine.module.v_head.state_dict().items():
        assert torch.equal(v, trained[k]), k
    fresh = make_run(base(tmp_path / "fresh", MODE="ppo"))  # the base model: a fresh head, not the trained one
    assert not torch.equal(fresh.engine.module.v_head.weight, trained["weight"])
    assert json.load(open(os.path.join(full, "config.json")))["model_type"] == "gpt2"


def test_weights_holding_nan_are_a_model_file_error_with_exit_2(tmp_path, llama_dir, capsys):
    """A model file whose header is sound but whose tensors hold NaN (a damaged copy, a diverged save)
    stops the run before any step: exit 2 naming MODEL and the tensor, no traceback, nothing trained."""
    from safetensors.torch import load_file, save_file

    from hybrid_ds.run.cli import main

    bad = tmp_path / "model"
    os.makedirs(bad)
    for f in os.listdir(llama_dir):
        if f != "model.safetensors":
            os.symlink(os.path.join(llama_dir, f), bad / f)
    w = load_file(os.path.join(llama_dir, "model.safetensors"))
    w["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(w, str(bad / "model.safetensors"), metadata={"format": "pt"})
    cfg = write_json(tmp_path / "c.json", base(tmp_path, MODE="sft", MODEL=str(bad)))
    assert main([cfg]) == 2
    err = capsys.readouterr().err
    assert f"MODEL {str(bad)!r}: its weights hold NaN or infinite values (model.layers.1.mlp.down_proj.weight)" \
        in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "out" / "checkpoints")
