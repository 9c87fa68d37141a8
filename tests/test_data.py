"""Data: the spec's prompt template, response-only labels, truncation accounting, bad items."""

import json

import pytest

from conftest import write_json
from hybrid_ds.data import (IGNORE_INDEX, BatchStream, DataError, DataReport, collate_prompts, collate_sft,
                            load_items, micro_batches, rank_slice, render_prompt, render_target, tokenize_items)


@pytest.fixture(scope="module")
def tok():
    from hybrid_ds.models.policy_value import load_tokenizer

    return load_tokenizer("builtin:tiny-gpt2")


def test_prompt_template_matches_spec_by_hand():
    item = {"task": "reverse", "input": "  a b c ", "tags": ["x", "y"], "output": "c b a"}
    assert render_prompt(item, "output") == (
        "### Prompt:\n\n```task: reverse\ninput: a b c\ntags: x, y\n```\n\n### Response:\n\n")
    assert render_target(item, "output") == "c b a"
    assert render_target({"answer": ["first", "second"]}, "answer") == "first"


def test_text_only_items_use_text_as_prompt_and_response():
    item = {"text": "The tower stands."}
    assert render_prompt(item, "text") == "### Prompt:\n\n```text: The tower stands.\n```\n\n### Response:\n\n"
    assert render_target(item, "text") == "The tower stands."


def test_labels_mask_prompt_and_padding_and_keep_eos(tok):
    items = [{"task": "copy", "input": "apple", "output": "apple"},
             {"task": "copy", "input": "river stone", "output": "river stone"}]
    ex = tokenize_items(items, tok, "output", 128)
    p0 = tok(render_prompt(items[0], "output"), add_special_tokens=False)["input_ids"]
    t0 = tok("apple", add_special_tokens=False)["input_ids"]
    assert ex[0].prompt_ids == p0 and ex[0].target_ids == t0 + [tok.eos_token_id]
    b = collate_sft(ex, tok.pad_token_id)
    L0 = len(p0) + len(t0) + 1
    assert b["labels"][0, :len(p0)].eq(IGNORE_INDEX).all()
    assert b["labels"][0, len(p0):L0].tolist() == t0 + [tok.eos_token_id]
    assert b["labels"][0, L0:].eq(IGNORE_INDEX).all() and b["attention_mask"][0, L0:].eq(0).all()
    assert b["input_ids"][0, L0:].eq(tok.pad_token_id).all()
    assert tok.pad_token_id != tok.eos_token_id


def test_truncation_is_counted_and_never_all_masked(tok):
    long = {"task": "copy", "input": "x", "output": " ".join(["apple"] * 50)}
    huge = {"task": "copy", "input": " ".join(["river"] * 200), "output": "y"}
    report = DataReport()
    ex = tokenize_items([long, huge], tok, "output", 40, report)
    assert report.truncated == 1 and report.dropped_too_long == 1 and len(ex) == 1
    b = collate_sft(ex, tok.pad_token_id)
    assert b["input_ids"].shape[1] == 40 and (b["labels"] != IGNORE_INDEX).sum() > 0


def test_left_padded_prompts(tok):
    ex = tokenize_items([{"a": "apple", "output": "b"}, {"a": "apple river stone", "output": "b"}], tok, "output", 64)
    ids, att = collate_prompts(ex, tok.pad_token_id, 64)
    assert att[0, 0] == 0 and att[0, -1] == 1 and att[1].all()
    assert ids[0, -len(ex[0].prompt_ids):].tolist() == ex[0].prompt_ids


@pytest.mark.parametrize("item,message", [
    ({"input": "a"}, "item 1: missing output field 'output' (fields: input)"),
    ({"input": "a", "output": ""}, "item 1: output field 'output' is empty"),
    ({"input": "a", "output": {"x": 1}}, "item 1: output field 'output' is a dict, not text"),
    ({"input": {"nested": 1}, "output": "a"}, "item 1: field 'input' holds a dict"),
    ("just a string", "item 1: expected a JSON object, got str"),
    ({"input": "a", "output": []}, "item 1: output field 'output' is an empty list"),
])
def test_bad_items_name_index_and_problem(tmp_path, item, message):
    path = write_json(tmp_path / "d.json", [{"input": "ok", "output": "fine"}, item])
    with pytest.raises(DataError) as e:
        load_items(path, shuffle=False)
    assert message in str(e.value) and "ON_BAD_ITEM=skip" in str(e.value)


def test_skip_policy_counts(tmp_path):
    path = write_json(tmp_path / "d.json", [{"input": "ok", "output": "fine"}, {"input": "a"}, {"input": "b"}])
    report = DataReport()
    items = load_items(path, shuffle=False, on_bad_item="skip", report=report)
    assert len(items) == 1 and sum(report.skipped.values()) == 2


def test_jsonl_percent_num_samples_and_seeded_shuffle(tmp_path):
    rows = [{"input": str(i), "output": str(i)} for i in range(20)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert len(load_items(str(path), percent=25, shuffle=False)) == 5
    assert len(load_items(str(path), num_samples=7, percent=25, shuffle=False)) == 7
    a, b = load_items(str(path), seed=3), load_items(str(path), seed=3)
    assert a == b and a != rows and sorted(r["input"] for r in a) == sorted(r["input"] for r in rows)


def test_datasets_dir_and_wikitext_style_blank_lines(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["first line", "", "  ", "second line"]})
    ds.save_to_disk(str(tmp_path / "wiki"))
    report = DataReport()
    items = load_items(str(tmp_path / "wiki"), "text", shuffle=False, report=report)
    assert [i["text"] for i in items] == ["first line", "second line"] and report.empty_text_filtered == 2


def test_batch_stream_is_reproducible_and_covers_each_epoch():
    s = BatchStream(10, 4, seed=1, shuffle=True)
    first = [s.next() for _ in range(4)]
    assert s.batches_per_epoch == 2 and len(set(first[0] + first[1])) == 8
    s2 = BatchStream(10, 4, seed=1, shuffle=True)
    s2.load_state_dict({"position": 2})
    assert s2.next() == first[2]


def test_rank_slices_and_micro_batches_partition_the_global_batch():
    batch = list(range(8))
    parts = [m for r in range(2) for m in micro_batches(rank_slice(batch, r, 2), 2)]
    assert parts == [[0, 1], [2, 3], [4, 5], [6, 7]]
