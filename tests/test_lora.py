"""LoRA and QLoRA through peft (hybrid_ds/models/lora.py) on a tiny Llama.

Config: the keys' own checks, and LORA_TARGET_MODULES that match nothing stop the CLI with exit 2
naming the model's linear modules. DeepSpeed (tests/scripts/lora_probe.py, ZeRO-2 on one process,
ZeRO-3 on two): the reference is the policy with its adapters disabled (no second causal LM, MODEL's
log-probs), checkpoints hold only the adapters and the value head, a resumed cycle equals the
uninterrupted one; ``inference_lm/`` equals peft's ``adapter/`` applied to MODEL and the trained
policy, and the offline export of the sharded checkpoint equals it. Plain torch, in process: a run
resumed from a fresh build (the frozen base loaded from MODEL again) equals an uninterrupted one;
QLoRA's 4-bit base trains on CPU (bitsandbytes quantises there) and merges into the full base.
"""

import json
import os
import subprocess

import pytest
import torch

from conftest import REPO, write_json
from inproc import base, make_run
from launch_utils import BIN, env, free_port, load_weights, metrics
from tiny_models import tiny_model_dir

PROBE = os.path.join(REPO, "tests", "scripts", "lora_probe.py")


def lora_cfg(out, **keys) -> dict:
    cfg = base(out, **{"MODEL": tiny_model_dir("llama"), "LORA_R": 4, "LORA_ALPHA": 8, "MAX_STEPS": 2, **keys})
    cfg["OUTPUT_DIR"] = str(out / "out")
    return cfg


def ids_batch(n_vocab: int) -> torch.Tensor:
    return torch.randint(3, n_vocab - 1, (2, 10), generator=torch.Generator().manual_seed(1))


def base_like_the_run(merged):
    """MODEL, as peft's users load it, with the rows the run's tokenizer added (a pad token; drawn at
    random by ``resize_token_embeddings``, frozen, no adapter on them) taken from the run's output."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    n0, n = lm.get_input_embeddings().weight.shape[0], merged.get_input_embeddings().weight.shape[0]
    if n > n0:
        lm.resize_token_embeddings(n)
        with torch.no_grad():
            for get in ("get_input_embeddings", "get_output_embeddings"):
                getattr(lm, get)().weight[n0:] = getattr(merged, get)().weight[n0:]
    return lm


def max_logit_diff(a, b, ids) -> float:
    with torch.no_grad():
        return float((a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max())


# --------------------------------------------------------------------------------------
# config


def test_lora_keys_are_checked(tmp_path):
    from hybrid_ds.config import ConfigError
    from hybrid_ds.run.preflight import load_config

    def problems(**keys):
        cfg = lora_cfg(tmp_path, **keys)
        try:
            load_config(None, [f"{k}={json.dumps(v)}" for k, v in cfg.items()])
        except ConfigError as e:
            return str(e)
        return ""

    assert problems(LORA_TARGET_MODULES=["q_proj", "v_proj"]) == ""
    assert problems(LORA_TARGET_MODULES="all-linear", LOAD_IN_8BIT=True) == ""
    assert "LORA_TARGET_MODULES: expected" in problems(LORA_TARGET_MODULES=3)
    assert "LORA_TARGET_MODULES" in problems(LORA_TARGET_MODULES=[])
    assert "LOAD_IN_4BIT: a quantised base cannot be trained" in problems(LORA_R=0, LOAD_IN_4BIT=True)
    assert "LOAD_IN_4BIT and LOAD_IN_8BIT" in problems(LOAD_IN_4BIT=True, LOAD_IN_8BIT=True)
    assert "REF_INIT=after_warmup with LORA_R > 0" in problems(REF_INIT="after_warmup", SFT_WARMUP_STEPS=1)
    assert "LOAD_IN_4BIT with ZeRO stage 3" in problems(LOAD_IN_4BIT=True, ZERO_STAGE=3)
    assert "LORA_DROPOUT" in problems(LORA_DROPOUT=1.5)


def test_target_modules_that_match_nothing_stop_at_preflight_with_exit_2(tmp_path, capsys):
    from hybrid_ds.run.cli import main

    path = write_json(tmp_path / "cfg.json", lora_cfg(tmp_path, LORA_TARGET_MODULES=["q_proj", "qkv_proj"]))
    with pytest.raises(SystemExit) as e:
        main([path, "--dry-run"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "LORA_TARGET_MODULES: 'qkv_proj' match(es) no module" in err, err
    assert "its linear modules are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in err


# --------------------------------------------------------------------------------------
# DeepSpeed: one probe per stage, asserted on by several tests


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """stage -> (the probe's findings, its OUTPUT_DIR); each stage's probe runs once, when first asked."""
    done = {}

    def get(zero: int):
        if zero not in done:
            tmp = tmp_path_factory.mktemp(f"zero{zero}")
            # ZeRO-3 also recomputes activations (GRADIENT_CHECKPOINTING), which must leave resume exact
            cfg = lora_cfg(tmp, ZERO_STAGE=zero, MAX_STEPS=1, GRADIENT_CHECKPOINTING=zero == 3)
            path = write_json(tmp / "cfg.json", cfg)
            nproc = 2 if zero == 3 else 1  # ZeRO-3 partitions over two ranks; ZeRO-2 needs only one to prove it
            cmd = [os.path.join(BIN, "accelerate"), "launch", "--config_file",
                   os.path.join(REPO, "launch", f"zero{zero}.yaml"), "--num_processes", str(nproc),
                   "--main_process_port", str(free_port()), PROBE, path]
            p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
            assert p.returncode == 0, p.stderr[-4000:]
            line = next(ln for ln in p.stdout.splitlines() if ln.startswith("PROBE "))
            done[zero] = (json.loads(line[len("PROBE "):]), cfg["OUTPUT_DIR"])
        return done[zero]

    return get


@pytest.mark.parametrize("zero", [2, 3], ids=["zero2", "zero3"])
def test_reference_is_the_policy_with_its_adapters_disabled(probes, zero):
    r, _ = probes(zero)
    assert r["ref_is_none"] and r["causal_lms"] == 1, r  # no second model object
    assert r["ref_equals_base"] <= 1e-6, r  # adapters off = MODEL
    assert r["policy_vs_base"] > 1e-3, r  # the adapters trained, and turning them off matters


@pytest.mark.parametrize("zero", [2, 3], ids=["zero2", "zero3"])
def test_checkpoint_holds_only_adapters_and_value_head_and_resumes_exactly(probes, zero):
    from hybrid_ds.engine.train_engine import saved_weights
    from hybrid_ds.run.checkpoint_dir import ENGINE_TAG

    r, _ = probes(zero)
    assert r["trainable"] and all(".lora_" in k or k.startswith("v_head.") for k in r["trainable"])
    saved = saved_weights(r["checkpoint"], ENGINE_TAG, deepspeed=True)  # DeepSpeed's zero_to_fp32
    assert sorted(saved) == r["trainable"]
    engine_dir = os.path.join(r["checkpoint"], ENGINE_TAG)
    ckpt_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(engine_dir) for f in fs)
    base_bytes = os.path.getsize(os.path.join(tiny_model_dir("llama"), "model.safetensors"))
    assert ckpt_bytes < base_bytes / 2, (ckpt_bytes, base_bytes)  # weights + Adam moments of the adapters only
    assert r["resume_max_diff"] == 0.0 and r["same_metrics"], r
    assert r["gradient_checkpointing"] == (zero == 3), r


def test_inference_lm_equals_the_adapter_on_the_base_and_the_trained_policy(probes):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hybrid_ds.models.logprobs import lm_response_logprobs

    _, out = probes(2)
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "inference_lm"))
    adapted = PeftModel.from_pretrained(base_like_the_run(merged), os.path.join(out, "adapter"))
    ids = ids_batch(merged.config.vocab_size)
    assert max_logit_diff(merged, adapted, ids) <= 1e-5
    with adapted.disable_adapter():
        assert max_logit_diff(merged, adapted, ids) > 1e-3  # the adapter is not a no-op
    probe = torch.load(os.path.join(out, "probe.pt"))
    ids, att, pos, resp = probe["batch"]
    with torch.no_grad():
        lp = lm_response_logprobs(merged, ids, att, pos, resp, 1.0)
    assert float((lp - probe["policy_logprobs"]).abs().max()) <= 1e-5


def test_export_of_a_sharded_lora_checkpoint_equals_inference_lm(probes, tmp_path):
    from hybrid_ds.run.export import export

    r, out = probes(3)
    exported = export(r["checkpoint"], str(tmp_path / "exported"), with_value_head=True)
    assert os.path.isfile(os.path.join(exported, "adapter", "adapter_model.safetensors"))
    wa, wb = load_weights(os.path.join(out, "inference_lm")), load_weights(exported)
    assert wa.keys() == wb.keys() and not any(".lora_" in k for k in wa)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6
    va, vb = torch.load(os.path.join(out, "ppo_full", "value_head.pt")), torch.load(os.path.join(exported, "value_head.pt"))
    assert all(torch.equal(va[k], vb[k]) for k in va)


# --------------------------------------------------------------------------------------
# plain torch, in process


def train_in_process(cfg: dict, tmp_path, name: str) -> None:
    from hybrid_ds.run.cli import main

    assert main([write_json(tmp_path / f"{name}.json", cfg)]) == 0


def test_resumed_from_a_fresh_build_equals_uninterrupted(tmp_path):
    """B stops after cycle 1 and is started again: its base comes from MODEL again (the checkpoint
    holds only model.pt's adapters and value head), and it ends where A does."""
    a, b = lora_cfg(tmp_path / "A"), lora_cfg(tmp_path / "B")
    train_in_process(a, tmp_path, "A")
    train_in_process({**b, "MAX_STEPS": 1}, tmp_path, "B1")
    saved = torch.load(os.path.join(b["OUTPUT_DIR"], "checkpoints", "step-0000001", "model.pt"))
    assert saved and all(".lora_" in k or k.startswith("v_head.") for k in saved), sorted(saved)[:4]
    train_in_process(b, tmp_path, "B2")
    wa, wb = load_weights(os.path.join(a["OUTPUT_DIR"], "inference_lm")), load_weights(
        os.path.join(b["OUTPUT_DIR"], "inference_lm"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) == 0.0
    strip = ("time", "perf/", "mem/")  # wall clock and memory differ between runs
    rows = [[{k: v for k, v in r.items() if not k.startswith(strip)} for r in metrics(c["OUTPUT_DIR"])]
            for c in (a, b)]
    assert rows[0] == rows[1]


def test_qlora_4bit_base_trains_on_cpu_and_merges_into_the_full_base(tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hybrid_ds.run.checkpoint import finish
    from hybrid_ds.run.loop import train

    cfg = lora_cfg(tmp_path, LOAD_IN_4BIT=True, MAX_STEPS=1)
    run = make_run(cfg)
    lm = run.engine.module.lm
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in lm.modules()) and run.ref is None
    before = run.engine.trainable_state_dict()
    train(run)
    finish(run)
    after = run.engine.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if ".lora_B" in k)  # the adapters trained
    out = cfg["OUTPUT_DIR"]
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "inference_lm"))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())  # merged into full precision
    adapted = PeftModel.from_pretrained(base_like_the_run(merged), os.path.join(out, "adapter"))
    assert max_logit_diff(merged, adapted, ids_batch(merged.config.vocab_size)) <= 1e-5


def test_lean_decode_steps_leave_lora_layers_to_their_forward():
    """rollout/decode.Gpt2Step and LlamaStep read the weights themselves: on LoRA-wrapped layers they
    would sample from the base, so such a model decodes through its forward (which adds the adapters);
    a 4-bit base is left to its forward too (test_qlora_4bit_base_trains_on_cpu_and_merges_into_the_full_base)."""
    from hybrid_ds.config.schema import LoraConfig
    from hybrid_ds.models.lora import add_adapters
    from hybrid_ds.models.policy_value import load_lm, load_tokenizer
    from hybrid_ds.rollout.decode import Gpt2Step, LlamaStep

    lm = load_lm("builtin:tiny-gpt2", load_tokenizer("builtin:tiny-gpt2")).eval()
    assert Gpt2Step.supports(lm)
    assert not Gpt2Step.supports(add_adapters(lm, LoraConfig(r=2, target_modules=["c_attn"])).eval())
    llama = load_lm(tiny_model_dir("llama"), load_tokenizer(tiny_model_dir("llama"))).eval()  # LlamaStep likewise
    assert LlamaStep.supports(llama, 64)
    assert not LlamaStep.supports(add_adapters(llama, LoraConfig(r=2, target_modules=["v_proj"])).eval(), 64)
