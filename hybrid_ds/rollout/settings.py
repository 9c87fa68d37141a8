"""What the lean sampler samples with: transformers generate's sampling settings, checked once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

NEG_INF = float("-inf")


@dataclass(kw_only=True)
class SamplingSettings:
    """Sampling settings, with ``generate``'s meaning for each (0 / 1.0 disable a processor)."""

    max_new_tokens: int  # tokens to generate at most
    min_new_tokens: int = 0  # EOS is suppressed before this many tokens
    temperature: float = 1.0  # logits are divided by it (sampling and log-probs)
    top_k: int = 0  # keep the k most likely tokens; 0 disables
    top_p: float = 1.0  # nucleus mass; 1.0 disables
    repetition_penalty: float = 1.0  # CTRL penalty on every id of prompt + response; 1.0 disables
    no_repeat_ngram_size: int = 0  # forbid repeating an n-gram of the prompt + response; 0 disables
    eos_token_id: Union[int, Sequence[int]]  # id(s) that end a response
    pad_token_id: int  # emitted after EOS

    def __post_init__(self):
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.min_new_tokens < 0:
            problems.append(f"min_new_tokens={self.min_new_tokens} must be >= 0")
        if not self.temperature > 0:
            problems.append(f"temperature={self.temperature} must be > 0")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty={self.repetition_penalty} must be > 0")
        if self.no_repeat_ngram_size < 0:
            problems.append(f"no_repeat_ngram_size={self.no_repeat_ngram_size} must be >= 0")
        if problems:
            raise ValueError("bad SamplingSettings: " + "; ".join(problems))

    @property
    def eos_ids(self) -> list:
        return [int(e) for e in self.eos_token_id] if isinstance(self.eos_token_id, (list, tuple)) \
            else [int(self.eos_token_id)]

    @classmethod
    def from_gen_config(cls, gen, eos_token_id, pad_token_id) -> "SamplingSettings":
        """From hybrid_ds.config.GenConfig (``cfg.gen``) and the tokenizer's ids."""
        return cls(max_new_tokens=gen.max_new_tokens, min_new_tokens=gen.min_new_tokens,
                   temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                   repetition_penalty=gen.repetition_penalty, no_repeat_ngram_size=gen.no_repeat_ngram_size,
                   eos_token_id=eos_token_id, pad_token_id=pad_token_id)

    def generate_kwargs(self) -> dict:
        """The same settings as keyword arguments of ``model.generate`` (for comparisons)."""
        eos = self.eos_ids
        return dict(do_sample=True, max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens,
                    temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                    repetition_penalty=self.repetition_penalty, no_repeat_ngram_size=self.no_repeat_ngram_size,
                    eos_token_id=eos[0] if len(eos) == 1 else eos, pad_token_id=self.pad_token_id, use_cache=True)
