"""docs/config.md, generated from the config dataclasses (``python -m hybrid_ds.config --docs``)."""

from __future__ import annotations

import dataclasses
import json

from hybrid_ds.config.load import type_name
from hybrid_ds.config.schema import ALIASES, REWARD_KEY, field_types, key_table
def _fmt_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        d = f.default
    else:
        d = f.default_factory()
    if f.metadata.get("required"):
        return "required"
    return "`" + json.dumps(d) + "`"


def config_reference_markdown() -> str:
    """The generated reference of every key (docs/config.md)."""
    types = field_types()
    lines = ["# Configuration reference", "",
             "Generated from `hybrid_ds/config/` by `python -m hybrid_ds.config --docs`; do not edit by hand.",
             "", "One JSON object of these keys. Override any of them on the command line with `KEY=VALUE`",
             "(VALUE is parsed as JSON when it can be: `LR_SFT=1e-4`, `REWARD='{\"type\": \"bleu\"}'`).", ""]
    current = None
    for key, (sec, f) in key_table().items():
        if sec != current:
            current = sec
            lines += ["", f"## {sec or 'reward'}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        doc = f.metadata.get("doc") or "Reward spec (see docs/rewards.md)."
        if key == REWARD_KEY:
            doc = "Reward spec: a JSON object built by hybrid_ds.rewards (see docs/rewards.md)."
        extra = ""
        if f.metadata.get("choices"):
            extra = " One of: " + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + "."
        lines.append(f"| `{key}` | {type_name(types[key])} | {_fmt_default(f)} | {doc}{extra} |")
    lines += ["", "Aliases: " + ", ".join(f"`{a}` = `{b}`" for a, b in ALIASES.items()) + ".", ""]
    return "\n".join(lines)
