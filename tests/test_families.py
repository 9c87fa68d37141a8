"""Every decoder family of tests/tiny_models.py through hybrid_ds: the value head's input, and a whole
hybrid run (SFT step + PPO update) whose ``inference_lm/`` vanilla transformers loads and generates from.

The runs: Llama and Qwen2 (tied embeddings) on 2 processes under ZeRO-3, the other families on one
process under ZeRO-2. All are forked from one process that did the imports once
(tests/scripts/forked_runs.py), so a run costs its own work, ~2 s on one process and ~5 s on two.
"""

import math
import os

import pytest
import torch

from launch_utils import forked_runs, load_weights, metrics
from tiny_models import FAMILIES, family_config, tiny_model_dir

from hybrid_ds.models.policy_value import PolicyValue, logits_to_keep

ZERO3_TWO_PROCESSES = ("llama", "qwen2")


def tiny(family: str, vocab: int = 96):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(family_config(family, vocab, eos=1, pad=0)).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_value_head_reads_the_lm_heads_input(family):
    """PolicyValue's logits and values equal those of the former path (every layer's hidden states
    requested, the last one read), for all positions and for the last K; its forward neither asks the
    trunk for hidden states nor gets any back."""
    model = PolicyValue(tiny(family), seed=0)
    with torch.no_grad():
        model.v_head.weight.normal_()  # not the near-zero init: values that can differ
    ids = torch.randint(2, 96, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    seen = []

    def spy(_module, _args, kwargs, output):
        seen.append((kwargs.get("output_hidden_states"), output.hidden_states))

    for keep in (0, 4):
        handle = model.lm.register_forward_hook(spy, with_kwargs=True)
        try:
            logits, values = model(ids, mask, pos, with_values=True, keep_last=keep)
        finally:
            handle.remove()
        old = model.lm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                       output_hidden_states=True, **logits_to_keep(model.lm, keep))  # the former forward
        h = old.hidden_states[-1]
        h = h[:, -keep:] if keep else h
        assert torch.equal(values, model.v_head(h).squeeze(-1).float())
        assert torch.equal(logits, old.logits)
    assert seen and all(not want and hs is None for want, hs in seen)
    values.sum().backward()  # the values' gradient reaches the trunk through the caught hidden state
    assert model.v_head.weight.grad is not None
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.lm.parameters())


def family_cfg(family: str, root) -> dict:
    two = family in ZERO3_TWO_PROCESSES
    return {"MODE": "hybrid", "MODEL": tiny_model_dir(family), "TRAIN_FILE": "builtin:demo-tasks",
            "OUTPUT_DIR": str(root / family), "SEED": 0, "SFT_BATCH": 4, "LR_SFT": 1e-3, "PPO_BATCH": 2,
            "PPO_MINI": 2, "PPO_EPOCHS": 1, "LR_PPO": 1e-3, "MAX_NEW_TOKENS": 4, "MIN_NEW_TOKENS": 1,
            "MAXSEQ": 64, "MAX_STEPS": 1, "SCHEDULER": "constant", "REWARD": {"type": "word_f1"},
            "ZERO_STAGE": 3 if two else 2, "MAX_NAN_STEPS": 1,
            # every family also recomputes its activations, and under ZeRO-3 the reference follows the
            # policy after the cycle's SFT step (a partition-by-partition copy: nothing is gathered)
            "GRADIENT_CHECKPOINTING": True, "REF_SYNC_EVERY": 1 if two else 0}


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory):
    """Every family's run, once: {family: (config, exit code, seconds)}."""
    root = tmp_path_factory.mktemp("families")
    cfgs = {family: family_cfg(family, root) for family in FAMILIES}
    done, log = forked_runs({f: (cfgs[f], 2 if f in ZERO3_TWO_PROCESSES else 1) for f in FAMILIES}, root)
    return {name: (cfgs[name], code, seconds) for name, (code, seconds) in done.items()}, log[-9000:]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_hybrid_run_and_its_inference_lm(family_runs, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    done, log = family_runs
    assert family in done, log
    cfg, code, seconds = done[family]
    assert code == 0, log
    print(f"{family}: {seconds:.1f} s")
    out = cfg["OUTPUT_DIR"]
    rows = metrics(out)
    assert [r["phase"] for r in rows] == (["sft", "ref", "ppo"] if cfg["REF_SYNC_EVERY"] else ["sft", "ppo"]), rows
    if cfg["REF_SYNC_EVERY"]:  # the synced reference is the policy the rollout sampled from: KL 0
        assert abs(rows[-1]["objective/kl"]) < 1e-3, rows[-1]
    for r in rows:
        assert all(math.isfinite(v) for k, v in r.items() if isinstance(v, (int, float))), r
    assert os.path.isfile(os.path.join(out, "ppo_full", "value_head.pt"))
    # trained: every saved tensor finite, some moved off the initial weights
    trained, init = load_weights(os.path.join(out, "inference_lm")), load_weights(cfg["MODEL"])
    assert all(bool(torch.isfinite(t).all()) for t in trained.values())
    assert any(not torch.equal(trained[k], init[k]) for k in init if k in trained)
    # vanilla transformers: load and generate
    lm_dir = os.path.join(out, "inference_lm")
    tok = AutoTokenizer.from_pretrained(lm_dir)
    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    assert type(model).__name__ == type(tiny(family)).__name__
    ids = tok("### Prompt:\n\ncopy: apple river\n\n### Response:\n\n", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 3


def test_value_head_through_a_peft_model():
    """Wrapped by peft (LoRA on attention and on the LM head itself), the value head still reads the
    final hidden state: the same values as the former all-hidden-states path."""
    from peft import LoraConfig, get_peft_model

    lm = get_peft_model(tiny("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"],
                                                  init_lora_weights=False))  # non-zero adapters
    model = PolicyValue(lm, seed=0)
    with torch.no_grad():
        model.v_head.weight.normal_()
    ids = torch.randint(2, 96, (2, 9))
    mask = torch.ones_like(ids)
    _, values = model(ids, mask, with_values=True, keep_last=5)
    old = lm(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
    assert torch.equal(values, model.v_head(old.hidden_states[-1][:, -5:]).squeeze(-1).float())
