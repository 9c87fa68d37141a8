"""The policy/value model's forward trims (keep_last, labelled_tail), the fused GELU, and model-state accounting."""

import math

import pytest
import torch

from hybrid_ds.engine.train_engine import TrainEngine, model_state_bytes
from hybrid_ds.models.policy_value import PolicyValue, causal_lm_logits, fuse_activations
from hybrid_ds.algorithms.sft import labelled_tail, token_ce_sum

V = 97


def tiny_gpt2(seed=0, layers=2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=layers, n_head=2)
    return GPT2LMHeadModel(cfg).eval()


def batch(B=4, L=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    att = torch.ones(B, L, dtype=torch.long)
    att[1, :3] = 0  # left padding in one row
    pos = (att.cumsum(1) - 1).clamp(min=0)
    return ids, att, pos


def test_fused_gelu_equals_gelu_new_and_configs_keep_their_name(tmp_path):
    a, b = tiny_gpt2(), tiny_gpt2()
    assert fuse_activations(b) == 2 and fuse_activations(b) == 0  # once per layer, idempotent
    assert b.config.activation_function == "gelu_new"
    ids, att, pos = batch()
    with torch.no_grad():
        oa = a(input_ids=ids, attention_mask=att, position_ids=pos, output_hidden_states=True)
        ob = b(input_ids=ids, attention_mask=att, position_ids=pos, output_hidden_states=True)
    torch.testing.assert_close(ob.logits, oa.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(ob.hidden_states[-1], oa.hidden_states[-1], atol=1e-5, rtol=0)
    b.save_pretrained(tmp_path)
    assert '"activation_function": "gelu_new"' in (tmp_path / "config.json").read_text()


def test_keep_last_gives_the_last_positions_of_the_full_forward():
    model = PolicyValue(tiny_gpt2(), seed=3)
    with torch.no_grad():
        model.v_head.weight.normal_()
    ids, att, pos = batch()
    with torch.no_grad():
        full_logits, full_values = model(ids, att, position_ids=pos, with_values=True)
        logits, values = model(ids, att, position_ids=pos, with_values=True, keep_last=5)
        ref = causal_lm_logits(model.lm, ids, att, pos, keep_last=5)
    assert logits.shape == (4, 5, V) and values.shape == (4, 5)
    torch.testing.assert_close(logits, full_logits[:, -5:], atol=1e-5, rtol=0)
    torch.testing.assert_close(values, full_values[:, -5:], atol=1e-5, rtol=0)
    torch.testing.assert_close(ref, full_logits[:, -5:], atol=1e-5, rtol=0)


def test_causal_lm_logits_slices_when_the_model_cannot_keep():
    class NoKeep(torch.nn.Module):  # a causal LM whose forward has no logits_to_keep
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    lm = tiny_gpt2()
    ids, att, pos = batch()
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_logits(NoKeep(lm), ids, att, pos, keep_last=3),
                                   lm(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, -3:])


@pytest.mark.parametrize("starts", [(5, 7, 9), (1, 1, 1), (11, 11, 11)])
def test_sft_loss_on_the_labelled_tail_equals_the_full_loss(starts):
    """labelled_tail keeps every position whose next token is labelled; the summed CE and its gradient
    equal the full-logit ones."""
    B, L = len(starts), 12
    ids = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    for i, s in enumerate(starts):
        labels[i, :s] = -100
    keep = labelled_tail(labels)
    assert keep == L - (min(starts) - 1)
    model = PolicyValue(tiny_gpt2())
    att = torch.ones_like(ids)
    full, _ = model(ids, att)
    loss_full = token_ce_sum(full, labels)
    g_full = torch.autograd.grad(loss_full, model.lm.transformer.wte.weight)[0]
    part, _ = model(ids, att, keep_last=keep)
    loss_part = token_ce_sum(part, labels[:, -keep:])
    g_part = torch.autograd.grad(loss_part, model.lm.transformer.wte.weight)[0]
    torch.testing.assert_close(loss_part, loss_full, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(g_part, g_full, atol=1e-6, rtol=1e-5)


def test_labelled_tail_without_labels_keeps_one_position():
    assert labelled_tail(torch.full((2, 6), -100)) == 1


def test_model_state_bytes_counts_params_and_adam_state_once():
    model = PolicyValue(tiny_gpt2())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    logits, values = model(*batch()[:2], with_values=True)
    (logits.sum() + values.sum()).backward()  # every parameter gets a gradient, hence Adam state
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    shared = model.lm.lm_head.weight is model.lm.transformer.wte.weight  # tied: one storage
    assert shared
    out = model_state_bytes(TrainEngine(None, model, model, opt))
    assert out["params"] == 4 * n
    assert out["optim"] >= 2 * 4 * n and out["optim"] <= 2 * 4 * n + 64 * len(opt.state)  # moments + step counters
    assert out["buffers"] == 0  # a torch optimizer holds nothing else


def test_ppo_loss_on_the_response_positions_equals_the_full_forward_with_its_gradient():
    """ppo.policy_response_outputs runs the LM head on the T + 1 last positions only: the clipped
    PPO loss and its gradient with respect to every parameter (value head included) equal those
    of a full-logit forward sliced here, with a plain log_softmax."""
    from hybrid_ds.algorithms import ppo_math as pm
    from hybrid_ds.models.logprobs import logprobs_from_logits, policy_response_outputs, sequence_inputs

    model = PolicyValue(tiny_gpt2(), seed=3)
    with torch.no_grad():
        model.v_head.weight.normal_()
    g = torch.Generator().manual_seed(2)
    q_ids, q_mask, _ = batch(B=4, L=7)
    T = 5
    resp = torch.randint(0, V, (4, T), generator=g)
    r_mask = torch.ones(4, T)
    r_mask[2, 3:] = 0  # a response that ended early
    ids, att, pos = sequence_inputs(q_ids, q_mask, resp, r_mask)
    old_logp = -4.6 + 0.3 * torch.randn(4, T, generator=g)
    adv, old_v, ret = (torch.randn(4, T, generator=g) for _ in range(3))

    def loss_of(logits, values):
        logp = logprobs_from_logits(logits, resp, 0.7)
        pg, _ = pm.policy_loss(logp, old_logp, adv, r_mask, 0.2)
        vf, _ = pm.value_loss(values, old_v, ret, r_mask, 0.2)
        return pg + 0.1 * vf

    def naive_loss():
        full, values = model(ids, att, position_ids=pos, with_values=True)
        P = q_ids.shape[1]
        lp = torch.log_softmax(full[:, P - 1:P + T - 1] / 0.7, -1).gather(2, resp.unsqueeze(-1)).squeeze(-1)
        pg, _ = pm.policy_loss(lp, old_logp, adv, r_mask, 0.2)
        vf, _ = pm.value_loss(values[:, P - 1:P + T - 1], old_v, ret, r_mask, 0.2)
        return pg + 0.1 * vf

    params = [p for p in model.parameters() if p.requires_grad]
    trimmed = loss_of(*policy_response_outputs(model, ids, att, pos, T))
    g_trim = torch.autograd.grad(trimmed, params, allow_unused=True)
    full = naive_loss()
    g_full = torch.autograd.grad(full, params, allow_unused=True)
    torch.testing.assert_close(trimmed, full, atol=1e-6, rtol=1e-5)
    assert sum(a is not None for a in g_full) == len(params)
    for (name, _), a, b in zip(model.named_parameters(), g_trim, g_full):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


class _Fp16Dist:
    """A one-process Dist as TrainEngine sees it, with FP16 and no DeepSpeed."""

    uses_deepspeed, world, max_grad_norm, device = False, 1, 0.0, torch.device("cpu")

    class plan:  # noqa: N801 - mirrors Dist.plan
        mixed_precision = "fp16"

    @staticmethod
    def autocast():
        import contextlib

        return contextlib.nullcontext()


def test_fp16_without_deepspeed_scales_the_loss_and_skips_overflows():
    """Without DeepSpeed, FP16 scales the loss before backward (float16 gradients underflow
    otherwise) and unscales before clipping and stepping: the step equals the unscaled fp32 step;
    an overflowing step leaves the weights unchanged and halves the scale."""
    from hybrid_ds.engine.train_engine import TrainEngine

    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(8, 4)
    eng = TrainEngine(_Fp16Dist(), a, a, torch.optim.SGD([{"params": a.parameters(), "role": "policy"}], lr=0.1))
    assert eng.scaler is not None and eng.scaler.get_scale() == 2.0 ** 16
    eng.backward(a(x).pow(2).mean(), boundary=True)
    assert a.weight.grad.abs().max() > 1000  # the gradient held is the scaled one
    norm = eng.step({"policy": 0.1})
    ref_opt = torch.optim.SGD(b.parameters(), lr=0.1)
    b(x).pow(2).mean().backward()
    ref_norm = float(torch.nn.utils.clip_grad_norm_(list(b.parameters()), float("inf")))
    ref_opt.step()
    assert abs(norm - ref_norm) < 1e-4 * ref_norm
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=1e-7)
    w = a.weight.detach().clone()
    scale = eng.scaler.get_scale()
    eng.backward(a(x).sum() * float("inf"), boundary=True)
    assert not math.isfinite(eng.step({"policy": 0.1}))
    assert torch.equal(a.weight, w) and eng.scaler.get_scale() == scale / 2
