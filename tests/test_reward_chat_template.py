"""Model-based rewards whose tokenizer has a chat template score the rendered conversation (the
prompt, or a conversational item's own turns, as history; the response as the assistant turn), as
TRL's and OpenRLHF's reward models do. Tiny random-init Llama models built here, with the builtin
tokenizer carrying the ChatML-like template of docs/data.md."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from hybrid_ds.data.reference import chatml_tokenizer  # noqa: E402
from hybrid_ds.rewards import make_reward  # noqa: E402

RESPONSES = ["c b a", "y x", "Paris."]
PROMPTS = ["Reverse: a b c", "<policy's own rendering, not used>", "Capital of France?"]
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Reverse: x y"},
        {"role": "assistant", "content": "y x"}]
ITEMS = [{"input": "a b c", "output": "c b a"}, {"messages": CHAT}, None]
# The conversations as the template renders them, written out by hand.
HISTORIES = ["<|im_start|>user\nReverse: a b c<|im_end|>\n",
             "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nReverse: x y<|im_end|>\n",
             "<|im_start|>user\nCapital of France?<|im_end|>\n"]
RENDERED = [h + f"<|im_start|>assistant\n{r}<|im_end|>\n" for h, r in zip(HISTORIES, RESPONSES)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Llama reward model and a tiny Llama causal LM, both saved with the templated tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tok = chatml_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      num_labels=1)
    out = {}
    for name, cls in (("rm", LlamaForSequenceClassification), ("lm", LlamaForCausalLM)):
        torch.manual_seed(3)
        path = str(tmp_path_factory.mktemp(name))
        cls(cfg).eval().save_pretrained(path)
        tok.save_pretrained(path)
        out[name] = path
    return out


def test_reward_model_scores_the_rendered_conversation(models):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward = make_reward({"type": "reward_model", "model": models["rm"], "separator": " ", "batch_size": 2})
    scores = reward.score_batch(RESPONSES, RESPONSES, PROMPTS, ITEMS)
    tok = AutoTokenizer.from_pretrained(models["rm"])
    assert tok.chat_template
    model = AutoModelForSequenceClassification.from_pretrained(models["rm"]).eval()

    def direct(text):
        with torch.no_grad():
            return model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()

    assert scores == pytest.approx([direct(t) for t in RENDERED], abs=1e-5)
    plain = [direct(p + " " + r) for p, r in zip(PROMPTS, RESPONSES)]  # what a template-less model is fed
    assert all(abs(s - q) > 1e-4 for s, q in zip(scores, plain))


def test_perplexity_conditions_on_the_rendered_history(models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reward = make_reward({"type": "perplexity", "model": models["lm"], "condition_on_prompt": True,
                          "mode": "neg_log"})
    scores = reward.score_batch(RESPONSES, RESPONSES, PROMPTS, ITEMS)
    tok = AutoTokenizer.from_pretrained(models["lm"])
    model = AutoModelForCausalLM.from_pretrained(models["lm"]).eval()
    expected = []
    for history, response in zip(HISTORIES, RESPONSES):
        ctx = tok(history + "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        resp = tok(response, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + resp])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        nll = -logp[torch.arange(len(ctx) - 1, ids.shape[1] - 1), ids[0, len(ctx):]].mean().item()
        expected.append(-nll)
    assert scores == pytest.approx(expected, abs=1e-4)
