"""Data formats: detection per file, DATA_FORMAT, one check per format (errors name file, item and
field), PROMPT_TEMPLATE (plain field names only), and the config keys' own checks."""

import json

import pytest

from conftest import write_json
from hybrid_ds.config import ConfigError
from hybrid_ds.config.schema import DataConfig
from hybrid_ds.data import (FORMATS, DataError, DataReport, detect_format, load_items, render_prompt,
                            render_template, template_fields, to_sample, tokenize_items)
from hybrid_ds.data.reference import builtin_tokenizer
from hybrid_ds.run.preflight import load_config

MSGS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


def test_schema_choices_are_the_formats():
    import dataclasses

    f = {x.name: x for x in dataclasses.fields(DataConfig)}["data_format"]
    assert f.metadata["choices"] == ("auto",) + FORMATS


@pytest.mark.parametrize("rows,fmt", [
    ([{"task": "t", "input": "x", "output": "y"}], "fields"),
    ([{"output": "only text"}, {"output": "more"}], "text"),
    ([{"messages": MSGS}], "messages"),
    ([{"prompt": "a", "completion": "b"}], "prompt_completion"),
    ([{"prompt": MSGS[:1], "completion": MSGS[1:]}], "prompt_completion"),
    # an object with the output field is the original shape, whatever else it holds
    ([{"messages": "m", "output": "y"}], "fields"),
    ([{"prompt": "a", "completion": "b", "output": "y"}], "fields"),
    (["not an object", {"messages": MSGS}], "messages"),
])
def test_detection(rows, fmt):
    assert detect_format(rows, "output") == fmt


def test_detected_per_file_and_reported(tmp_path):
    a = write_json(tmp_path / "a.json", [{"messages": MSGS}] * 2)
    b = write_json(tmp_path / "b.json", [{"prompt": "p", "completion": "c"}] * 2)
    ra, rb = DataReport(), DataReport()
    load_items(a, report=ra)
    load_items(b, report=rb)
    assert (ra.data_format, rb.data_format, ra.detected) == ("messages", "prompt_completion", True)
    assert "format: messages (detected)" in ra.lines()


def test_data_format_overrides_detection(tmp_path):
    rows = [{"prompt": "Say hi", "completion": " hi", "output": "ignored"}] * 2
    path = write_json(tmp_path / "d.json", rows)
    report = DataReport()
    items = load_items(path, data_format="prompt_completion", report=report)
    assert report.data_format == "prompt_completion" and not report.detected
    s = to_sample(items[0], "prompt_completion", "output")
    assert (s.prompt, s.target, s.messages) == ("Say hi", " hi", None)
    # read as fields (detected), the same items render through the seed template
    assert to_sample(items[0], "fields", "output").prompt == render_prompt(rows[0], "output")


def test_seed_shape_renders_as_before(tok, demo_items):
    """The default path (auto -> fields, no PROMPT_TEMPLATE) gives the seed template's prompts."""
    ex = tokenize_items(demo_items[:4], tok, "output", 256)
    for e, it in zip(ex, demo_items[:4]):
        assert e.prompt == render_prompt(it, "output") and e.sft_ids is None
        assert e.prompt_ids == tok(e.prompt, add_special_tokens=False)["input_ids"]


def test_text_format_ignores_other_fields(tok):
    s = to_sample({"text": "The tower.", "source": {"nested": 1}}, "text", "text")
    assert s.prompt == render_prompt({"text": "The tower."}, "text") and s.target == "The tower."


@pytest.mark.parametrize("item,fmt,message", [
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages",
     "messages[0].role is 'bot'; roles are system, user, assistant, tool"),
    ({"messages": [{"role": "user", "content": 3}, MSGS[1]]}, "messages", "messages[0].content is int"),
    ({"messages": [{"role": "user"}, MSGS[1]]}, "messages", "messages[0].content is missing"),
    ({"messages": MSGS[:1]}, "messages", "messages ends with a 'user' turn; the last turn must be the assistant's"),
    ({"messages": []}, "messages", "messages is an empty list"),
    ({"messages": "hello"}, "messages", "messages is a str, not a list of messages"),
    ({"messages": [MSGS[0], {"role": "assistant", "content": "  "}]}, "messages",
     "messages[1].content (the last assistant turn) is empty"),
    ({"text": "x"}, "messages", "missing field 'messages' (fields: text)"),
    ({"prompt": "p"}, "prompt_completion", "missing field 'completion'"),
    ({"prompt": "p", "completion": MSGS[1:]}, "prompt_completion",
     "fields 'prompt' (str) and 'completion' (list) must both be text or both message lists"),
    ({"prompt": MSGS[:1], "completion": MSGS[:1]}, "prompt_completion", "completion ends with a 'user' turn"),
    ({"prompt": [{"role": "user", "content": None}], "completion": MSGS[1:]}, "prompt_completion",
     "prompt[0].content is NoneType"),
    ({"prompt": "p", "completion": " "}, "prompt_completion", "field 'completion' is empty"),
    ("a string", "messages", "expected a JSON object, got str"),
])
def test_bad_items_name_file_index_field_and_remedy(tmp_path, item, fmt, message):
    good = {"messages": MSGS} if fmt == "messages" else {"prompt": "p", "completion": "c"}
    path = write_json(tmp_path / "d.json", [good, item])
    with pytest.raises(DataError) as e:
        load_items(path, shuffle=False, data_format=fmt)
    text = str(e.value)
    assert f"{path!r} item 1: {message}" in text, text
    assert "ON_BAD_ITEM=skip" in text and f"read as the {fmt} format" in text


def test_skip_counts_and_skips_bad_conversations(tmp_path):
    rows = [{"messages": MSGS}, {"messages": MSGS[:1]}, {"messages": [{"role": "bot", "content": "x"}]},
            {"messages": MSGS}]
    path = write_json(tmp_path / "d.json", rows)
    report = DataReport()
    items = load_items(path, shuffle=False, on_bad_item="skip", report=report)
    assert len(items) == 2 and report.used == 2 and sum(report.skipped.values()) == 2
    assert any("roles are" in r for r in report.skipped) and any("ends with a 'user'" in r for r in report.skipped)


# --------------------------------------------------------------------------------------
# PROMPT_TEMPLATE


def test_prompt_template_renders_fields_verbatim(tok):
    item = {"question": " What is 2+2? ", "tags": ["a", "b"], "output": "4"}
    tpl = "Q: {question} [{tags}] {{literal}}\nA: "
    assert template_fields(tpl) == ["question", "tags"]
    assert render_template(tpl, item) == "Q: What is 2+2? [a, b] {literal}\nA: "
    ex = tokenize_items([item], tok, "output", 128, prompt_template=tpl)[0]
    assert ex.prompt == "Q: What is 2+2? [a, b] {literal}\nA: " and ex.target == "4"


@pytest.mark.parametrize("tpl,why", [
    ("{a.b}", "looks up an attribute or index"),
    ("{a[0]}", "looks up an attribute or index"),
    ("{a.__class__}", "looks up an attribute or index"),
    ("{a!r}", "conversion or format spec"),
    ("{a:>10}", "conversion or format spec"),
    ("{}", "is positional"),
    ("{0}", "is positional"),
    ("Q: {a", "expected '}'"),
    ("no fields", "names no field"),
])
def test_prompt_template_refuses_anything_but_plain_names(tpl, why):
    with pytest.raises(ValueError) as e:
        template_fields(tpl)
    assert why in str(e.value)


def test_prompt_template_missing_field_names_item_and_field(tmp_path):
    path = write_json(tmp_path / "d.json", [{"question": "q", "output": "a"}, {"query": "q", "output": "a"}])
    with pytest.raises(DataError) as e:
        load_items(path, shuffle=False, prompt_template="Q: {question}\nA: ")
    assert "item 1: PROMPT_TEMPLATE names field 'question', which the item lacks (fields: query, output)" \
        in str(e.value)


def test_prompt_template_only_for_fields(tmp_path):
    path = write_json(tmp_path / "d.json", [{"messages": MSGS}])
    with pytest.raises(DataError, match="PROMPT_TEMPLATE applies to the fields format.*read as messages"):
        load_items(path, prompt_template="Q: {question}")


def _problems(base_cfg, **keys):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{k}={json.dumps(v)}" for k, v in {**base_cfg, **keys}.items()])
    return e.value.problems


def test_config_keys_are_checked_before_any_data(base_cfg, tmp_path):
    [p] = _problems(base_cfg, PROMPT_TEMPLATE="Q: {q.__class__}")
    assert p.startswith("PROMPT_TEMPLATE 'Q: {q.__class__}': {q.__class__} looks up an attribute")
    [p] = _problems(base_cfg, PROMPT_TEMPLATE="Q: {input} -> {output}")
    assert "uses the output field {output} (SELECT_OUTPUT)" in p
    [p] = _problems(base_cfg, CHAT_TEMPLATE=str(tmp_path / "nope.jinja"))
    assert p.startswith("CHAT_TEMPLATE") and "no such file" in p
    [p] = _problems(base_cfg, DATA_FORMAT="sharegpt")
    assert "DATA_FORMAT" in p and "prompt_completion" in p
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in base_cfg.items()] +
                      ['PROMPT_TEMPLATE="Task {task}: {input}\\n"', "CHAT_TEMPLATE=none"])
    assert cfg.data.prompt_template == "Task {task}: {input}\n" and cfg.data.chat_template == "none"
