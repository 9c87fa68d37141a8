"""REFS' frozen models read the policy's token ids (hybrid_ds/config/refs.py; docs/ppo.md, "Several
references").

A reference's log-probs are taken at the ids the policy sampled, so a reference whose tokenizer maps
ids to other tokens, or whose vocabulary is of another size, would score another text: its KL would be
a number without meaning. The preflight refuses such a model, naming its REFS entry, before any weight
is loaded.
"""

from __future__ import annotations

import os

from hybrid_ds.assets import resolve_model
from hybrid_ds.models.policy_value import (ModelFileError, first_line, load_model_config, load_tokenizer,
                                           max_positions)

# The files a saved tokenizer leaves; a model directory without any of them has only its vocabulary size to check.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def vocabulary_problems(models: list[tuple[str, str]], tokenizer, model_config, maxseq: int = 0) -> list[str]:
    """For each ``(key, name)`` of REFS' frozen models: its positions cover ``maxseq`` (MAXSEQ), its
    config's ``vocab_size`` equals MODEL's (``model_config``), and its own tokenizer, when it has one,
    maps tokens to the ids of the policy's ``tokenizer`` (TOKENIZER or MODEL's)."""
    problems, policy_vocab = [], None
    for key, name in models:
        try:
            config = load_model_config(name)
        except ModelFileError as e:
            problems.append(f"{key}: {e}.")
            continue
        n_pos = max_positions(config)
        if n_pos and maxseq > n_pos:
            problems.append(f"{key}: {name!r} covers {n_pos} positions, fewer than MAXSEQ ({maxseq}) sequences need; "
                            f"set MAXSEQ <= {n_pos} or use another reference.")
        size, policy_size = getattr(config, "vocab_size", None), getattr(model_config, "vocab_size", None)
        if size != policy_size:
            problems.append(f"{key}: {name!r} has a vocabulary of {size} tokens and MODEL of {policy_size}; a "
                            f"reference must read the policy's token ids (a model of the same tokenizer).")
            continue
        local = resolve_model(os.path.expanduser(name))
        if os.path.isdir(local) and not any(os.path.isfile(os.path.join(local, f)) for f in _TOKENIZER_FILES):
            continue  # no tokenizer saved with it: the vocabulary size is what can be compared
        try:
            own = load_tokenizer(name)
        except Exception as e:  # noqa: BLE001 - a user's tokenizer files: name them and give the loader's reason
            problems.append(f"{key}: the tokenizer of {name!r} cannot be loaded ({first_line(e)}).")
            continue
        policy_vocab = tokenizer.get_vocab() if policy_vocab is None else policy_vocab
        theirs = own.get_vocab()
        if theirs != policy_vocab:
            differ = sorted(set(theirs.items()) ^ set(policy_vocab.items()), key=lambda kv: kv[1])[:3]
            problems.append(f"{key}: the tokenizer of {name!r} maps tokens to other ids than the policy's "
                            f"(TOKENIZER or MODEL's), e.g. {differ}; a reference must read the policy's token ids.")
    return problems
