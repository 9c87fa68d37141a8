"""The policy/value model: one causal-LM trunk with its LM head and a scalar value head.

Both heads read the same trunk, so ZeRO shards them together and one optimizer serves both
phases (see ``build_param_groups``). The frozen reference model is a separate plain causal LM.
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

VALUE_HEAD_FILE = "value_head.pt"


class PolicyValue(nn.Module):
    """``lm``: a Hugging Face causal LM; ``v_head``: hidden state -> scalar value, initialised near zero
    (None with ``value_head=False``: the forward then returns no values)."""

    def __init__(self, lm: nn.Module, v_head: Optional[nn.Linear] = None, seed: int = 0, value_head: bool = True):
        super().__init__()
        self.lm = lm
        hidden = lm.config.hidden_size if hasattr(lm.config, "hidden_size") else lm.config.n_embd
        if not value_head:  # a critic-free estimator (ADVANTAGE): no value head, no memory for one
            v_head = None
        elif v_head is None:
            v_head = nn.Linear(hidden, 1)
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                v_head.weight.copy_(torch.randn(v_head.weight.shape, generator=g) * 1e-3)
                v_head.bias.zero_()
        self.v_head = v_head

    @property
    def config(self):
        return self.lm.config

    def forward(self, input_ids, attention_mask, position_ids=None, with_values: bool = False, keep_last: int = 0):
        """Logits ``(B, K, V)`` and, when ``with_values``, values ``(B, K)`` in float32, for the last
        ``K = keep_last`` positions (0: all ``L``). Positions no loss reads need no LM-head matmul in
        the forward or the backward (PPO reads the response, SFT the labelled tokens).
        """
        with final_hidden(self.lm, on=with_values and self.v_head is not None) as final:  # the LM head's input
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False, **logits_to_keep(self.lm, keep_last))
        logits = out.logits[:, -keep_last:] if keep_last else out.logits  # (a model without logits_to_keep)
        values = None
        if with_values and self.v_head is not None:
            h = final.hidden
            h = h[:, -keep_last:] if keep_last else h
            values = self.v_head(h.to(self.v_head.weight.dtype)).squeeze(-1).float()
        return logits, values


class FinalHidden:
    """What :func:`final_hidden` caught: ``hidden`` ``(B, K, C)``, the last input of the LM head."""

    hidden: Optional[torch.Tensor] = None


@contextmanager
def final_hidden(lm: nn.Module, on: bool = True) -> Iterator[FinalHidden]:
    """Catch the final hidden state of ``lm``'s forwards in this block: the input of its output
    embedding (``lm.get_output_embeddings()``, the LM head), through a forward pre-hook.

    That input is the trunk's output after its final norm, already sliced to the positions
    ``logits_to_keep`` asks for: the value of ``output_hidden_states=True``'s ``hidden_states[-1]``
    (tests/test_families.py checks it, family by family) without the all-layer tuple, whose L copies
    of ``(B, T, C)`` that flag keeps alive through the forward. The hook sits on the module, so it
    holds wherever the module is called: in a peft ``PeftModel`` (``get_output_embeddings`` is
    forwarded to the base model; a LoRA-wrapped head gets the same input) and under ZeRO-3, whose
    own hooks gather the head's weight but leave its input alone. ``on=False``: catch nothing.
    """
    caught = FinalHidden()
    if not on:
        yield caught
        return
    head = lm.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(lm).__name__} has no output embedding (LM head) to read the final hidden state from")

    def hook(_module, args, kwargs):
        caught.hidden = args[0] if args else next(iter(kwargs.values()))

    handle = head.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield caught
    finally:
        handle.remove()
    if caught.hidden is None:  # a forward that computes its logits without calling the module
        raise RuntimeError(f"{type(lm).__name__}'s forward never called its output embedding "
                           f"({type(head).__name__}): no final hidden state for the value head")


def supports_logits_to_keep(lm: nn.Module) -> bool:
    """Whether the causal LM's forward (under a DeepSpeed engine's wrapper, if any) takes ``logits_to_keep``."""
    return "logits_to_keep" in inspect.signature(getattr(lm, "module", lm).forward).parameters


def logits_to_keep(lm: nn.Module, keep_last: int) -> dict:
    """``{"logits_to_keep": keep_last}`` where the causal LM's forward takes it (transformers' models
    do), else ``{}``: the caller slices full logits, which gives the same values."""
    return {"logits_to_keep": keep_last} if keep_last and supports_logits_to_keep(lm) else {}


def causal_lm_logits(lm: nn.Module, input_ids, attention_mask, position_ids=None, keep_last: int = 0):
    """A plain causal LM's (the reference's) logits ``(B, K, V)`` for the last ``keep_last`` positions."""
    logits = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                **logits_to_keep(lm, keep_last)).logits
    return logits[:, -keep_last:] if keep_last else logits


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    from hybrid_ds.assets import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(name))
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {name!r} has no EOS token; hybrid_ds needs one to end responses.")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # A pad distinct from EOS keeps EOS inside the loss masks (docs/ppo.md §2).
        tok.add_special_tokens({"pad_token": "<|pad|>"})
    return tok


class ModelFileError(Exception):
    """A model or tokenizer that cannot be loaded as given (missing, truncated or unreadable files)."""


def max_positions(model_config) -> Optional[int]:
    """The longest sequence the model's position embeddings cover (n_positions / max_position_embeddings)."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
        v = getattr(model_config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def load_model_config(name: str):
    """The transformers config of MODEL (a builtin is materialised first); ModelFileError if unreadable."""
    from transformers import AutoConfig

    from hybrid_ds.assets import resolve_model

    try:
        return AutoConfig.from_pretrained(resolve_model(name))
    except Exception as e:  # noqa: BLE001 - a user's directory: name it and give the loader's reason
        raise ModelFileError(f"{name!r}: its config.json cannot be loaded ({first_line(e)})") from None


def first_line(e: Exception) -> str:
    """A loader's reason in one line: the exception's first line, or its type when it says nothing."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_dtype(torch_dtype: str, mixed_precision: str, deepspeed: bool) -> torch.dtype:
    """The dtype the weights load in for TORCH_DTYPE under a launch's precision ("no"/"bf16"/"fp16").

    ``auto`` loads in the mixed-precision dtype where DeepSpeed trains in it anyway (DeepSpeed's
    fp32 master copies are made from the half-precision weights either way, so loading in half
    changes no number and halves the load's memory), float32 otherwise: without DeepSpeed, BF16/FP16
    mean autocast over float32 weights."""
    if torch_dtype != "auto":
        return DTYPES[torch_dtype]
    if deepspeed and mixed_precision in ("bf16", "fp16"):
        return torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.float32


def dtype_problem(torch_dtype: str, mixed_precision: str, deepspeed: bool, frozen_base: bool = False) -> Optional[str]:
    """Why TORCH_DTYPE cannot train under this launch, or None.

    Under DeepSpeed, half-precision weights need the matching BF16/FP16 mode (DeepSpeed then keeps
    fp32 master weights and steps those). Without DeepSpeed, float16 weights that train cannot:
    the gradient scaler refuses float16 gradients, and an optimizer stepping float16 weights loses
    small updates; bfloat16 weights train as they are (pure bf16, no fp32 master copy), as in
    TRL/Transformers' Trainer. ``frozen_base``: only adapters train (LoRA), the base may be any dtype."""
    half = {"bfloat16": "bf16", "float16": "fp16"}.get(torch_dtype)
    if half is None:
        return None
    if deepspeed and mixed_precision != half:
        flag = half.upper()
        return (f"TORCH_DTYPE={torch_dtype} under DeepSpeed needs {flag}=true (DeepSpeed keeps fp32 master weights in "
                f"that mode; got precision {mixed_precision!r}); set {flag}=true or TORCH_DTYPE=auto.")
    if not deepspeed and half == "fp16" and not frozen_base:
        return ("TORCH_DTYPE=float16 without DeepSpeed cannot train the weights (float16 updates underflow); use "
                "TORCH_DTYPE=auto with FP16=true (autocast over float32 weights), bfloat16, or DeepSpeed.")
    return None


# what an attention implementation needs of the model class
_ATTN_SUPPORT = {"sdpa": "_supports_sdpa", "flex_attention": "_supports_flex_attn"}


def attention_problem(model_config, impl: str) -> Optional[str]:
    """Why ATTN_IMPLEMENTATION ``impl`` cannot serve the model of ``model_config``, or None.

    Checked on the model class and the installed kernels, without building the model: the names
    transformers registers (plus ``eager``, and ``org/repo`` kernels from the hub), whether the
    class declares support, and whether flash-attn is installed for the ``flash_attention_*`` ones."""
    if not impl:
        return None
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["eager", *(k for k in ALL_ATTENTION_FUNCTIONS.keys() if "|" not in k)]
    if impl not in known and "/" not in impl:
        return f"ATTN_IMPLEMENTATION: {impl!r} is not an attention implementation; choose from {', '.join(known)}."
    cls = AutoModelForCausalLM._model_mapping.get(type(model_config), None)
    name = cls.__name__ if cls is not None else type(model_config).__name__
    attr = "_supports_flash_attn" if impl.startswith("flash_attention") else _ATTN_SUPPORT.get(impl)
    if cls is not None and attr and not getattr(cls, attr, False):
        return f"ATTN_IMPLEMENTATION: {name} does not support {impl!r}; use sdpa or eager."
    if impl.startswith("flash_attention"):
        import importlib.util

        pkg = {"flash_attention_3": "flash_attn_interface", "flash_attention_4": "flash_attn.cute"}.get(impl, "flash_attn")
        if importlib.util.find_spec(pkg.split(".")[0]) is None or not torch.cuda.is_available():
            return (f"ATTN_IMPLEMENTATION: {impl!r} needs a CUDA GPU and the {pkg.split('.')[0]!r} package "
                    f"(pip install flash-attn); use sdpa here.")
    return None


def load_lm(name: str, tokenizer, dtype: torch.dtype = torch.float32, attn_implementation: str = "",
            **from_pretrained):
    """A causal LM from a local dir, a hub name, or a builtin, its weights in ``dtype`` and its attention
    ``attn_implementation`` (empty: transformers' default); embeddings resized to the tokenizer.
    ``from_pretrained``: more arguments of transformers' loader (models/lora.py: a quantisation config)."""
    from transformers import AutoModelForCausalLM

    from hybrid_ds.assets import resolve_model

    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with hf_progress_bars_off():  # one "Loading weights" bar per rank and model said nothing the run's lines don't
        lm = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=dtype, **attn, **from_pretrained)
    bad = nonfinite_weights(lm)
    if bad:  # a damaged file or a diverged save: training would only stop later at MAX_NAN_STEPS
        raise ModelFileError(f"MODEL {name!r}: its weights hold NaN or infinite values ({', '.join(bad[:3])}"
                             f"{', ...' if len(bad) > 3 else ''}); the files are damaged or were saved from a "
                             f"run that diverged: load another copy or an earlier checkpoint.")
    if lm.get_input_embeddings().weight.shape[0] < len(tokenizer):
        lm.resize_token_embeddings(len(tokenizer))
    lm.config.pad_token_id = tokenizer.pad_token_id
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(lm)
    fuse_activations(lm)
    return lm


def nonfinite_weights(module: nn.Module) -> list[str]:
    """Names of ``module``'s floating-point parameters and buffers that hold a NaN or an infinity.
    Every rank that holds whole weights reaches the same verdict; a ZeRO-3 partition (``ds_id``: this
    rank's shard only) and quantised storage (integer dtypes) are not read."""
    bad = []
    for n, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_floating_point() and not hasattr(t, "ds_id") and t.numel() and not bool(torch.isfinite(t).all()):
            bad.append(n)
    return bad


def fuse_activations(module: nn.Module) -> int:
    """Swap GPT-2's ``gelu_new`` (NewGELUActivation: eight tensor ops in Python) for torch's fused
    kernel of the same formula, ``F.gelu(approximate="tanh")`` (transformers' ``gelu_pytorch_tanh``).

    The two agree to float32 rounding (2.4e-7 at most over N(0, 16) inputs); the fused one saves a
    seventh of a GPT-2 training step on CPU (bench notes in README) and a few ops per decoded
    token. Only the in-memory modules change: the config, hence every saved model, still says
    ``gelu_new``. Returns how many activations were swapped.
    """
    from transformers.activations import ACT2FN, NewGELUActivation

    swapped = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, ACT2FN["gelu_pytorch_tanh"])
                swapped += 1
    return swapped


def disable_dropout(module: nn.Module) -> None:
    """Dropout off everywhere (docs/ppo.md §5): log-probs must be deterministic for PPO ratios."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    for attr in ("attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout_prob", "attention_dropout",
                 "dropout"):
        if hasattr(getattr(module, "config", None), attr):
            setattr(module.config, attr, 0.0)


def build_param_groups(model: PolicyValue, weight_decay: float) -> list[dict]:
    """Optimizer groups tagged by role: policy (trunk + LM head), value (value head) and heads (the
    task heads, models/heads.py), each split into decayed weights and undecayed biases/norm weights.

    One optimizer serves both phases: before each step the trainer sets every group's lr from its
    phase's schedule. In an SFT step the value groups get lr 0, so AdamW leaves the value head
    bit-identical (its decay and update both scale with lr) even under ZeRO, where its zero
    gradients still pass through the optimizer; PPO steps give the task heads lr 0 the same way.
    """
    groups = {}
    norm_types = (nn.LayerNorm,)
    no_decay_ids = set()
    for mod in model.modules():
        if isinstance(mod, norm_types) or "norm" in type(mod).__name__.lower():
            no_decay_ids.update(id(p) for p in mod.parameters(recurse=False))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        role = "value" if name.startswith("v_head.") else "heads" if name.startswith("task_heads.") else "policy"
        ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitions replace p's data
        decay = not (ndim < 2 or id(p) in no_decay_ids or name.endswith(".bias"))
        key = (role, decay)
        groups.setdefault(key, {"params": [], "role": role, "weight_decay": weight_decay if decay else 0.0,
                                "names": []})
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    out = []
    for g in groups.values():
        g.pop("names")
        out.append(g)
    return out


@contextmanager
def hf_progress_bars_off() -> Iterator[None]:
    """transformers' progress bars off for the duration: a run loads on every rank and saves mid-training,
    and their bars would cut into the run's own (loads and saves are announced by [hybrid_ds] lines)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def save_policy_value(lm_state: dict, model: PolicyValue, tokenizer, out_dir: str, *, with_value_head: bool):
    """Write ``lm_state`` (keys of the PolicyValue, 'lm.' and 'v_head.' prefixes) as plain HF weights.

    ``inference_lm`` gets the causal LM + tokenizer only; ``ppo_full`` adds ``value_head.pt``.
    """
    os.makedirs(out_dir, exist_ok=True)
    lm_sd = {k[len("lm."):]: v for k, v in lm_state.items() if k.startswith("lm.")}
    with hf_progress_bars_off():
        model.lm.save_pretrained(out_dir, state_dict=lm_sd, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if with_value_head and model.v_head is not None:
        vh = {k[len("v_head."):]: v.clone() for k, v in lm_state.items() if k.startswith("v_head.")}
        torch.save(vh, os.path.join(out_dir, VALUE_HEAD_FILE))


def value_head_problem(path: str, model_config) -> Optional[str]:
    """Why a ``ppo_full`` dir's ``value_head.pt`` cannot serve as this model's value head, or None
    (also None when ``path`` has none: the head then starts fresh)."""
    f = os.path.join(path, VALUE_HEAD_FILE)
    if not os.path.isfile(f):
        return None
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
        shape = tuple(state["weight"].shape)
    except Exception as e:  # noqa: BLE001 - a user's file: name it and give the loader's reason
        return f"MODEL: {f} cannot be read as a value head ({first_line(e)}); remove it to start a fresh value head."
    if shape != (1, model_config.hidden_size) or tuple(state.get("bias", torch.zeros(1)).shape) != (1,):
        return (f"MODEL: {f} holds a value head of shape {shape}, the model's hidden size is "
                f"{model_config.hidden_size}; remove it to start a fresh value head.")
    return None


def load_value_head(model: PolicyValue, path: str) -> Optional[str]:
    """Load ``value_head.pt`` from a ``ppo_full`` dir, if ``path`` is one (to continue RL); returns the
    file loaded, or None. A head of another shape is a ModelFileError naming the file."""
    f = os.path.join(path, VALUE_HEAD_FILE)
    if not os.path.isfile(f) or model.v_head is None:  # a critic-free run has no head to load
        return None
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
        model.v_head.load_state_dict({k: v.to(model.v_head.weight.dtype) for k, v in state.items()})
    except Exception as e:  # noqa: BLE001 - a user's file: name it and give the loader's reason
        raise ModelFileError(f"{f}: not a value head of this model ({first_line(e)}); remove it to start a fresh "
                             f"value head") from None
    return f
