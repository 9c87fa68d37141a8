"""hybrid_ds: interleaved SFT + PPO for Hugging Face causal language models.

Importing the package is cheap on purpose: torch, transformers and deepspeed are imported
only by the modules that use them, so the CLI's ``--help`` and config validation are instant.
"""

__version__ = "0.1.0"
