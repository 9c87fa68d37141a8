"""hybrid_ds: interleaved SFT + PPO for Hugging Face causal language models.

Importing the package is cheap on purpose: torch, transformers and deepspeed are imported
only by the modules that use them, so the CLI's ``--help`` and config validation are instant.

``hybrid_ds.train(config, overrides=None, *, reward_fns=None)`` runs training from Python
(:mod:`hybrid_ds.run.api`).
"""

import logging

__version__ = "0.1.0"

# bitsandbytes warns at import, on CPUs with AVX512-BF16, that its optional hub-fetched 4-bit CPU kernel
# (the `kernels` package) is absent; hybrid_ds never uses that kernel (QLoRA on CPU runs bitsandbytes' own
# fallback), and transformers imports bitsandbytes through peft whenever a scheduler is built, so every
# run would print it. Only that logger is quieted, and only below errors.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


# ``hybrid_ds.train`` is two things: this function and the submodule ``hybrid_ds/train.py`` behind
# ``python -m hybrid_ds.train`` and the ``hybrid-ds`` console script. Python sets a package's attribute to
# a submodule whenever the submodule is imported, which would replace this function with the module.
# So the submodule makes itself callable (its class is a ModuleType subclass with ``__call__``, the
# supported way since a module-level ``def __call__`` is ignored) and forwards to the same function:
# ``hybrid_ds.train(...)`` and ``from hybrid_ds import train`` work before and after that import.
def train(config, overrides=None, *, reward_fns=None):
    """Train in this process: ``config`` a dict of keys, a Config or a JSON file's path; ``overrides`` a
    dict or ``KEY=VALUE`` strings; ``reward_fns`` TRL-style reward functions. Returns a
    :class:`hybrid_ds.run.api.TrainResult` (output paths and last metrics); problems raise."""
    from hybrid_ds.run.api import train as _train

    return _train(config, overrides, reward_fns=reward_fns)
