"""The preference losses (hybrid_ds/algorithms/pref_math.py) against numbers computed by hand, and
against TRL's DPOTrainer and RewardTrainer (the oracle) on the same fixed batch: loss and gradients."""

import copy
import math

import pytest
import torch

from hybrid_ds.algorithms import pref_math as pm


@pytest.fixture(scope="module", autouse=True)
def fresh_accelerate_state():
    """TRL's trainers set Accelerate's process-wide state with their own arguments; it is reset after this
    module, so the in-process runs of later tests (tests/inproc.py) set theirs."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _nlsig(x):  # -log sigma(x), by hand
    return math.log1p(math.exp(-x))


def test_bradley_terry_by_hand():
    c, r = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    assert torch.allclose(pm.bradley_terry_loss(c, r), torch.tensor([_nlsig(1.0), _nlsig(-1.0)]))
    assert torch.allclose(pm.bradley_terry_loss(c, r), torch.tensor([0.31326169, 1.31326169]))
    # Llama 2's margin: the chosen reward must beat the rejected one by m
    assert torch.allclose(pm.bradley_terry_loss(c, r, margin=torch.tensor([0.5, 0.5])),
                          torch.tensor([0.47407698, 1.70141328]))
    assert torch.isfinite(pm.bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0]))).all()


def test_dpo_sigmoid_ipo_and_label_smoothing_by_hand():
    # log-ratios: chosen +1, rejected -1
    pc, rc, pr, rr = torch.tensor([-3.0]), torch.tensor([-4.0]), torch.tensor([-5.0]), torch.tensor([-4.0])
    loss, stats = pm.dpo_loss("sigmoid", pc, pr, rc, rr, beta=0.5)
    assert torch.allclose(loss, torch.tensor([0.31326169]))  # -log sigma(0.5 * 2)
    assert stats.chosen.item() == 0.5 and stats.rejected.item() == -0.5
    assert stats.margins.item() == 1.0 and stats.accuracies.item() == 1.0
    assert torch.allclose(stats.sums(), torch.tensor([0.5, -0.5, 1.0, 1.0]))
    smoothed, _ = pm.dpo_loss("sigmoid", pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    assert torch.allclose(smoothed, torch.tensor([0.9 * 0.31326169 + 0.1 * 1.31326169]))
    # IPO: per-token log-ratios 1/2 and -1/4, h = 0.75; (0.75 - 1 / (2 * 0.5))^2
    ipo, _ = pm.dpo_loss("ipo", pc, pr, rc, rr, beta=0.5, chosen_tokens=torch.tensor([2]),
                         rejected_tokens=torch.tensor([4]))
    assert torch.allclose(ipo, torch.tensor([0.0625]))
    with pytest.raises(ValueError, match="DPO_LOSS 'hinge'"):
        pm.dpo_loss("hinge", pc, pr, rc, rr, beta=0.5)


def test_sequence_logps_by_hand_and_against_a_loop():
    labels = torch.tensor([[-100, -100, 3, 1], [-100, 2, -100, -100]])
    lp, n = pm.sequence_logps(torch.zeros(2, 4, 4), labels)  # uniform over 4: each token -log 4
    assert n.tolist() == [2, 1]
    assert torch.allclose(lp, torch.tensor([-2 * math.log(4), -math.log(4)]))
    logits = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0))
    lp, _ = pm.sequence_logps(logits, labels)
    want = [sum(torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item() for t in range(1, 4)
                if labels[b, t] != -100) for b in range(2)]
    assert torch.allclose(lp, torch.tensor(want), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# TRL 1.16 as the oracle: the same batch through its trainers' losses and through pref_math

PAIRS = [{"prompt_ids": [5, 9, 13], "chosen_ids": [22, 31, 40], "rejected_ids": [17]},
         {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11, 12, 50]}]


def _tiny_lm():
    from transformers import AutoModelForCausalLM

    from hybrid_ds.assets import resolve_model

    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_pretrained(resolve_model("builtin:tiny-gpt2"))
    policy = copy.deepcopy(ref)
    with torch.no_grad():  # the policy differs from the reference, so the log-ratios are not 0
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, ref


@pytest.fixture(scope="module")
def dpo_trainer(tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from hybrid_ds.assets import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-gpt2"))
    tok.pad_token = tok.pad_token or tok.eos_token
    policy, ref = _tiny_lm()
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), beta=0.3, loss_type=["sigmoid"],
                     report_to=[], use_cpu=True, per_device_train_batch_size=2)
    ds = Dataset.from_list([{"prompt": "a b", "chosen": " c", "rejected": " d"}] * 2)
    tr = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    return tr, DataCollatorForPreference(pad_token_id=tok.pad_token_id)(PAIRS), ref


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_dpo_matches_trl_dpo_trainer(dpo_trainer, kind):
    tr, batch, ref = dpo_trainer
    tr.loss_types = [kind]
    policy = tr.model
    policy.train()
    policy.zero_grad()
    want = tr.compute_loss(policy, dict(batch))
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    want_metrics = {k: v[-1] for k, v in tr._metrics["train"].items() if k.startswith("rewards/")}

    # hybrid_ds: chosen rows first, then rejected, labelled on the completion
    policy.zero_grad()
    ids, att = batch["input_ids"], batch["attention_mask"]
    labels = ids.masked_fill(batch["completion_mask"] == 0, -100)
    logps, n = pm.sequence_logps(policy(input_ids=ids, attention_mask=att).logits, labels)
    with torch.no_grad():
        ref_logps, _ = pm.sequence_logps(ref(input_ids=ids, attention_mask=att).logits, labels)
    B = len(PAIRS)
    loss, stats = pm.dpo_loss(kind, logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], beta=0.3,
                              chosen_tokens=n[:B], rejected_tokens=n[B:])
    loss.mean().backward()
    assert abs(loss.mean().item() - want.item()) < 1e-5, (loss.mean().item(), want.item())
    assert abs(stats.margins.abs().mean().item()) > 1e-4  # the log-ratios are not trivially 0
    for name, p in policy.named_parameters():
        assert torch.allclose(p.grad, want_grads[name], atol=1e-5, rtol=1e-4), name
    assert abs(stats.chosen.mean().item() - want_metrics["rewards/chosen"]) < 1e-5
    assert abs(stats.rejected.mean().item() - want_metrics["rewards/rejected"]) < 1e-5
    assert abs(stats.margins.mean().item() - want_metrics["rewards/margins"]) < 1e-5
    assert stats.accuracies.mean().item() == want_metrics["rewards/accuracies"]


def test_bradley_terry_matches_trl_reward_trainer(tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from hybrid_ds.assets import resolve_model

    path = resolve_model("builtin:tiny-gpt2")
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    args = RewardConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=2)
    ds = Dataset.from_list([{"chosen": "a b c", "rejected": "a d"}] * 2)
    tr = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    rows = [p["prompt_ids"] + p["chosen_ids"] for p in PAIRS] + [p["prompt_ids"] + p["rejected_ids"] for p in PAIRS]
    L = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (L - len(r)) for r in rows])
    att = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
    for margin in (None, 0.7):  # with and without Llama 2's margin
        inputs = {"input_ids": ids, "attention_mask": att}
        if margin is not None:
            inputs["margin"] = torch.full((2,), margin)
        tr.model.train()
        tr.model.zero_grad()
        want = tr.compute_loss(tr.model, dict(inputs))
        want.backward()
        want_grads = {n: p.grad.clone() for n, p in tr.model.named_parameters()}
        tr.model.zero_grad()
        r = tr.model(input_ids=ids, attention_mask=att).logits.squeeze(-1)
        loss = pm.bradley_terry_loss(r[:2], r[2:], margin=None if margin is None else torch.full((2,), margin)).mean()
        loss.backward()
        assert abs(loss.item() - want.item()) < 1e-5
        for name, p in tr.model.named_parameters():
            assert torch.allclose(p.grad, want_grads[name], atol=1e-5, rtol=1e-4), name
