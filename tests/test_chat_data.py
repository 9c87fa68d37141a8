"""Conversations: assistant-only labels with a chat template (the builtin tokenizer + a ChatML-like
template) and without one (the plain ``### Role:`` rendering), checked against sequences written out
by hand; the PPO prompt and target; end-of-turn stop ids in the sampler and in PPO's rollout; and
docs/data.md being the code's current rendering."""

import os

import pytest
import torch

from chat_data import chat_model_dir, conversations, write_jsonl
from conftest import REPO
from hybrid_ds.data import (IGNORE_INDEX, DataError, DataReport, collate_prompts, collate_sft, end_of_turn_id,
                            load_items, stop_token_ids, to_sample, tokenize_conversation, tokenize_items,
                            use_chat_template)
from hybrid_ds.data.reference import CHATML_TEMPLATE, builtin_tokenizer, chatml_tokenizer, data_reference_markdown

CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "apple river"},
        {"role": "assistant", "content": "river apple"},
        {"role": "user", "content": "stone tree"},
        {"role": "tool", "content": "lookup: tree"},
        {"role": "assistant", "content": "tree stone"}]


@pytest.fixture(scope="module")
def chat():
    return chatml_tokenizer()


@pytest.fixture(scope="module")
def plain():
    return builtin_tokenizer()


def by_hand(tok, pieces):
    """Ids and 0/1 labels of ``(text or id, labelled)`` pieces, each text tokenised on its own."""
    ids, flags = [], []
    for p, lab in pieces:
        part = [p] if isinstance(p, int) else tok(p, add_special_tokens=False)["input_ids"]
        ids += part
        flags += [lab] * len(part)
    return ids, flags


def test_the_test_tokenizers(chat, plain):
    im_start, im_end = chat.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert (im_start, im_end) == (len(plain), len(plain) + 1)  # added after the builtin vocabulary
    assert chat("x<|im_end|>\n", add_special_tokens=False)["input_ids"][-2:] == [im_end, 200]  # 200 = "\n"
    assert end_of_turn_id(chat) == im_end and stop_token_ids(chat) == [chat.eos_token_id, im_end]
    assert end_of_turn_id(plain) is None and stop_token_ids(plain) == [plain.eos_token_id]


def test_template_labels_every_assistant_turn_and_its_end_of_turn_only(chat):
    """System, user and tool turns, role headers and the newline after <|im_end|> are masked."""
    im_end = chat.convert_tokens_to_ids("<|im_end|>")
    ids, flags, last = tokenize_conversation(CONV, 0, chat, stop_token_ids(chat))
    head1 = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\napple river<|im_end|>\n<|im_start|>assistant\n"
    head2 = ("<|im_start|>user\nstone tree<|im_end|>\n<|im_start|>tool\nlookup: tree<|im_end|>\n"
             "<|im_start|>assistant\n")
    want_ids, want_flags = by_hand(chat, [(head1, 0), ("river apple", 1), (im_end, 1), ("\n", 0), (head2, 0),
                                          ("tree stone", 1), (im_end, 1)])
    assert ids == want_ids and flags == want_flags
    labelled = [t for t, f in zip(ids, flags) if f]
    assert chat.decode(labelled) == "river apple<|im_end|>tree stone<|im_end|>"
    assert labelled.count(im_end) == 2 and sum(flags) == len(labelled)
    # the PPO prompt: the history up to the last assistant turn, as the template's generation prompt
    gen_prompt = chat.apply_chat_template(CONV[:-1], tokenize=False, add_generation_prompt=True)
    assert chat.decode(ids[:last]) == gen_prompt
    assert ids[:last] == chat(gen_prompt, add_special_tokens=False)["input_ids"]  # as inference tokenises it
    assert last == len(want_ids) - len(by_hand(chat, [("tree stone", 1), (im_end, 1)])[0])


def test_plain_rendering_labels_content_and_eos(plain):
    eos = plain.eos_token_id
    ids, flags, last = tokenize_conversation(CONV, 0, plain, stop_token_ids(plain))
    want_ids, want_flags = by_hand(plain, [
        ("### System:\nBe brief.\n\n### User:\napple river\n\n### Assistant:\n", 0), ("river apple", 1), (eos, 1),
        ("\n\n### User:\nstone tree\n\n### Tool:\nlookup: tree\n\n### Assistant:\n", 0), ("tree stone", 1),
        (eos, 1)])
    assert ids == want_ids and flags == want_flags
    assert plain.decode(ids[:last]).endswith("lookup: tree\n\n### Assistant:\n")


@pytest.mark.parametrize("templated", [True, False], ids=["template", "plain"])
def test_file_to_batch_one_example_per_conversation(tmp_path, chat, plain, templated):
    """Through load_items, tokenize_items, collate_sft and collate_prompts."""
    tok = chat if templated else plain
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONV}, {"messages": CONV[:3]}])
    report = DataReport()
    items = load_items(path, shuffle=False, report=report)
    ex = tokenize_items(items, tok, "output", 256, report, data_format=report.data_format)
    assert len(ex) == 2 and report.data_format == "messages"
    ids, flags, last = tokenize_conversation(CONV, 0, tok, stop_token_ids(tok))
    b = collate_sft(ex, tok.pad_token_id)
    assert b["input_ids"][0].tolist() == ids
    assert b["labels"][0].tolist() == [t if f else IGNORE_INDEX for t, f in zip(ids, flags)]
    assert b["labels"][1, b["attention_mask"][1].sum():].eq(IGNORE_INDEX).all()  # padding masked
    assert ex[0].target == "tree stone" and ex[0].prompt_ids == ids[:last]
    assert tok.decode(ex[0].target_ids) == "tree stone" + ("<|im_end|>" if templated else tok.eos_token)
    q, att = collate_prompts(ex, tok.pad_token_id, 256)
    assert q[0, -last:].tolist() == ids[:last] and int(att[0].sum()) == last


def test_prompt_completion_messages_label_only_the_completion(chat):
    """An assistant turn inside the prompt (a few-shot example) is context, not a label."""
    item = {"prompt": CONV[:5], "completion": CONV[5:]}
    ex = tokenize_items([item], chat, "output", 256, data_format="prompt_completion")[0]
    ids, labels = ex.sft_sequence()
    assert chat.decode([t for t in labels if t != IGNORE_INDEX]) == "tree stone<|im_end|>"
    s = to_sample(item, "prompt_completion", "output")
    assert s.first_labelled == 5 and ids == tokenize_conversation(CONV, 0, chat, stop_token_ids(chat))[0]


def test_template_without_a_special_end_of_turn_gets_eos():
    """A template that ends turns in plain text: the last turn's labels end with EOS, the only stop."""
    tok = builtin_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    assert end_of_turn_id(tok) is None
    ids, flags, _ = tokenize_conversation(CONV[1:3], 0, tok, stop_token_ids(tok))
    want_ids, want_flags = by_hand(tok, [("user: apple river\nassistant: ", 0), ("river apple\n", 1),
                                         (tok.eos_token_id, 1)])
    assert ids == want_ids and flags == want_flags


def test_template_that_is_not_prefix_stable_is_refused(tmp_path):
    tok = chatml_tokenizer()
    tok.chat_template = "{% if add_generation_prompt %}GEN {% endif %}" + tok.chat_template
    with pytest.raises(DataError, match="not a prefix.*CHAT_TEMPLATE"):
        tokenize_items([{"messages": CONV}], tok, "output", 256)


def test_truncation_and_drop_count_conversations(chat):
    report = DataReport()
    ids, flags, _ = tokenize_conversation(CONV, 0, chat, stop_token_ids(chat))
    first = flags.index(1)
    ex = tokenize_items([{"messages": CONV}], chat, "output", first + 3, report)
    assert report.truncated == 1 and len(ex[0].sft_ids) == first + 3 and ex[0].sft_labels[-3:] == ids[first:first + 3]
    with pytest.raises(DataError, match="MAXSEQ"):
        tokenize_items([{"messages": CONV}], chat, "output", first, report)
    assert report.dropped_too_long == 1


def test_chat_template_setting(tmp_path):
    tok = chatml_tokenizer()
    use_chat_template(tok, "none")
    assert tok.chat_template is None and stop_token_ids(tok) == [tok.eos_token_id]
    f = tmp_path / "t.jinja"
    f.write_text(CHATML_TEMPLATE)
    use_chat_template(tok, str(f))
    assert tok.chat_template == CHATML_TEMPLATE and len(stop_token_ids(tok)) == 2


# --------------------------------------------------------------------------------------
# stopping at the end of turn


def test_sampler_stops_at_any_of_several_stop_ids():
    """Two stop ids, the second made likely: rows end at it, and lean_exact draws generate's tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from hybrid_ds.algorithms import ppo_math as pm
    from hybrid_ds.rollout.sampler import SamplingSettings, sample

    V, EOS, EOT, PAD = 64, 1, 2, 0
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                       eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        b = torch.full((32,), 0.5)
        model.transformer.ln_f.bias.copy_(b)
        model.lm_head.weight[EOT] += 3.0 * b / b.dot(b)  # the end-of-turn id's logit gains 3
    ids = torch.randint(3, V, (6, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    st = SamplingSettings(max_new_tokens=16, eos_token_id=[EOS, EOT], pad_token_id=PAD, top_k=20)
    torch.manual_seed(3)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, **st.generate_kwargs())[:, 5:]
    torch.manual_seed(3)
    out = sample(model, ids, mask, st, hf_rng=True)
    assert torch.equal(out.response_ids, ref) and bool(out.ended.all())
    ends = [int(torch.isin(r, torch.tensor([EOS, EOT])).nonzero()[0]) for r in out.response_ids]
    assert any(int(out.response_ids[i, e]) == EOT for i, e in enumerate(ends))
    m, ended = pm.mask_after_eos(out.response_ids, [EOS, EOT])
    assert torch.equal(out.response_mask, m) and [int(r.sum()) for r in m] == [e + 1 for e in ends]


def test_ppo_rollout_ends_responses_at_the_end_of_turn(tmp_path):
    """A policy that likes <|im_end|>: PPO's rollout ends each response there, counts it as ended, and
    leaves it out of the decoded text the reward sees."""
    from inproc import base, make_run

    from hybrid_ds.algorithms import ppo

    data = write_jsonl(tmp_path / "c.jsonl", conversations(8))
    run = make_run(base(tmp_path, "ppo", MODEL=chat_model_dir(), TRAIN_FILE=data, MAX_NEW_TOKENS=12,
                        MIN_NEW_TOKENS=0, MAXSEQ=128, REPETITION_PENALTY=1.0, NO_REPEAT_NGRAM_SIZE=0))
    tok = run.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    lm = run.engine.module.lm
    with torch.no_grad():  # ln_f's output = a zero-sum part + its bias b, so <|im_end|>'s logit gains 20
        b = torch.full_like(lm.transformer.ln_f.bias, 0.5)
        lm.transformer.ln_f.bias.copy_(b)
        lm.lm_head.weight[im_end] += 20.0 * b / b.dot(b)
    examples = run.examples[:4]
    assert all(tok.decode(e.prompt_ids).endswith("<|im_start|>assistant\n") for e in examples)
    ro = ppo.generate(run, examples)
    assert bool(ro.ended.all())
    lengths = ro.response_mask.sum(1).long()
    for r in range(len(examples)):
        assert int(ro.response_ids[r, lengths[r] - 1]) == im_end  # the last kept token is the end of turn
        assert "<|im_end|>" not in ro.texts[r]


def test_docs_data_md_is_current():
    with open(os.path.join(REPO, "docs", "data.md"), encoding="utf-8") as f:
        assert f.read() == data_reference_markdown(), "regenerate: python -m hybrid_ds.data --docs > docs/data.md"
