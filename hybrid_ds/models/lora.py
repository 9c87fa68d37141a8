"""LoRA and QLoRA through peft: low-rank adapters on a frozen (optionally quantised) base.

With ``LORA_R > 0`` the policy's causal LM gets peft's LoRA layers in place (``add_adapters``):
the base weights are frozen, the adapters and the value head train (Hu et al. 2021, "LoRA";
Dettmers et al. 2023, "QLoRA" for the 4-bit NF4 base). The frozen reference needs no model of
its own: it is the same model with its adapters disabled (``adapters_disabled``), which computes
exactly the base model. The outputs keep their meaning: ``inference_lm/`` and ``ppo_full/`` hold the
adapters merged into the full-precision base (``merged_lm``), ``adapter/`` the peft adapter itself
(``PeftModel.from_pretrained(base, adapter/)``).

The base is always loaded by ``load_base``, with torch's generator fixed to the run's seed: when
the tokenizer gained a pad token, ``resize_token_embeddings`` draws the new rows at random, and the
frozen rows are in no checkpoint, so a resumed run and an offline export must draw the same ones.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from hybrid_ds.models.policy_value import load_lm

ADAPTER_DIR = "adapter"


def peft_config(lora_cfg):
    """peft's ``LoraConfig`` for the config's ``lora`` section (LORA_R, LORA_ALPHA, ...)."""
    from peft import LoraConfig

    return LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                      target_modules=lora_cfg.target_modules, bias="none", task_type="CAUSAL_LM")


def quantization_config(lora_cfg, compute_dtype: torch.dtype = torch.float32):
    """bitsandbytes' settings for LOAD_IN_4BIT (NF4, double quantisation, as QLoRA) or LOAD_IN_8BIT;
    None when the base is not quantised."""
    if not (lora_cfg.load_in_4bit or lora_cfg.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if lora_cfg.load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_base(model: str, tokenizer, seed: int, lora_cfg=None, device=None, **load_kwargs) -> nn.Module:
    """MODEL loaded as :func:`load_lm` loads it, quantised when ``lora_cfg`` says so (onto ``device``,
    where bitsandbytes quantises), with torch's generator seeded by ``seed`` (module docstring)."""
    quant = quantization_config(lora_cfg, load_kwargs.get("dtype", torch.float32)) if lora_cfg else None
    if quant is not None:
        load_kwargs.update(quantization_config=quant, device_map={"": device or torch.device("cpu")})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return load_lm(model, tokenizer, **load_kwargs)


def add_adapters(lm: nn.Module, lora_cfg) -> nn.Module:
    """``lm`` with peft's LoRA layers injected in place; only the adapters require grad.

    Returns the same causal LM (``PeftModel.get_base_model``), so its forward, ``logits_to_keep`` and
    hidden states are the ones every other part of hybrid_ds reads."""
    from peft import get_peft_model

    return get_peft_model(lm, peft_config(lora_cfg)).get_base_model()


def adapter_layers(module: nn.Module) -> list:
    """The peft adapter layers inside ``module`` (empty for a model without adapters)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` computing its base model: every adapter layer off (peft's ``enable_adapters``).

    peft also clears the adapters' ``requires_grad`` while they are off; the flags are put back as
    they were, so the optimizer's view of the model never changes. No weight is touched, which is
    why this works on ZeRO-3 partitions too."""
    layers = adapter_layers(module)
    if not layers:
        raise ValueError("the model has no adapters to disable (LORA_R is 0)")
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield module
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


def linear_module_names(lm: nn.Module) -> list[str]:
    """The distinct names (last component) of ``lm``'s linear layers, the ones LORA_TARGET_MODULES can name."""
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, m in lm.named_modules() if isinstance(m, (nn.Linear, Conv1D))})


def target_problems(lora_cfg, model_config, model_name: str) -> list[str]:
    """LORA_TARGET_MODULES checked against MODEL's modules (on a weightless skeleton built from its config):
    every name given must match a module, and peft must be able to adapt what matches."""
    from peft import inject_adapter_in_model
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    with torch.device("meta"):  # the class itself: from_config would partition it when ZeRO-3 is set up
        skeleton = MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)](model_config)
    names = linear_module_names(skeleton)
    listing = f"its linear modules are {', '.join(names)}; or use \"all-linear\""
    targets = lora_cfg.target_modules
    if isinstance(targets, list):  # peft's rule for a list: the module's name, or its last components
        modules = [n for n, _ in skeleton.named_modules()]
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in modules)]
        if unmatched:
            return [f"LORA_TARGET_MODULES: {', '.join(map(repr, unmatched))} match(es) no module of MODEL "
                    f"{model_name!r}; {listing}."]
    try:
        inject_adapter_in_model(peft_config(lora_cfg), skeleton)
    except (ValueError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return [f"LORA_TARGET_MODULES: {targets!r} cannot be adapted in MODEL {model_name!r} ({reason}); {listing}."]
    return []


def merged_lm(model: str, tokenizer, seed: int, lora_cfg, adapter_state: dict):
    """The full-precision base with the trained adapters: a peft ``PeftModel`` on CPU.

    ``adapter_state``: the causal LM's trained parameters under the names they have in the run
    (``model.layers.0.self_attn.q_proj.lora_A.default.weight`` ...). ``save_pretrained`` of the
    result writes ``adapter/``; its ``merge_and_unload()`` is the plain causal LM of ``inference_lm/``.
    A QLoRA adapter is merged into the unquantised base, as QLoRA's own release does."""
    from peft import get_peft_model

    with _whole_weights():
        base = load_base(model, tokenizer, seed)
    peft_model = get_peft_model(base, peft_config(lora_cfg))
    lm = peft_model.get_base_model()
    wanted = {n for n, p in lm.named_parameters() if p.requires_grad}
    missing = sorted(wanted - set(adapter_state))
    unknown = sorted(set(adapter_state) - set(lm.state_dict()))
    if missing or unknown:
        raise ValueError(f"the adapter state does not fit LORA_TARGET_MODULES={lora_cfg.target_modules!r} on "
                         f"{model!r}: missing {missing[:3]}, unknown {unknown[:3]}")
    with torch.no_grad():
        params = dict(lm.named_parameters())
        for name, value in adapter_state.items():
            params[name].copy_(value.to(params[name].dtype))
    return peft_model


@contextlib.contextmanager
def _whole_weights() -> Iterator[None]:
    """Loading inside a ZeRO-3 run without partitioning: transformers partitions every model it loads
    while Accelerate's DeepSpeed config is registered with it (``is_deepspeed_zero3_enabled``), but the
    merge happens on one process and needs whole weights. The registration is lifted meanwhile."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def save_merged(peft_model, tokenizer, adapter_dir: str) -> nn.Module:
    """Write ``adapter_dir`` (the peft adapter and the tokenizer) and return the merged causal LM
    (``merge_and_unload``: each adapted weight becomes W + (alpha / r) B A)."""
    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    return peft_model.merge_and_unload()
