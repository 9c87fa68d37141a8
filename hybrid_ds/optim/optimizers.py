"""Optimizers: the table of every OPTIMIZER name, its validation, and the factory.

One optimizer serves both training phases. The trainer builds the parameter groups
(``{"params": [...], "role": "policy" | "value", "weight_decay": float}``), calls
:func:`build_optimizer` once, and before every optimizer step writes the learning rate of the
phase being run into every group (:meth:`PhaseSchedule.apply`). SFT and PPO have separate
schedules (LR_SFT and LR_PPO differ), so a schedule is never bound to the real optimizer:
each :class:`PhaseSchedule` drives a private one-parameter "shadow" ``torch.optim.SGD`` with a
stock PyTorch or transformers scheduler attached, and reads the learning rate back from it.
That makes every PyTorch scheduler reachable, including the momentum-cycling ones.

Both factories are driven by the tables :data:`OPTIMIZERS` and :data:`SCHEDULERS`, which also
generate ``docs/optim.md`` (``python -m hybrid_ds.optim --docs > docs/optim.md``) and feed
:func:`validate_optim_config`, the check run at config-validation time. That check never
imports torch: this module imports torch, bitsandbytes, transformers and deepspeed only inside
the functions that build things.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any, Optional

from hybrid_ds.optim.hparams import unknown_name
from hybrid_ds.optim.schedulers import canonical_scheduler, scheduler_problems

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# optimizer table

# Hyper-parameter families: which config keys reach the constructor, and as which argument.
_FAMILY_KEYS: dict[str, tuple[str, ...]] = {
    "adam": ("BETA1", "BETA2", "EPS", "WEIGHT_DECAY"),
    "ademamix": ("BETA1", "BETA2", "EPS", "WEIGHT_DECAY"),
    "lion": ("BETA1", "BETA2", "WEIGHT_DECAY"),
    "adagrad": ("EPS", "WEIGHT_DECAY", "INITIAL_ACCUMULATOR_VALUE", "LR_DECAY"),
    "rmsprop": ("ALPHA", "EPS", "WEIGHT_DECAY", "MOMENTUM", "CENTERED"),
    "sgd": ("MOMENTUM", "DAMPENING", "WEIGHT_DECAY", "NESTEROV"),
    "sgd_bnb": ("MOMENTUM", "WEIGHT_DECAY"),
    "adafactor": ("WEIGHT_DECAY",),
}

# Families whose optimizer has a first-moment coefficient a momentum-cycling schedule can drive.
_MOMENTUM_FAMILIES = ("adam", "ademamix", "lion", "rmsprop", "sgd", "sgd_bnb")

# DeepSpeed's own CPU optimizers, used when the DeepSpeed config offloads optimizer state.
OFFLOAD_CLASSES = {
    "adam": "deepspeed.ops.adam:DeepSpeedCPUAdam",
    "lion": "deepspeed.ops.lion:DeepSpeedCPULion",
    "adagrad": "deepspeed.ops.adagrad:DeepSpeedCPUAdagrad",
}

# Client optimizers DeepSpeed ZeRO accepts without "zero_allow_untested_optimizer": true
# (deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS, compared by exact type).
_ZERO_TESTED = {"torch.optim:AdamW", "torch.optim:Adagrad", *OFFLOAD_CLASSES.values()}

_BNB_MIN_CPU = (0, 50)  # bitsandbytes release measured to step every optimizer here on CPU (0.50.2)

_CPU_STEPS = "steps"
_CPU_PAGED = "steps; paging falls back to ordinary CPU tensors (bitsandbytes warns once)"


@dataclass(frozen=True)
class OptimSpec:
    """One OPTIMIZER name: where its class lives and how the config reaches it."""

    name: str
    source: str  # package: torch, bitsandbytes or transformers
    target: str  # "module:Class"
    family: str  # key of _FAMILY_KEYS
    fixed: tuple = ()  # constructor arguments fixed by the name: ((argument, value), ...)
    cpu: str = _CPU_STEPS  # measured behaviour on a CPU-only machine
    note: str = ""

    @property
    def keys(self) -> tuple[str, ...]:
        return _FAMILY_KEYS[self.family]

    @property
    def needs_bnb(self) -> bool:
        return self.source == "bitsandbytes"


def _bnb(name, cls, family, cpu=_CPU_STEPS, fixed=(), note=""):
    return OptimSpec(name, "bitsandbytes", f"bitsandbytes.optim:{cls}", family, fixed, cpu, note)


_ADEMAMIX_BETA3 = 0.9999  # AdEMAMix's slow-EMA coefficient (the paper's and bitsandbytes' default)
_ADEMAMIX_ALPHA = "AdEMAMix's alpha (5.0) and beta3 (0.9999) keep their defaults (ALPHA is RMSprop's)"
_ADEMAMIX_NOTE = ("built as {cls}(optim_bits=32): bitsandbytes' {cls}32bit keeps one state buffer where "
                  "AdEMAMix needs two and fails to step on CPU. " + _ADEMAMIX_ALPHA)

OPTIMIZERS: dict[str, OptimSpec] = {s.name: s for s in (
    OptimSpec("adamw", "torch", "torch.optim:AdamW", "adam", fixed=(("fused", True),),
              note="decoupled weight decay; torch's fused kernel (CPU and GPU: one pass over each tensor)"),
    _bnb("adamw_8bit", "AdamW8bit", "adam"),
    _bnb("adamw_32bit", "AdamW32bit", "adam"),
    _bnb("paged_adamw_8bit", "PagedAdamW8bit", "adam", _CPU_PAGED),
    _bnb("paged_adamw_32bit", "PagedAdamW32bit", "adam", _CPU_PAGED),
    _bnb("adam_8bit", "Adam8bit", "adam", note="bitsandbytes' Adam decays weights like AdamW (decoupled)"),
    _bnb("adam_32bit", "Adam32bit", "adam", note="bitsandbytes' Adam decays weights like AdamW (decoupled)"),
    _bnb("paged_adam_8bit", "PagedAdam8bit", "adam", _CPU_PAGED),
    _bnb("paged_adam_32bit", "PagedAdam32bit", "adam", _CPU_PAGED),
    OptimSpec("adagrad", "torch", "torch.optim:Adagrad", "adagrad"),
    _bnb("adagrad_8bit", "Adagrad8bit", "adagrad", note="INITIAL_ACCUMULATOR_VALUE and LR_DECAY must be 0"),
    _bnb("adagrad_32bit", "Adagrad32bit", "adagrad", note="INITIAL_ACCUMULATOR_VALUE and LR_DECAY must be 0"),
    OptimSpec("rmsprop", "torch", "torch.optim:RMSprop", "rmsprop"),
    _bnb("ademamix_8bit", "AdEMAMix8bit", "ademamix",
         note=_ADEMAMIX_ALPHA),
    _bnb("ademamix_32bit", "AdEMAMix", "ademamix", fixed=(("optim_bits", 32),),
         note=_ADEMAMIX_NOTE.format(cls="AdEMAMix")),
    _bnb("paged_ademamix_8bit", "PagedAdEMAMix8bit", "ademamix", _CPU_PAGED,
         note=_ADEMAMIX_ALPHA),
    _bnb("paged_ademamix_32bit", "PagedAdEMAMix", "ademamix", _CPU_PAGED, fixed=(("optim_bits", 32),),
         note=_ADEMAMIX_NOTE.format(cls="PagedAdEMAMix")),
    OptimSpec("sgd", "torch", "torch.optim:SGD", "sgd"),
    _bnb("sgd_8bit", "SGD8bit", "sgd_bnb", "steps with MOMENTUM > 0 (bitsandbytes has no plain SGD)",
         note="MOMENTUM > 0 required; DAMPENING and NESTEROV are not implemented by bitsandbytes"),
    _bnb("lion_8bit", "Lion8bit", "lion"),
    _bnb("lion_32bit", "Lion32bit", "lion"),
    _bnb("paged_lion_8bit", "PagedLion8bit", "lion", _CPU_PAGED),
    _bnb("paged_lion_32bit", "PagedLion32bit", "lion", _CPU_PAGED),
    OptimSpec("adafactor", "transformers", "transformers.optimization:Adafactor", "adafactor",
              fixed=(("relative_step", False), ("scale_parameter", False), ("warmup_init", False)),
              note="explicit lr; no first moment (BETA1 unused), Adafactor's own eps pair"),
)}


def optimizer_names() -> list[str]:
    """Every valid OPTIMIZER value, in table order."""
    return list(OPTIMIZERS)


def optimizer_spec(name: str) -> OptimSpec:
    """The table row of an OPTIMIZER name (case-insensitive); ValueError listing the valid ones."""
    key = str(name).strip().lower()
    if key not in OPTIMIZERS:
        raise ValueError(unknown_name("optimizer", "OPTIMIZER", str(name), optimizer_names()))
    return OPTIMIZERS[key]


def _family_kwargs(family: str, o) -> dict[str, Any]:
    """Constructor arguments of a family from OptimConfig ``o`` (per-group weight_decay wins)."""
    if family == "adam":
        return dict(betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    if family == "ademamix":  # a 2-tuple would make bitsandbytes run with beta3 = 0 (no slow EMA)
        return dict(betas=(o.beta1, o.beta2, _ADEMAMIX_BETA3), eps=o.eps, weight_decay=o.weight_decay)
    if family == "lion":
        return dict(betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    if family == "adagrad":
        return dict(lr_decay=o.lr_decay, weight_decay=o.weight_decay,
                    initial_accumulator_value=o.initial_accumulator_value, eps=o.eps)
    if family == "rmsprop":
        return dict(alpha=o.alpha, eps=o.eps, weight_decay=o.weight_decay, momentum=o.momentum,
                    centered=o.centered)
    if family == "sgd":
        return dict(momentum=o.momentum, dampening=o.dampening, weight_decay=o.weight_decay,
                    nesterov=o.nesterov)
    if family == "sgd_bnb":
        return dict(momentum=o.momentum, weight_decay=o.weight_decay)
    if family == "adafactor":
        return dict(weight_decay=o.weight_decay)
    raise AssertionError(f"unknown optimizer family {family}")


# --------------------------------------------------------------------------------------
# DeepSpeed awareness


def offload_device(ds_config: Optional[dict]) -> Optional[str]:
    """``zero_optimization.offload_optimizer.device`` when it moves optimizer state off the GPU
    ("cpu" or "nvme": DeepSpeed then wants its own CPU optimizer), else None."""
    if not isinstance(ds_config, dict):
        return None
    zero = ds_config.get("zero_optimization") or {}
    off = zero.get("offload_optimizer") if isinstance(zero, dict) else None
    device = str(off.get("device", "none")).lower() if isinstance(off, dict) else "none"
    return device if device in ("cpu", "nvme") else None


def _offload_target(spec: OptimSpec, ds_config: Optional[dict]) -> Optional[str]:
    if offload_device(ds_config) is None:
        return None
    return OFFLOAD_CLASSES.get(spec.family)


def deepspeed_optimizer_settings(name: str, ds_config: Optional[dict] = None) -> dict:
    """Keys to add to a DeepSpeed config so that ZeRO accepts the optimizer this module builds
    for ``name`` under ``ds_config``: ZeRO refuses client optimizers outside its tested list
    (torch AdamW/Adagrad and DeepSpeed's own) unless ``zero_allow_untested_optimizer`` is true."""
    spec = optimizer_spec(name)
    target = _offload_target(spec, ds_config) or spec.target
    return {} if target in _ZERO_TESTED else {"zero_allow_untested_optimizer": True}


def _read_ds_config(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None  # config validation reports a missing or broken DS_CONFIG itself
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------
# validation (never imports torch)


def _bnb_version() -> Optional[tuple[int, int]]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        parts = version("bitsandbytes").split(".")
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (PackageNotFoundError, ValueError, IndexError):
        return None


def _cuda_known_absent() -> bool:
    """True only when torch is already imported and reports no CUDA (validation never imports it)."""
    torch = sys.modules.get("torch")
    return torch is not None and hasattr(torch, "cuda") and not torch.cuda.is_available()


def optimizer_problems(cfg, ds_config: Optional[dict] = None) -> list[str]:
    """Every reason the configured OPTIMIZER cannot run here as configured."""
    o = cfg.optim
    try:
        spec = optimizer_spec(o.name)
    except ValueError as e:
        return [str(e)]
    out, tag = [], f"OPTIMIZER={spec.name}"
    if spec.needs_bnb:
        if importlib.util.find_spec("bitsandbytes") is None:
            out.append(f"{tag} needs bitsandbytes, which is not installed: pip install bitsandbytes, "
                       f"or use a torch optimizer (adamw, adagrad, rmsprop, sgd).")
        elif _cuda_known_absent() and (_bnb_version() or (0, 0)) < _BNB_MIN_CPU:
            out.append(f"{tag}: this machine has no CUDA and the installed bitsandbytes predates its CPU "
                       f"optimizer kernels; upgrade to bitsandbytes>={'.'.join(map(str, _BNB_MIN_CPU))}, "
                       f"run on a GPU, or use a torch optimizer (adamw, adagrad, rmsprop, sgd).")
    if "BETA1" in spec.keys and not (o.beta1 < 1.0 and o.beta2 < 1.0):
        out.append(f"{tag}: BETA1 ({o.beta1}) and BETA2 ({o.beta2}) must be below 1.")
    if spec.family == "sgd_bnb":
        if o.momentum == 0:
            out.append(f"{tag}: bitsandbytes' SGD8bit has no plain-SGD mode; set MOMENTUM > 0 (e.g. 0.9) "
                       f"or use OPTIMIZER=sgd.")
        if o.dampening != 0 or o.nesterov:
            out.append(f"{tag}: bitsandbytes' SGD8bit ignores DAMPENING and NESTEROV; set DAMPENING=0 and "
                       f"NESTEROV=false, or use OPTIMIZER=sgd.")
    if spec.family == "adagrad" and spec.needs_bnb and (o.initial_accumulator_value != 0 or o.lr_decay != 0):
        out.append(f"{tag}: bitsandbytes' Adagrad supports only INITIAL_ACCUMULATOR_VALUE=0 and LR_DECAY=0 "
                   f"(got {o.initial_accumulator_value} and {o.lr_decay}); use OPTIMIZER=adagrad for those.")
    if spec.family == "sgd" and o.nesterov and (o.momentum <= 0 or o.dampening != 0):
        out.append(f"{tag}: NESTEROV needs MOMENTUM > 0 and DAMPENING = 0 (got {o.momentum} and {o.dampening}).")
    cycling = canonical_scheduler(cfg.sched.name) in ("onecycle", "cyclic") and cfg.sched.cycle_momentum
    if cycling and spec.family not in _MOMENTUM_FAMILIES:
        out.append(f"{tag} has no momentum or beta1 for CYCLE_MOMENTUM to cycle (SCHEDULER={cfg.sched.name}); "
                   f"set CYCLE_MOMENTUM=false or choose an optimizer with momentum.")
    if cycling and spec.family == "rmsprop" and o.momentum == 0:
        out.append(f"{tag} with CYCLE_MOMENTUM: torch RMSprop only keeps a momentum buffer when it starts "
                   f"with MOMENTUM > 0; set MOMENTUM (e.g. 0.9).")
    if offload_device(ds_config) is not None:
        out += _offload_problems(spec, o, ds_config)
    return out


def _offload_problems(spec: OptimSpec, o, ds_config: dict) -> list[str]:
    tag = f"OPTIMIZER={spec.name}"
    target = _offload_target(spec, ds_config)
    if target is None:
        if ds_config.get("zero_force_ds_cpu_optimizer", True):
            return [f"{tag}: the DeepSpeed config offloads optimizer state "
                    f"(offload_optimizer.device={offload_device(ds_config)}), and DeepSpeed then only accepts its "
                    f"own CPU optimizers: use an adam*/adamw*, lion* or adagrad* optimizer, drop the offload, or "
                    f"set \"zero_force_ds_cpu_optimizer\": false in the DeepSpeed config (slow)."]
        return []
    if spec.family == "adagrad" and (o.initial_accumulator_value != 0 or o.lr_decay != 0):
        return [f"{tag} with optimizer offload becomes DeepSpeedCPUAdagrad, which has no "
                f"INITIAL_ACCUMULATOR_VALUE or LR_DECAY; set both to 0 or drop the offload."]
    return []


def validate_optim_config(cfg) -> list[str]:
    """Problems of OPTIMIZER, SCHEDULER and their hyper-parameters, found before anything runs.

    Instant: a static table of requirements, ``find_spec`` for bitsandbytes, the DS_CONFIG JSON;
    CUDA is consulted only when torch is already imported.
    """
    ds = _read_ds_config(cfg.run.ds_config) if cfg.run.ds_config else None
    return optimizer_problems(cfg, ds) + scheduler_problems(cfg)


# --------------------------------------------------------------------------------------
# building the optimizer


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_optimizer(param_groups, cfg, lr: float, ds_config: Optional[dict] = None):
    """The optimizer named by OPTIMIZER over the trainer's parameter groups.

    ``param_groups``: list of ``{"params": [...], "role": ..., "weight_decay": float, ...}``; every
    key of a group is kept (the group's weight_decay wins over WEIGHT_DECAY, which is only the
    default for groups without one). ``lr`` is the initial learning rate; the trainer overwrites
    it before every step. ``ds_config``: the DeepSpeed config dict; when it offloads optimizer
    state to CPU/NVMe, adam*/lion*/adagrad* names become DeepSpeed's own CPU optimizer
    (DeepSpeedCPUAdam with decoupled weight decay, DeepSpeedCPULion, DeepSpeedCPUAdagrad).
    Raises ValueError listing every problem :func:`optimizer_problems` finds.
    """
    spec = optimizer_spec(cfg.optim.name)
    problems = optimizer_problems(cfg, ds_config)
    if problems:
        raise ValueError("cannot build the optimizer:\n" + "\n".join(f"  - {p}" for p in problems))
    groups = [dict(g) for g in param_groups]
    if not groups or any("params" not in g for g in groups):
        raise ValueError("build_optimizer: param_groups must be a non-empty list of dicts with a 'params' key.")
    kwargs = _family_kwargs(spec.family, cfg.optim)
    target = _offload_target(spec, ds_config)
    if target is not None:
        cls = _load(target)
        if spec.family == "adam":
            kw = dict(betas=kwargs["betas"], eps=kwargs["eps"], weight_decay=kwargs["weight_decay"], adamw_mode=True)
        elif spec.family == "lion":
            kw = dict(betas=kwargs["betas"], weight_decay=kwargs["weight_decay"])
        else:
            kw = dict(eps=kwargs["eps"], weight_decay=kwargs["weight_decay"])
        if spec.name != "adamw":
            log.info("OPTIMIZER=%s: optimizer state is offloaded, so DeepSpeed's %s runs instead (fp32 state).",
                     spec.name, target.split(":")[1])
        return cls(groups, lr=lr, **kw)
    return _load(spec.target)(groups, lr=lr, **kwargs, **dict(spec.fixed))


