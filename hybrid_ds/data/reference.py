"""``docs/data.md``: every data format with an example item and what the model sees, produced by the
code's own rendering (``python -m hybrid_ds.data --docs``), so the page cannot drift from it.

The chat-template examples use the builtin tokenizer with a small ChatML-like template
(:func:`chatml_tokenizer`), which the tests use too.
"""

from __future__ import annotations

import json

from hybrid_ds.assets import TOKENIZER_DIR
from hybrid_ds.data.batches import tokenize_items
from hybrid_ds.data.chat import PLAIN_HEADER, stop_token_ids
from hybrid_ds.data.formats import detect_format
from hybrid_ds.data.items import DATASETS_BUILDERS

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]

_CHAT = [{"role": "system", "content": "Answer briefly."},
         {"role": "user", "content": "Reverse: a b c"},
         {"role": "assistant", "content": "c b a"},
         {"role": "user", "content": "Now: x y"},
         {"role": "assistant", "content": "y x"}]

# (heading, config keys, item, explanation)
EXAMPLES = [
    ("fields (the seed template)", {}, {"task": "reverse", "input": "a b c", "output": "c b a"},
     "SELECT_OUTPUT (`output`) is the target; every other field is one `key: value` line of the seed's "
     "`### Prompt:` template. The target and EOS are labelled."),
    ("fields with PROMPT_TEMPLATE", {"PROMPT_TEMPLATE": "Q: {question}\nA: "},
     {"question": "What is 2+2?", "output": "4"},
     "PROMPT_TEMPLATE fills plain `{field}` names from the item (lists joined by commas); attribute or "
     "index lookups, conversions and format specs are refused, a field the item lacks names the item."),
    ("text", {"SELECT_OUTPUT": "text"}, {"text": "The tower stands."},
     "A text corpus (items holding only SELECT_OUTPUT): the seed template over the text, the text as the "
     "target. Blank lines are filtered and counted."),
    ("prompt_completion (text)", {}, {"prompt": "The capital of France is", "completion": " Paris."},
     "TRL's standard prompt-completion: prompt and completion exactly as written (no chat template), the "
     "completion and EOS labelled."),
    ("prompt_completion (messages)", {},
     {"prompt": [{"role": "user", "content": "Capital of France?"}],
      "completion": [{"role": "assistant", "content": "Paris."}]},
     "TRL's conversational prompt-completion: rendered as one conversation; only the completion's "
     "assistant turns are labelled (an assistant turn inside the prompt is context)."),
    ("messages", {}, {"messages": _CHAT},
     "TRL's conversational format: one conversation is one SFT example whose labels cover every "
     "assistant turn; system, user and tool turns and the template's scaffolding are not labelled. PPO "
     "generates from the history before the last assistant turn; the reward compares with that turn. With "
     "ENV (multi-turn rollouts, docs/ppo.md §21) PPO starts the dialogue before the first assistant turn "
     "and the environment plays the later user and tool turns."),
]


def builtin_tokenizer():
    """The builtin tokenizer (hybrid_ds/assets/tiny-gpt2), which has EOS and its own pad token."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def chatml_tokenizer():
    """The builtin tokenizer with ``<|im_start|>``/``<|im_end|>`` added as special tokens and
    :data:`CHATML_TEMPLATE` as its chat template."""
    tok = builtin_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": CHATML_TOKENS})
    tok.chat_template = CHATML_TEMPLATE
    return tok


def marked(tokenizer, ids: list, labels: list) -> str:
    """The sequence as text, each labelled run of tokens inside ``⟦ ⟧``."""
    out, run, flag = [], [], None
    for t, lab in zip(ids, labels):
        f = lab != -100
        if f != flag and run:
            out.append(("⟦{}⟧" if flag else "{}").format(tokenizer.decode(run)))
            run = []
        run.append(t)
        flag = f
    if run:
        out.append(("⟦{}⟧" if flag else "{}").format(tokenizer.decode(run)))
    return "".join(out)


def _block(text: str) -> str:
    return "````text\n" + text + "\n````\n"  # four backticks: the seed template holds three


def _rendering(item: dict, keys: dict, tokenizer, title: str) -> str:
    out_field = keys.get("SELECT_OUTPUT", "output")
    fmt = detect_format([item], out_field)
    ex = tokenize_items([item], tokenizer, out_field, 1024, data_format=fmt,
                        prompt_template=keys.get("PROMPT_TEMPLATE", ""))[0]
    ids, labels = ex.sft_sequence()
    return (f"{title}\n\nPrompt (what PPO generates from):\n\n{_block(ex.prompt)}\n"
            f"SFT sequence, labelled tokens in ⟦ ⟧:\n\n{_block(marked(tokenizer, ids, labels))}\n"
            f"Target (what the reward compares with): `{json.dumps(ex.target)}`\n")


def _sources_and_eval() -> list[str]:
    """Where items come from (files, dataset directories, hub ids) and the held-out set (EVAL_FILE)."""
    hub = {"TRAIN_FILE": "org/name", "DATASET_CONFIG": "en", "SPLIT": "train", "EVAL_FILE": "org/name",
           "EVAL_SPLIT": "test", "EVAL_EVERY": 10}
    return [
        "## Where items come from\n",
        "`TRAIN_FILE` (and `EVAL_FILE`, read the same way) is one of:\n",
        "- a `.json` file (a list of items, or an object with a `data`, `train` or `items` list) or a `.jsonl` "
        f"file, read directly;\n- a {', '.join('`.' + e + '`' for e in DATASETS_BUILDERS)} file, read with "
        "`datasets.load_dataset`;\n- a directory saved with `Dataset.save_to_disk` or `DatasetDict.save_to_disk` "
        "(`SPLIT` picks a split of a `DatasetDict`), read with `datasets.load_from_disk`;\n- a directory of data "
        "files laid out as on the hub (splits by file name, or configurations and splits declared in its "
        "`README.md`; one file type per directory), read with `datasets.load_dataset(path, DATASET_CONFIG)` and "
        "its split `SPLIT`;\n- a Hugging Face hub dataset id (`org/name` or `name`: no local path of that name), "
        "read with `datasets.load_dataset(id, DATASET_CONFIG, split=SPLIT)`, which downloads only that split;\n"
        "- `builtin:demo-tasks`, the shipped demo data.\n",
        "Every format above applies to every source: a dataset's rows are items, detected per file "
        "(`DATA_FORMAT=auto`) or named. `DATASET_CONFIG` (the dataset's configuration or subset, datasets' "
        "`name`) applies to a dataset directory or hub id, and is refused when neither file is one. "
        "Offline (`HF_HUB_OFFLINE=1` or `HF_DATASETS_OFFLINE=1`) a hub id that is not in the local cache is "
        "refused when the config is validated (`--dry-run` too, exit 2): save the dataset where the hub is "
        "reachable (`datasets.load_dataset(id).save_to_disk(DIR)`) and point `TRAIN_FILE` at `DIR`.\n",
        "Config:\n\n```json\n" + json.dumps(hub, indent=1) + "\n```\n",
        "## Evaluation (EVAL_FILE)\n",
        "With `EVAL_FILE`, the policy is evaluated on held-out items every `EVAL_EVERY` steps (the unit of "
        "`MAX_STEPS` and `SAVE_EVERY`: hybrid cycles, SFT steps in `MODE=sft`, PPO updates in `MODE=ppo`) and "
        "when the run completes (`EVAL_EVERY=0`: only then). `EVAL_SPLIT` is its split (empty: `SPLIT`), "
        "`EVAL_NUM_SAMPLES` keeps its first items (file order, never shuffled); the formats, `SELECT_OUTPUT`, "
        "`PROMPT_TEMPLATE`, `CHAT_TEMPLATE`, `MAXSEQ` and `ON_BAD_ITEM` apply as to `TRAIN_FILE`. A warning "
        "says when `EVAL_FILE` is `TRAIN_FILE` with the same split.\n",
        "Each evaluation writes one `metrics.jsonl` row (and TensorBoard scalars) of phase `eval` at that step "
        "(hybrid_ds/algorithms/evaluate.py):\n",
        "- `eval/loss`: the SFT loss on the held-out items, response (labelled) tokens only, no gradient: the "
        "cross-entropy summed over all items' labelled tokens divided by their count (`eval/tokens`, "
        "`eval/items`), the same number on any number of processes;\n- `eval/reward_mean`, `eval/reward_std`: "
        "the run's `REWARD` on greedy responses to the held-out prompts (deterministic; `MAX_NEW_TOKENS`, "
        "`MIN_NEW_TOKENS`, `NO_REPEAT_NGRAM_SIZE` and `REPETITION_PENALTY` apply), with `eval/response_len`, "
        "`eval/eos_frac` and `eval/reward_faults`. Not in `MODE=sft`, which builds no reward. A reward with "
        "state (`ema_normalize`) is restored after scoring, so evaluation changes no training score.\n",
        "Every process evaluates its share of the items and the sums are added up across processes; nothing "
        "is trained and no random state is drawn, so a run with evaluation trains exactly as one without.\n",
    ]


def data_reference_markdown() -> str:
    """docs/data.md: the formats, then each example item with its prompt, labels and target."""
    plain, chat = builtin_tokenizer(), chatml_tokenizer()
    parts = ["# Data formats\n",
             "<!-- generated by `python -m hybrid_ds.data --docs` from hybrid_ds/data/reference.py; do not "
             "edit by hand -->\n",
             "`TRAIN_FILE` holds items of one format, detected per file (`DATA_FORMAT=auto`) or named with "
             "`DATA_FORMAT` (`fields`, `text`, `prompt_completion`, `messages`). Auto-detection reads an item "
             "with the output field (`SELECT_OUTPUT`) as `fields`, a file whose items hold only it as `text`, "
             "an object with `messages` as `messages` and one with `prompt` and `completion` as "
             "`prompt_completion`. A bad item stops the run naming the file, the item's index and the field "
             "(or, with `ON_BAD_ITEM=skip`, is counted and skipped).\n",
             "Conversations (`messages`, and `prompt_completion` with message lists) are rendered with the "
             "tokenizer's chat template when it has one (or the Jinja file `CHAT_TEMPLATE` names; "
             "`CHAT_TEMPLATE=none` forces the plain rendering). Roles are `system`, `user`, `assistant` and "
             "`tool`; the last turn must be the assistant's. Without a template each turn is "
             f"`{PLAIN_HEADER.strip().replace('{role}', '<Role>')}` (`### User:`, `### Assistant:` ...) on its "
             "own line, then the content and a blank line; an assistant turn's content is followed by EOS, and content plus EOS are "
             "labelled.\n",
             "With a template, the assistant turn's content and the template's end-of-turn token (here "
             "`<|im_end|>`) are labelled; role headers and the newline after the end of turn are not. "
             "Generation stops at EOS or at that end-of-turn token, so a trained model ends its response where "
             "the template ends a turn: with the example template the stop ids are "
             f"{[chat.convert_ids_to_tokens(i) for i in stop_token_ids(chat)]} and without one "
             f"{[plain.convert_ids_to_tokens(i) for i in stop_token_ids(plain)]}.\n",
             "The examples below are rendered by the code itself with the builtin tokenizer; the chat-template "
             "ones add `<|im_start|>`/`<|im_end|>` as special tokens and this ChatML-like template:\n",
             "```jinja\n" + CHATML_TEMPLATE + "\n```\n"]
    for heading, keys, item, why in EXAMPLES:
        conversational = detect_format([item], keys.get("SELECT_OUTPUT", "output")) == "messages" or \
            isinstance(item.get("prompt"), list)
        parts.append(f"## {heading}\n")
        parts.append(why + "\n")
        if keys:
            parts.append("Config: " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in keys.items()) + "\n")
        parts.append("Item:\n\n```json\n" + json.dumps(item, indent=1) + "\n```\n")
        if conversational:
            parts.append(_rendering(item, keys, chat, "**With the chat template**"))
            parts.append(_rendering(item, keys, plain, "**Without a chat template** (plain rendering)"))
        else:
            parts.append(_rendering(item, keys, plain, "**Rendered**"))
    return "\n".join(parts + _sources_and_eval())
