"""Optimizer and learning-rate schedule factories.

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

import difflib
import functools
import importlib
import importlib.util
import json
import logging
import math
import sys
from dataclasses import dataclass
from typing import Any, Optional

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
_OFFLOAD_CLASSES = {
    "adam": "deepspeed.ops.adam:DeepSpeedCPUAdam",
    "lion": "deepspeed.ops.lion:DeepSpeedCPULion",
    "adagrad": "deepspeed.ops.adagrad:DeepSpeedCPUAdagrad",
}

# Client optimizers DeepSpeed ZeRO accepts without "zero_allow_untested_optimizer": true
# (deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS, compared by exact type).
_ZERO_TESTED = {"torch.optim:AdamW", "torch.optim:Adagrad", *_OFFLOAD_CLASSES.values()}

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


def _unknown(kind: str, key: str, name: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    return f"{key}: {name!r} is not a known {kind}.{hint} Valid: {', '.join(valid)}."


def optimizer_spec(name: str) -> OptimSpec:
    """The table row of an OPTIMIZER name (case-insensitive); ValueError listing the valid ones."""
    key = str(name).strip().lower()
    if key not in OPTIMIZERS:
        raise ValueError(_unknown("optimizer", "OPTIMIZER", str(name), optimizer_names()))
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
    return _OFFLOAD_CLASSES.get(spec.family)


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
    cycling = _canonical_sched(cfg.sched.name) in ("onecycle", "cyclic") and cfg.sched.cycle_momentum
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
# scheduler table


@dataclass(frozen=True)
class SchedSpec:
    """One SCHEDULER name: the keys it reads and the curve it draws (t = steps done, T = total)."""

    name: str
    style: str  # transformers, torch or hybrid_ds
    keys: tuple[str, ...]
    meaning: str
    warmup: bool = False  # reads NUM_WARMUP_STEPS / WARMUP_RATIO


_W = ("NUM_WARMUP_STEPS", "WARMUP_RATIO")
_MOM = ("CYCLE_MOMENTUM", "BASE_MOMENTUM", "MAX_MOMENTUM")

SCHEDULERS: dict[str, SchedSpec] = {s.name: s for s in (
    SchedSpec("linear", "transformers", _W, "lr·t/W during warm-up, then linear to 0 at T", True),
    SchedSpec("cosine", "transformers", _W + ("NUM_CYCLES",),
              "warm-up, then lr·½(1+cos(2π·NUM_CYCLES·p)), p = (t−W)/(T−W); 0.5 cycles ends at 0", True),
    SchedSpec("cosine_with_restarts", "transformers", _W + ("NUM_CYCLES",),
              "warm-up, then NUM_CYCLES (a whole number) cosine decays to 0 with hard restarts: "
              "lr·½(1+cos(π·((NUM_CYCLES·p) mod 1)))", True),
    SchedSpec("polynomial", "transformers", _W + ("POLY_POWER", "LR_FLOOR"),
              "warm-up, then (lr−LR_FLOOR)·(1−p)^POLY_POWER + LR_FLOOR (alias poly)", True),
    SchedSpec("constant", "transformers", (), "lr"),
    SchedSpec("constant_with_warmup", "transformers", _W, "lr·t/W during warm-up, then lr", True),
    SchedSpec("inverse_sqrt", "transformers", _W,
              "lr·t/W during warm-up, then lr·√(τ/(t+τ−W)), τ = W (10 000 when W = 0)", True),
    SchedSpec("step", "torch", ("STEP_SIZE", "GAMMA"), "lr·GAMMA^⌊t/STEP_SIZE⌋ (StepLR)"),
    SchedSpec("multistep", "torch", ("MILESTONES", "GAMMA"),
              "lr·GAMMA^(number of MILESTONES ≤ t) (MultiStepLR)"),
    SchedSpec("exponential", "torch", ("GAMMA",), "lr·GAMMA^t (ExponentialLR)"),
    SchedSpec("cosineannealing", "torch", ("T_MAX", "MIN_LR"),
              "MIN_LR + (lr−MIN_LR)·½(1+cos(π·t/T_MAX)), T_MAX = T when 0 (CosineAnnealingLR; "
              "alias key ETA_MIN)"),
    SchedSpec("cosineannealing_warm_restarts", "torch", ("T0", "T_MULT", "MIN_LR"),
              "cosine from lr to MIN_LR over T0 steps, then restart; each period T_MULT times the last "
              "(CosineAnnealingWarmRestarts)"),
    SchedSpec("onecycle", "torch", ("MAX_LR", "PCT_START", "ANNEAL_STRATEGY", "DIV_FACTOR", "FINAL_DIV_FACTOR",
                                    "THREE_PHASE") + _MOM,
              "MAX_LR/DIV_FACTOR up to MAX_LR (= lr when 0) over PCT_START·T steps, then down to "
              "MAX_LR/(DIV_FACTOR·FINAL_DIV_FACTOR) at step T−1; momentum the other way (OneCycleLR)"),
    SchedSpec("cyclic", "torch", ("BASE_LR", "MAX_LR", "STEP_SIZE_UP", "STEP_SIZE_DOWN", "CYCLIC_MODE", "GAMMA")
              + _MOM,
              "triangle between BASE_LR (= MAX_LR/10 when 0) and MAX_LR (= lr when 0): up STEP_SIZE_UP steps, "
              "down STEP_SIZE_DOWN; triangular2 halves the height each cycle, exp_range scales it by "
              "GAMMA^t (CyclicLR)"),
    SchedSpec("reduce_on_plateau", "torch", ("PLATEAU_METRIC", "PLATEAU_MODE", "FACTOR", "PATIENCE", "THRESHOLD",
                                             "THRESHOLD_MODE", "COOLDOWN", "MIN_LR", "PLATEAU_EPS"),
              "lr, times FACTOR whenever PLATEAU_METRIC (stepped every optimizer step) has not improved for "
              "more than PATIENCE steps, then COOLDOWN steps of rest; never below MIN_LR (ReduceLROnPlateau)"),
    SchedSpec("lambda", "hybrid_ds", ("LR_FLOOR",), "lr + (LR_FLOOR − lr)·t/T: linear from lr to LR_FLOOR"),
    SchedSpec("none", "hybrid_ds", (), "lr, no warm-up"),
)}

SCHEDULER_ALIASES = {"poly": "polynomial", "": "none", "no": "none", "off": "none", "null": "none"}

# Schedules that cannot go further once T optimizer steps are done: the lr is then held.
# onecycle ends at step T−1 (OneCycleLR refuses to go past it); reduce_on_plateau has no end.
_NO_END = ("reduce_on_plateau",)


def scheduler_names() -> list[str]:
    """Every valid SCHEDULER value, in table order (aliases not included)."""
    return list(SCHEDULERS)


def _canonical_sched(name: str) -> str:
    key = str(name).strip().lower()
    return SCHEDULER_ALIASES.get(key, key)


def scheduler_spec(name: str) -> SchedSpec:
    """The table row of a SCHEDULER name (case-insensitive, aliases resolved); ValueError if unknown."""
    key = _canonical_sched(name)
    if key not in SCHEDULERS:
        raise ValueError(_unknown("scheduler", "SCHEDULER", str(name),
                                  scheduler_names() + [a for a in SCHEDULER_ALIASES if a]))
    return SCHEDULERS[key]


def _phase_lrs(cfg) -> dict[str, float]:
    """Base learning rate of every phase the run uses: {"LR_SFT": ..., "LR_PPO": ...}."""
    out = {}
    if cfg.run.mode in ("sft", "hybrid"):
        out["LR_SFT"] = cfg.sft.lr
    if cfg.run.mode in ("ppo", "hybrid"):
        out["LR_PPO"] = cfg.ppo.lr
    return out


def _known_total(cfg) -> Optional[int]:
    s = cfg.sched
    if s.num_training_steps > 0:
        return s.num_training_steps
    if s.steps_per_epoch > 0:
        return s.steps_per_epoch * cfg.run.epochs
    return None


def _onecycle_problem(pct_start: float, total: int, three_phase: bool) -> Optional[str]:
    """OneCycleLR divides by the length of each phase; a phase of zero steps crashes it."""
    ends = ([pct_start * total - 1, 2 * pct_start * total - 2, total - 1] if three_phase
            else [pct_start * total - 1, total - 1])
    starts = [0.0] + ends[:-1]
    if any(abs(e - s) < 1e-12 for s, e in zip(starts, ends)):
        return (f"PCT_START ({pct_start}) with {total} total steps{' and THREE_PHASE' if three_phase else ''} "
                f"gives onecycle a phase of zero steps; change PCT_START or the number of steps.")
    return None


def _lr_problems(spec: SchedSpec, s, lr_key: str, lr: float) -> list[str]:
    """Problems that depend on one phase's base learning rate."""
    name, out = spec.name, []
    if name == "polynomial" and s.lr_floor >= lr:
        out.append(f"SCHEDULER=polynomial: LR_FLOOR ({s.lr_floor}) must be below {lr_key} ({lr}).")
    if name == "lambda" and s.lr_floor > lr:
        out.append(f"SCHEDULER=lambda: LR_FLOOR ({s.lr_floor}) is above {lr_key} ({lr}); the lr would rise.")
    if name in ("cosineannealing", "cosineannealing_warm_restarts") and s.min_lr > lr:
        out.append(f"SCHEDULER={name}: MIN_LR ({s.min_lr}) is above {lr_key} ({lr}); the curve would rise.")
    if name == "reduce_on_plateau" and s.min_lr >= lr:
        out.append(f"SCHEDULER=reduce_on_plateau: MIN_LR ({s.min_lr}) is not below {lr_key} ({lr}); "
                   f"the lr could never be reduced.")
    if name == "cyclic":
        top = s.max_lr or lr
        bottom = s.base_lr or top / 10
        if bottom >= top:
            out.append(f"SCHEDULER=cyclic: the lower bound BASE_LR ({bottom}) must be below the peak "
                       f"({top}, {'MAX_LR' if s.max_lr else lr_key}).")
    return out


def _total_problems(spec: SchedSpec, s, total: int, warmup: int) -> list[str]:
    """Problems that depend on the total number of steps."""
    out = []
    if spec.warmup and warmup > total:
        out.append(f"SCHEDULER={spec.name}: {warmup} warm-up steps exceed the {total} steps of the schedule.")
    if spec.name == "onecycle":
        p = _onecycle_problem(s.pct_start, total, s.three_phase)
        if p:
            out.append(f"SCHEDULER=onecycle: {p}")
    if spec.name == "multistep" and s.milestones and max(s.milestones) > total:
        out.append(f"SCHEDULER=multistep: MILESTONES {s.milestones} lie beyond the {total} steps of the schedule.")
    return out


def scheduler_problems(cfg) -> list[str]:
    """Every reason the configured SCHEDULER and its keys make no sense (no torch import)."""
    s = cfg.sched
    try:
        spec = scheduler_spec(s.name)
    except ValueError as e:
        return [str(e)]
    out = _key_problems(spec, s)
    for lr_key, lr in _phase_lrs(cfg).items():
        out += _lr_problems(spec, s, lr_key, lr)
    total = _known_total(cfg)
    if total is not None:
        out += _total_problems(spec, s, total, _warmup_steps(s, total) if spec.warmup else 0)
    return list(dict.fromkeys(out))  # one line per problem even when both phases share it


_COLLAPSE = 0.01  # a schedule that takes the lr below this fraction of its start gets a warning


def _steps_to_collapse(name: str, s) -> Optional[int]:
    """Optimizer steps after which ``name``'s decay alone has taken the lr below _COLLAPSE x its start
    (None when it never does or depends on the run, e.g. reduce_on_plateau)."""
    if not 0 < s.gamma < 1:
        return None
    decays = math.ceil(math.log(_COLLAPSE) / math.log(s.gamma))  # GAMMA^decays < _COLLAPSE
    if name == "exponential" or (name == "cyclic" and s.cyclic_mode == "exp_range"):
        return decays
    if name == "step":
        return decays * s.step_size
    if name == "multistep":
        ms = sorted(s.milestones)
        return ms[decays - 1] if len(ms) >= decays else None
    return None


def schedule_warnings(cfg, phase_steps: dict[str, int]) -> list[str]:
    """Settings that are valid but collapse the lr within the run: one line each, with the numbers.

    ``phase_steps``: {"LR_SFT": optimizer steps of the SFT schedule, "LR_PPO": ... of PPO}.
    """
    s = cfg.sched
    try:
        spec = scheduler_spec(s.name)
    except ValueError:
        return []
    n = _steps_to_collapse(spec.name, s)
    out = []
    for lr_key, steps in phase_steps.items():
        total = resolve_total_steps(cfg, steps) if steps > 0 else 0
        if n is not None and 0 < total and n <= total:
            every = f" every {s.step_size} steps" if spec.name == "step" else ""
            out.append(f"SCHEDULER={spec.name} with GAMMA={s.gamma}{every} takes {lr_key} below "
                       f"{_COLLAPSE:.0%} of its start after {n} of the schedule's {total} optimizer steps "
                       f"(lr x GAMMA^{math.ceil(math.log(_COLLAPSE) / math.log(s.gamma))}); raise GAMMA"
                       + (" or STEP_SIZE" if spec.name == "step" else "") + " if that is not intended.")
    return list(dict.fromkeys(out))


def _key_problems(spec: SchedSpec, s) -> list[str]:
    """Problems of the schedule's own keys (independent of learning rate and length)."""
    name, out = spec.name, []
    warm = s.num_warmup_steps > 0 or s.warmup_ratio > 0
    if warm and not spec.warmup:
        hint = " (use constant_with_warmup)" if name == "constant" else ""
        out.append(f"SCHEDULER={name} has no warm-up but NUM_WARMUP_STEPS/WARMUP_RATIO is set{hint}; warm-up "
                   f"works with {', '.join(n for n, sp in SCHEDULERS.items() if sp.warmup)}.")
    if s.num_warmup_steps > 0 and s.warmup_ratio > 0:
        out.append("NUM_WARMUP_STEPS and WARMUP_RATIO are both set; set one of them.")
    if name == "cosine" and s.num_cycles == 0:
        out.append("SCHEDULER=cosine: NUM_CYCLES=0 gives a constant lr; use 0.5 for a half-wave decay to 0.")
    if name == "cosine_with_restarts" and (s.num_cycles < 1 or s.num_cycles != int(s.num_cycles)):
        out.append(f"SCHEDULER=cosine_with_restarts: NUM_CYCLES ({s.num_cycles}) counts hard restarts and must "
                   f"be a whole number >= 1 (the default 0.5 is the cosine half-wave); set e.g. NUM_CYCLES=2.")
    if name == "multistep" and not s.milestones:
        out.append("SCHEDULER=multistep needs MILESTONES, e.g. [1000, 2000].")
    if name in ("step", "multistep", "exponential") and s.gamma <= 0:
        out.append(f"SCHEDULER={name}: GAMMA={s.gamma} would set the lr to 0 at the first decay; use 0 < GAMMA.")
    if name in ("onecycle", "cyclic") and s.cycle_momentum:
        if s.base_momentum > s.max_momentum:
            out.append(f"SCHEDULER={name}: BASE_MOMENTUM ({s.base_momentum}) exceeds MAX_MOMENTUM "
                       f"({s.max_momentum}).")
        if s.max_momentum >= 1:
            out.append(f"SCHEDULER={name}: MAX_MOMENTUM ({s.max_momentum}) must be below 1 (it becomes "
                       f"beta1/momentum).")
    if name == "cyclic" and s.cyclic_mode == "exp_range" and not 0.9 <= s.gamma <= 1:
        out.append(f"SCHEDULER=cyclic with CYCLIC_MODE=exp_range scales the cycle height by GAMMA every step "
                   f"(GAMMA^100 after 100 steps); GAMMA={s.gamma} flattens it at once. Use a value close to 1, "
                   f"e.g. GAMMA=0.9999.")
    return out


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


# --------------------------------------------------------------------------------------
# schedules


def resolve_total_steps(cfg, derived: int) -> int:
    """Optimizer steps a phase's schedule spans: NUM_TRAINING_STEPS if > 0, else
    STEPS_PER_EPOCH × EPOCHS if > 0, else ``derived`` (what the trainer computes from the run)."""
    total = _known_total(cfg)
    if total is not None:
        return total
    if derived > 0:
        return int(derived)
    raise ValueError(f"cannot size the learning-rate schedule: NUM_TRAINING_STEPS and STEPS_PER_EPOCH are 0 "
                     f"and the run gives {derived} steps.")


def _warmup_steps(s, total: int) -> int:
    """NUM_WARMUP_STEPS if > 0, else ⌈WARMUP_RATIO × total⌉ (transformers' rounding)."""
    return s.num_warmup_steps if s.num_warmup_steps > 0 else math.ceil(s.warmup_ratio * total)


def _linear_to_floor(step: int, *, total: int, floor_ratio: float) -> float:
    return 1.0 - (1.0 - floor_ratio) * min(step, total) / total


def _constant(step: int) -> float:
    return 1.0


def _build_scheduler(name: str, opt, s, base_lr: float, total: int, warmup: int):
    """The torch/transformers scheduler of ``name`` attached to the shadow optimizer ``opt``."""
    from torch.optim import lr_scheduler as sch
    from transformers import optimization as tfo

    if name == "linear":
        return tfo.get_linear_schedule_with_warmup(opt, warmup, total)
    if name == "cosine":
        return tfo.get_cosine_schedule_with_warmup(opt, warmup, total, num_cycles=s.num_cycles)
    if name == "cosine_with_restarts":
        return tfo.get_cosine_with_hard_restarts_schedule_with_warmup(opt, warmup, total,
                                                                      num_cycles=int(s.num_cycles))
    if name == "polynomial":
        return tfo.get_polynomial_decay_schedule_with_warmup(opt, warmup, total, lr_end=s.lr_floor,
                                                             power=s.poly_power)
    if name == "constant":
        return tfo.get_constant_schedule(opt)
    if name == "constant_with_warmup":
        return tfo.get_constant_schedule_with_warmup(opt, warmup)
    if name == "inverse_sqrt":
        return tfo.get_inverse_sqrt_schedule(opt, warmup)
    if name == "step":
        return sch.StepLR(opt, step_size=s.step_size, gamma=s.gamma)
    if name == "multistep":
        return sch.MultiStepLR(opt, milestones=list(s.milestones), gamma=s.gamma)
    if name == "exponential":
        return sch.ExponentialLR(opt, gamma=s.gamma)
    if name == "cosineannealing":
        return sch.CosineAnnealingLR(opt, T_max=s.t_max or total, eta_min=s.min_lr)
    if name == "cosineannealing_warm_restarts":
        return sch.CosineAnnealingWarmRestarts(opt, T_0=s.t0, T_mult=s.t_mult, eta_min=s.min_lr)
    if name == "onecycle":
        return sch.OneCycleLR(opt, max_lr=s.max_lr or base_lr, total_steps=total, pct_start=s.pct_start,
                              anneal_strategy=s.anneal_strategy, cycle_momentum=s.cycle_momentum,
                              base_momentum=s.base_momentum, max_momentum=s.max_momentum,
                              div_factor=s.div_factor, final_div_factor=s.final_div_factor,
                              three_phase=s.three_phase)
    if name == "cyclic":
        top = s.max_lr or base_lr
        return sch.CyclicLR(opt, base_lr=s.base_lr or top / 10, max_lr=top, step_size_up=s.step_size_up,
                            step_size_down=s.step_size_down or None, mode=s.cyclic_mode, gamma=s.gamma,
                            cycle_momentum=s.cycle_momentum, base_momentum=s.base_momentum,
                            max_momentum=s.max_momentum)
    if name == "reduce_on_plateau":
        return sch.ReduceLROnPlateau(opt, mode=s.plateau_mode, factor=s.factor, patience=s.patience,
                                     threshold=s.threshold, threshold_mode=s.threshold_mode,
                                     cooldown=s.cooldown, min_lr=s.min_lr, eps=s.plateau_eps)
    if name == "lambda":
        return sch.LambdaLR(opt, functools.partial(_linear_to_floor, total=total, floor_ratio=s.lr_floor / base_lr))
    if name == "none":
        return sch.LambdaLR(opt, _constant)
    raise AssertionError(f"no builder for scheduler {name}")


def set_optimizer_hparams(param_groups, lr: float, momentum: Optional[float] = None) -> None:
    """Write ``lr`` (and a cycled ``momentum``: beta1 of Adam/Lion/AdEMAMix, SGD/RMSprop momentum)
    into every parameter group."""
    for g in param_groups:
        g["lr"] = lr
        if momentum is None:
            continue
        if "betas" in g:
            g["betas"] = (momentum, *tuple(g["betas"])[1:])
        elif "momentum" in g:
            g["momentum"] = momentum
        else:
            raise ValueError(f"parameter group without betas or momentum (keys {sorted(g)}): cannot cycle momentum.")


class PhaseSchedule:
    """The learning rate of one training phase, one value per optimizer step.

    ``lr`` is the learning rate of the next optimizer step; ``step(metric)`` advances one
    optimizer step (reduce_on_plateau needs the metric, the others ignore it). The schedule
    spans :func:`resolve_total_steps` ``(cfg, total_steps)`` steps; past the end the last
    learning rate is held (reduce_on_plateau has no end). Trainer use::

        sched.apply(optimizer.param_groups); optimizer.step(); sched.step(loss)
    """

    def __init__(self, cfg, base_lr: float, total_steps: int, *, name_override: Optional[str] = None):
        import torch

        spec = scheduler_spec(name_override or cfg.sched.name)
        s = cfg.sched
        self.name = spec.name
        self.base_lr = float(base_lr)
        self.total_steps = resolve_total_steps(cfg, total_steps)
        self.warmup_steps = _warmup_steps(s, self.total_steps) if spec.warmup else 0
        problems = _key_problems(spec, s) + _lr_problems(spec, s, "the phase's lr", self.base_lr)
        problems += _total_problems(spec, s, self.total_steps, self.warmup_steps)
        if problems:
            raise ValueError(f"cannot build the {self.name} schedule:\n" + "\n".join(f"  - {p}" for p in problems))
        self.cycles_momentum = self.name in ("onecycle", "cyclic") and s.cycle_momentum
        self.steps_done = 0
        self._limit = None if self.name in _NO_END else (
            self.total_steps - 1 if self.name == "onecycle" else self.total_steps)
        # The shadow: a one-parameter optimizer that never sees a gradient (its step is a no-op),
        # so the scheduler can own its lr without touching the real optimizer.
        self._shadow = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=self.base_lr)
        self._sched = _build_scheduler(self.name, self._shadow, s, self.base_lr, self.total_steps,
                                       self.warmup_steps)
        if self.name != "reduce_on_plateau":  # LAST_EPOCH: start as if LAST_EPOCH + 1 steps were done
            for _ in range(s.last_epoch + 1):
                self.step()

    @property
    def lr(self) -> float:
        """Learning rate for the next optimizer step."""
        return float(self._shadow.param_groups[0]["lr"])

    @property
    def momentum(self) -> Optional[float]:
        """Momentum/beta1 for the next step when onecycle/cyclic cycle it (CYCLE_MOMENTUM), else None."""
        return float(self._shadow.param_groups[0]["momentum"]) if self.cycles_momentum else None

    def step(self, metric: Optional[float] = None) -> None:
        """Advance one optimizer step."""
        if self.name == "reduce_on_plateau":
            if metric is None:
                raise ValueError("reduce_on_plateau is stepped with a metric: PhaseSchedule.step(metric).")
            self._shadow.step()
            self._sched.step(float(metric))
        elif self.steps_done < self._limit:
            self._shadow.step()  # no-op; keeps torch's "scheduler before optimizer" check quiet
            self._sched.step()
        self.steps_done += 1

    def apply(self, param_groups) -> float:
        """Write this schedule's lr (and cycled momentum) into ``param_groups``; return the lr."""
        lr = self.lr
        set_optimizer_hparams(param_groups, lr, self.momentum)
        return lr

    def state_dict(self) -> dict:
        return {"name": self.name, "base_lr": self.base_lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "steps_done": self.steps_done,
                "scheduler": self._sched.state_dict(), "shadow": self._shadow.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` left off; the schedule must be built from the same settings."""
        for key in ("name", "base_lr", "total_steps", "warmup_steps"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the saved {state['name']} schedule has {key}={state[key]!r} but this run's has "
                                 f"{getattr(self, key)!r}; resume with the settings the run started with.")
        self._shadow.load_state_dict(state["shadow"])
        self._sched.load_state_dict(state["scheduler"])
        self.steps_done = int(state["steps_done"])


def make_phase_schedules(cfg, sft_steps: int, ppo_steps: int) -> dict[str, PhaseSchedule]:
    """{"sft": ..., "ppo": ...} over LR_SFT and LR_PPO, for each phase with steps > 0."""
    out = {}
    if sft_steps > 0:
        out["sft"] = PhaseSchedule(cfg, cfg.sft.lr, sft_steps)
    if ppo_steps > 0:
        out["ppo"] = PhaseSchedule(cfg, cfg.ppo.lr, ppo_steps)
    return out


# --------------------------------------------------------------------------------------
# docs


def optim_reference_markdown() -> str:
    """docs/optim.md, generated from OPTIMIZERS and SCHEDULERS."""
    lines = ["# Optimizers and learning-rate schedules", "",
             "Generated from `hybrid_ds/optim.py` by `python -m hybrid_ds.optim --docs`; do not edit by hand.", "",
             "One optimizer serves both phases; SFT and PPO each have a schedule of their own (peaks LR_SFT and",
             "LR_PPO) that sets the learning rate of every parameter group before each optimizer step. Biases and",
             "norm weights are in groups with weight decay 0. Names are case-insensitive.", "",
             "## Optimizers (`OPTIMIZER`)", "",
             "| name | package | class | keys used | CPU (bitsandbytes 0.50.2) | DeepSpeed offload | notes |",
             "|---|---|---|---|---|---|---|"]
    for s in OPTIMIZERS.values():
        fixed = ", ".join(f"{k}={v}" for k, v in s.fixed)
        cls = s.target.replace(":", ".") + (f"({fixed})" if fixed else "")
        off = _OFFLOAD_CLASSES.get(s.family)
        off = off.split(":")[1] if off else "not offloadable"
        lines.append(f"| `{s.name}` | {s.source} | `{cls}` | {', '.join(s.keys)} | {s.cpu} | {off} | {s.note} |")
    lines += ["", "When the DeepSpeed config offloads optimizer state (`offload_optimizer.device` cpu or nvme),",
              "DeepSpeed accepts only its own CPU optimizers: adam*/adamw* names become `DeepSpeedCPUAdam`",
              "(decoupled weight decay), lion* `DeepSpeedCPULion`, adagrad* `DeepSpeedCPUAdagrad`; the others",
              "are reported at validation. Under ZeRO, optimizers other than torch AdamW/Adagrad and DeepSpeed's",
              "own need `\"zero_allow_untested_optimizer\": true` (`deepspeed_optimizer_settings`).", "",
              "## Schedules (`SCHEDULER`)", "",
              "t = optimizer steps done in the phase, T = total steps (NUM_TRAINING_STEPS, else STEPS_PER_EPOCH ×",
              "EPOCHS, else derived from the run), W = warm-up steps (NUM_WARMUP_STEPS, else ⌈WARMUP_RATIO × T⌉),",
              "lr = the phase's learning rate. After T steps the last learning rate is held (reduce_on_plateau",
              "has no end).", "",
              "| name | style | keys used | learning rate at step t |", "|---|---|---|---|"]
    for s in SCHEDULERS.values():
        keys = ", ".join(s.keys) or "–"
        lines.append(f"| `{s.name}` | {s.style} | {keys} | {s.meaning} |")
    lines += ["", "Aliases: " + ", ".join(f"`{json.dumps(a) if not a else a}` = `{b}`"
                                          for a, b in SCHEDULER_ALIASES.items()) + " (and JSON `null`).", ""]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m hybrid_ds.optim --docs
    if sys.argv[1:] == ["--docs"]:
        sys.stdout.write(optim_reference_markdown())
    else:
        print("usage: python -m hybrid_ds.optim --docs")
