"""Learning-rate schedules: the table of every SCHEDULER name, its validation and warnings, and
:class:`PhaseSchedule`, one schedule per training phase driving a private shadow optimizer (see
:mod:`hybrid_ds.optim.optimizers` for why). Validation never imports torch."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

from hybrid_ds.optim.hparams import set_optimizer_hparams, unknown_name
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


def canonical_scheduler(name: str) -> str:
    key = str(name).strip().lower()
    return SCHEDULER_ALIASES.get(key, key)


def scheduler_spec(name: str) -> SchedSpec:
    """The table row of a SCHEDULER name (case-insensitive, aliases resolved); ValueError if unknown."""
    key = canonical_scheduler(name)
    if key not in SCHEDULERS:
        raise ValueError(unknown_name("scheduler", "SCHEDULER", str(name),
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


def _linear_with_warmup(step: int, *, warmup: int, total: int) -> float:
    """transformers' linear schedule (``_get_linear_schedule_with_warmup_lr_lambda``), term for term."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def _build_scheduler(name: str, opt, s, base_lr: float, total: int, warmup: int):
    """The torch/transformers scheduler of ``name`` attached to the shadow optimizer ``opt``."""
    from torch.optim import lr_scheduler as sch

    # linear (the default) and constant are built here, the same LambdaLR as transformers builds:
    # importing transformers.optimization imports peft and bitsandbytes (through
    # transformers.trainer_utils), seconds of every process's start. tests/test_optim.py compares them.
    if name == "linear":
        return sch.LambdaLR(opt, functools.partial(_linear_with_warmup, warmup=warmup, total=total))
    if name == "constant":
        return sch.LambdaLR(opt, _constant)
    from transformers import optimization as tfo

    if name == "cosine":
        return tfo.get_cosine_schedule_with_warmup(opt, warmup, total, num_cycles=s.num_cycles)
    if name == "cosine_with_restarts":
        return tfo.get_cosine_with_hard_restarts_schedule_with_warmup(opt, warmup, total,
                                                                      num_cycles=int(s.num_cycles))
    if name == "polynomial":
        return tfo.get_polynomial_decay_schedule_with_warmup(opt, warmup, total, lr_end=s.lr_floor,
                                                             power=s.poly_power)
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
    for phase, lr, steps in (("sft", cfg.sft.lr, sft_steps), ("ppo", cfg.ppo.lr, ppo_steps)):
        if steps > 0:
            try:
                out[phase] = PhaseSchedule(cfg, lr, steps)
            except ValueError as e:  # name the phase: SFT and PPO share SCHEDULER but not their step counts
                raise ValueError(f"{phase.upper()} phase ({steps} optimizer steps): {e}") from None
    return out
