"""The GPU tier (`pytest -m gpu`): what only a CUDA machine shows. SFT, PPO and hybrid runs of the tiny
models through the real launcher and DeepSpeed, in bfloat16 and float16, on NCCL; the lean sampler's
CUDA decode (GPT-2's and the Llama family's own steps) against `generate`; a bitsandbytes 8-bit
optimizer on CUDA. Without a GPU every test here is skipped; a test that needs more GPUs than the
machine has is skipped, not failed (tests/conftest.py keeps the CPU tier's launches on the CPU).
tests/test_fp16.py and tests/test_sampler.py hold the other gpu-marked tests."""

import pytest
import torch

from launch_utils import assert_finite_rows, launch, metrics
from tiny_models import tiny_model_dir

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def need_gpus(n: int) -> None:
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} GPUs, this machine has {torch.cuda.device_count()}")


def base(tmp_path, mode: str, **extra) -> dict:
    cfg = {"MODE": mode, "MODEL": "builtin:tiny-gpt2", "TRAIN_FILE": "builtin:demo-tasks",
           "OUTPUT_DIR": str(tmp_path / "out"), "SEED": 0, "SFT_BATCH": 8, "LR_SFT": 3e-3, "PPO_BATCH": 8,
           "PPO_MINI": 4, "PPO_EPOCHS": 2, "LR_PPO": 1e-4, "MAX_NEW_TOKENS": 8, "MIN_NEW_TOKENS": 2,
           "MAXSEQ": 96, "MAX_STEPS": 4, "SCHEDULER": "constant", "REWARD": {"type": "word_f1"},
           "MAX_NAN_STEPS": 3}
    cfg.update(extra)
    return cfg


def check_gpu_run(p, cfg: dict, *, nproc: int, zero: int, precision: str) -> None:
    """The run said it trained on CUDA over NCCL at the asked stage and precision, every logged step is
    finite, and the GPU allocator's peak is in the PPO rows (the phases ran on the GPU)."""
    said = p.stdout + p.stderr
    assert f"on {nproc} process(es), device cuda, process group nccl, ZeRO stage {zero}" in said, said[-3000:]
    assert f"precision {precision}" in said, said[-3000:]
    out = cfg["OUTPUT_DIR"]
    steps = cfg["MAX_STEPS"] + cfg.get("SFT_WARMUP_STEPS", 0)
    if cfg["MODE"] == "sft":
        assert_finite_rows(metrics(out, "sft"), cfg["MAX_STEPS"], "sft")
        return
    ppo = metrics(out, "ppo")
    assert_finite_rows(ppo, cfg["MAX_STEPS"], "ppo")
    assert all(r[f"mem/peak_gpu_mb/rank{k}"] > 0 for r in ppo for k in range(nproc))
    if cfg["MODE"] == "hybrid":
        assert len(metrics(out, "sft")) == steps


@pytest.mark.parametrize("mode,zero,precision", [
    ("sft", 2, "bf16"), ("ppo", 2, "fp16"), ("hybrid", 3, "bf16"), ("hybrid", 2, "fp16"),
], ids=["sft-zero2-bf16", "ppo-zero2-fp16", "hybrid-zero3-bf16", "hybrid-zero2-fp16"])
def test_tiny_model_runs_on_one_gpu(tmp_path, mode, zero, precision):
    cfg = base(tmp_path, mode, **{precision.upper(): True})
    if mode == "hybrid":
        cfg["SFT_WARMUP_STEPS"] = 4
    p = launch(cfg, tmp_path, nproc=1, zero=zero)
    check_gpu_run(p, cfg, nproc=1, zero=zero, precision=precision)


def test_llama_hybrid_bf16_with_sdpa_and_an_8bit_optimizer(tmp_path):
    """A Llama-family model (the lean LlamaStep decodes its rollouts) in bfloat16 with SDPA attention and
    gradient checkpointing, trained by bitsandbytes' 8-bit AdamW under ZeRO-2."""
    model = tiny_model_dir("llama", str(tmp_path / "models"))
    cfg = base(tmp_path, "hybrid", MODEL=model, BF16=True, SFT_WARMUP_STEPS=4, OPTIMIZER="adamw_8bit",
               ATTN_IMPLEMENTATION="sdpa", GRADIENT_CHECKPOINTING=True)
    p = launch(cfg, tmp_path, nproc=1, zero=2)
    check_gpu_run(p, cfg, nproc=1, zero=2, precision="bf16")
    sft = [r["sft/loss"] for r in metrics(cfg["OUTPUT_DIR"], "sft")]
    assert sft[-1] < sft[0], sft


def test_two_gpus_hybrid_zero2(tmp_path):
    need_gpus(2)
    cfg = base(tmp_path, "hybrid", BF16=True, SFT_WARMUP_STEPS=4)
    p = launch(cfg, tmp_path, nproc=2, zero=2)
    check_gpu_run(p, cfg, nproc=2, zero=2, precision="bf16")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lean_sampler_on_cuda_matches_generate(tmp_path, family):
    """The lean decode step on CUDA (GPT-2's and the Llama family's own) gives generate's very tokens from
    the same seed, with the design's processors and ragged left padding, and log-probs equal to a
    recomputed forward; fp32, so the tokens compare exactly."""
    from transformers import AutoModelForCausalLM

    from hybrid_ds.models import logprobs as lp
    from hybrid_ds.rollout.sampler import SamplingSettings, sample

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family, str(tmp_path / "models"))).cuda().eval()
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = pad, 0
    ids, mask = ids.cuda(), mask.cuda()
    st = SamplingSettings(max_new_tokens=12, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.15,
                          no_repeat_ngram_size=3, eos_token_id=eos, pad_token_id=pad)
    for seed in range(2):
        torch.manual_seed(seed)
        ours = sample(model, ids, mask, st)
        torch.manual_seed(seed)
        with torch.no_grad():
            hf = model.generate(input_ids=ids, attention_mask=mask, **st.generate_kwargs())[:, ids.shape[1]:]
        n = ours.response_ids.shape[1]
        assert torch.equal(ours.response_ids, hf[:, :n]) and bool((hf[:, n:] == pad).all()), (family, seed)
        seq = torch.cat([ids, ours.response_ids], 1)
        att = torch.cat([mask, ours.response_mask.long()], 1)
        with torch.no_grad():
            logits = model(input_ids=seq, attention_mask=att, position_ids=(att.cumsum(1) - 1).clamp(min=0)).logits
        ref = lp.logprobs_from_logits(logits[:, ids.shape[1] - 1:-1], ours.response_ids, 0.7) * ours.response_mask
        torch.testing.assert_close(ours.logprobs, ref, atol=1e-4, rtol=1e-4)
