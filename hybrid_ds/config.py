"""The run configuration: one JSON object of UPPER_CASE keys, loaded into typed dataclasses.

The JSON stays flat (the original design's keys keep their meaning); in code the keys are
grouped into sections (``cfg.sft.lr``, ``cfg.gen.top_p`` ...). Every field carries its JSON
key, a one-line doc and its bounds in ``metadata``; loading, validation, ``KEY=VALUE``
overrides and the generated reference (``docs/config.md``) all read that one table, so
they cannot drift apart.

Validation never imports torch and never touches a process group: it collects *every*
problem and raises one :class:`ConfigError` listing them all.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

# --------------------------------------------------------------------------------------
# field helper


def opt(default, doc, *, key=None, choices=None, lo=None, hi=None, lo_open=False, required=False):
    """A config field: ``default`` plus metadata used by loading, validation and the docs."""
    meta = dict(doc=doc, key=key, choices=choices, lo=lo, hi=hi, lo_open=lo_open, required=required)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    return field(default=default, metadata=meta)


class ConfigError(Exception):
    """One or more configuration problems; ``problems`` lists each as a line."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}")


# --------------------------------------------------------------------------------------
# sections


@dataclass
class RunConfig:
    mode: str = opt("hybrid", "Training mode: sft, ppo, or hybrid (SFT steps and PPO updates interleaved).",
                    choices=("sft", "ppo", "hybrid"))
    model: str = opt("", "Base model: a local directory, a hub name, or builtin:tiny-gpt2 (shipped, no download).",
                     required=True)
    tokenizer: str = opt("", "Tokenizer to load; empty means the MODEL's own.")
    train_file: str = opt("", "Training data: JSON list, JSONL, a local datasets file/dir, or builtin:demo-tasks.",
                          required=True)
    output_dir: str = opt("", "Where everything is written; a directory that already holds a run is resumed.",
                          required=True)
    seed: Optional[int] = opt(None, "Random seed; drawn from the OS when absent and recorded in config.json.",
                              lo=0, hi=2**32 - 1)
    epochs: int = opt(1, "Passes over the data.", lo=1)
    max_steps: int = opt(0, "Stop after this many steps (SFT steps in sft mode, PPO updates in ppo mode, "
                            "cycles in hybrid mode); 0 = run all EPOCHS.", lo=0)
    log_every: int = opt(1, "Write metrics every N steps (updates/cycles).", lo=1)
    cleanse: bool = opt(True, "Free allocator caches between phases (GPU only; no-op on CPU).")
    bf16: bool = opt(False, "bfloat16 mixed precision.")
    fp16: bool = opt(False, "float16 mixed precision with dynamic loss scaling.")
    zero_stage: int = opt(-1, "DeepSpeed ZeRO stage 0-3; -1 = take it from the launcher (accelerate config or "
                              "the deepspeed launcher, which defaults to 2), none for plain python/torchrun.",
                          lo=-1, hi=3)
    ds_config: str = opt("", "Path to a DeepSpeed JSON config (e.g. ds_configs/zero3_offload.json); "
                             "\"auto\" values in it are filled by hybrid_ds.")
    max_grad_norm: float = opt(1.0, "Gradient clipping by global norm; 0 disables.", lo=0.0)
    ref_placement: str = opt("colocated", "Where the frozen reference model runs: colocated (on every policy rank) "
                                          "or separate (on the last REF_RANKS ranks; docs/placement.md).",
                             choices=("colocated", "separate"))
    ref_ranks: int = opt(1, "Reference ranks with REF_PLACEMENT=separate; policy ranks = processes - REF_RANKS.",
                         lo=1)
    ref_timeout_s: float = opt(600.0, "Longest wait for a reference answer: a dead reference rank is noticed at "
                                      "once, a hung one after this many seconds.", lo=1.0)
    dist_timeout_s: int = opt(1800, "Timeout of collective operations, seconds: a dead rank ends the job "
                                    "after at most this long.", lo=10)
    # -- checkpoints, resume, faults (hybrid_ds/checkpoint.py) --
    save_every: int = opt(0, "Checkpoint every N steps (hybrid cycles in hybrid mode, SFT steps in sft mode, PPO "
                             "updates in ppo mode) under OUTPUT_DIR/checkpoints; 0 = only at the end (a "
                             "checkpoint is always written at the end and on SIGTERM/SIGINT).", lo=0)
    keep_last: int = opt(2, "Complete checkpoints to keep; older ones are deleted once a newer one is visible. "
                            "0 = keep all.", lo=0)
    resume: str = opt("auto", "auto: resume from the latest complete checkpoint in OUTPUT_DIR when there is one "
                              "(and say so); never: refuse an OUTPUT_DIR that already holds a run; fresh: move "
                              "an existing run aside to OUTPUT_DIR.prev-<time> and start over; or a checkpoint "
                              "directory (.../checkpoints/step-XXXXXXX) to resume from.")
    allow_config_change: list = opt([], "Keys allowed to differ from the checkpoint's config on resume (EPOCHS, "
                                        "MAX_STEPS, SAVE_EVERY, KEEP_LAST, LOG_EVERY and the other run-control "
                                        "keys always may).")
    max_nan_steps: int = opt(3, "Stop with an error after this many non-finite losses in a row (each one's "
                                "update is skipped).", lo=1)


@dataclass
class DataConfig:
    select_output: str = opt("output", "Name of the field that holds the target response.")
    percent: float = opt(100.0, "Use this percentage of the data.", lo=0.0, hi=100.0, lo_open=True)
    num_samples: int = opt(0, "Use this many items (overrides PERCENT when > 0).", lo=0)
    shuffle: bool = opt(True, "Shuffle the data with SEED (a yes/no flag; never a command).")
    maxseq: int = opt(1024, "Max tokens of prompt + response, at most the model's positions (n_positions); longer "
                            "SFT examples are truncated (and counted), PPO prompts keep their last MAXSEQ - "
                            "MAX_NEW_TOKENS tokens.", lo=8)
    split: str = opt("train", "Split to use when TRAIN_FILE is loaded with the datasets library.")
    on_bad_item: str = opt("error", "A malformed data item: error (name it and stop) or skip (count and log).",
                           choices=("error", "skip"))


@dataclass
class SFTConfig:
    batch: int = opt(4, "SFT batch: sequences per optimizer step, over all processes and accumulation.",
                     key="SFT_BATCH", lo=1)
    lr: float = opt(5e-5, "SFT learning rate (peak of its schedule).", key="LR_SFT", lo=0.0, lo_open=True)
    grad_accum: int = opt(1, "Micro-batches accumulated per SFT optimizer step.", key="GRAD_ACCUM", lo=1)


@dataclass
class PPOConfig:
    batch: int = opt(4, "Prompts per PPO update, over all processes.", key="PPO_BATCH", lo=1)
    mini: int = opt(0, "PPO minibatch (prompts per optimizer step); 0 = PPO_BATCH.", key="PPO_MINI", lo=0)
    grad_accum: int = opt(1, "Micro-batches accumulated per PPO optimizer step.", key="PPO_GRAD_ACCUM", lo=1)
    epochs: int = opt(4, "Passes over each rollout batch (reshuffled each pass).", key="PPO_EPOCHS", lo=1)
    lr: float = opt(1e-5, "PPO learning rate (policy and value head).", key="LR_PPO", lo=0.0, lo_open=True)
    target_kl: float = opt(0.3, "KL (nats per response, k1) the adaptive controller aims for.", key="TARGET_KL",
                           lo=0.0, lo_open=True)
    init_kl_coef: float = opt(0.2, "Initial KL penalty coefficient beta.", key="INIT_KL_COEF", lo=0.0)
    adaptive_kl: bool = opt(True, "Adapt beta toward TARGET_KL (Ziegler et al. 2019); false keeps it fixed.",
                            key="ADAPTIVE_KL")
    kl_horizon: int = opt(10000, "Horizon of the adaptive KL controller, in samples.", key="KL_HORIZON", lo=1)
    kl_estimator: str = opt("k1", "Per-token KL estimator in the reward: k1 (unbiased) or k3 (low variance).",
                            key="KL_ESTIMATOR", choices=("k1", "k2", "k3"))
    clip_range: float = opt(0.2, "PPO ratio clip.", key="CLIP_RANGE", lo=0.0, lo_open=True)
    clip_range_value: float = opt(0.2, "Value clip around the old values.", key="CLIP_RANGE_VALUE", lo=0.0,
                                  lo_open=True)
    vf_coef: float = opt(0.1, "Weight of the value loss.", key="VF_COEF", lo=0.0)
    entropy_coef: float = opt(0.0, "Weight of the entropy bonus.", key="ENTROPY_COEF", lo=0.0)
    discount: float = opt(1.0, "GAE discount gamma.", key="DISCOUNT", lo=0.0, hi=1.0)
    gae_lambda: float = opt(0.95, "GAE lambda.", key="GAE_LAMBDA", lo=0.0, hi=1.0)
    whiten_rewards: bool = opt(False, "Whiten (scale, no shift) per-token rewards across ranks.",
                               key="WHITEN_REWARDS")
    score_clip: float = opt(10.0, "Clip task scores to +-this; 0 disables.", key="SCORE_CLIP", lo=0.0)
    missing_eos_penalty: Optional[float] = opt(None, "Subtract this from the score of a response that hit "
                                                     "MAX_NEW_TOKENS without EOS.", key="MISSING_EOS_PENALTY",
                                               lo=0.0)
    ratio_guard: float = opt(10.0, "Skip a minibatch whose mean ratio exceeds this.", key="RATIO_GUARD", lo=1.0)
    ptx_coef: float = opt(0.0, "PPO-ptx: add this times the SFT loss on a labelled batch to every PPO "
                               "optimizer step (DeepSpeed-Chat's mixture training); 0 = off.", key="PTX_COEF",
                          lo=0.0)


@dataclass
class HybridConfig:
    cycle_sft_steps: int = opt(1, "SFT steps per hybrid cycle.", key="CYCLE_SFT_STEPS", lo=0)
    cycle_ppo_updates: int = opt(1, "PPO updates per hybrid cycle.", key="CYCLE_PPO_UPDATES", lo=0)
    curriculum: str = opt("none", "SFT->PPO curriculum over the hybrid cycles: none, linear or step "
                                  "(from CYCLE_SFT_STEPS/CYCLE_PPO_UPDATES to the *_END values).",
                          key="CURRICULUM", choices=("none", "linear", "step"))
    curriculum_sft_steps_end: int = opt(1, "SFT steps of the last cycle under CURRICULUM.",
                                        key="CURRICULUM_SFT_STEPS_END", lo=0)
    curriculum_ppo_updates_end: int = opt(1, "PPO updates of the last cycle under CURRICULUM.",
                                          key="CURRICULUM_PPO_UPDATES_END", lo=0)
    curriculum_stages: int = opt(4, "Stages of CURRICULUM=step.", key="CURRICULUM_STAGES", lo=1)
    sft_warmup_steps: int = opt(0, "SFT-only steps before the first hybrid cycle (start SFT-heavy).",
                                key="SFT_WARMUP_STEPS", lo=0)
    ref_init: str = opt("start", "Reference model: start = a frozen copy of the starting policy; after_warmup = "
                                 "a snapshot of the policy after SFT_WARMUP_STEPS (use it when MODEL is not yet "
                                 "able to do the task, e.g. builtin:tiny-gpt2).", key="REF_INIT",
                        choices=("start", "after_warmup"))


@dataclass
class GenConfig:
    max_new_tokens: int = opt(128, "Max generated tokens per response; below MAXSEQ (ppo and hybrid modes).",
                              key="MAX_NEW_TOKENS", lo=1)
    min_new_tokens: int = opt(0, "Generate at least this many tokens before EOS may end a response.",
                              key="MIN_NEW_TOKENS", lo=0)
    top_p: float = opt(0.9, "Nucleus sampling mass.", key="TOP_P", lo=0.0, hi=1.0, lo_open=True)
    top_k: int = opt(50, "Top-k sampling; 0 disables (50 matches transformers' generate default).",
                     key="TOP_K", lo=0)
    temperature: float = opt(0.7, "Sampling temperature (log-probs are computed at the same temperature).",
                             key="TEMPERATURE", lo=0.0, lo_open=True)
    no_repeat_ngram_size: int = opt(3, "Forbid repeating n-grams of this size; 0 disables.",
                                    key="NO_REPEAT_NGRAM_SIZE", lo=0)
    repetition_penalty: float = opt(1.15, "CTRL repetition penalty; 1.0 disables.", key="REPETITION_PENALTY",
                                    lo=0.0, lo_open=True)
    sampler: str = opt("lean", "Rollout sampler: lean (hybrid_ds.sampler: generate's distribution with less "
                               "per-step work, the draw restricted to the top-k candidates), lean_exact (the "
                               "same tokens as generate from the same seed) or hf (transformers generate).",
                       key="SAMPLER", choices=("lean", "lean_exact", "hf"))
    old_logprobs: str = opt("auto", "PPO's old log-probs and values: rollout = the lean sampler's own (no second "
                                    "forward; equal to one to fp32 rounding), recompute = a forward after the "
                                    "rollout, auto = rollout when SAMPLER is lean* and the policy runs in fp32 "
                                    "(in bf16/fp16 the cached decode rounds differently), else recompute.",
                            key="OLD_LOGPROBS", choices=("auto", "rollout", "recompute"))


@dataclass
class OptimConfig:
    name: str = opt("adamw", "Optimizer name (case-insensitive); see docs/optim.md.", key="OPTIMIZER")
    beta1: float = opt(0.9, "Adam/Lion beta1.", key="BETA1", lo=0.0, hi=1.0)
    beta2: float = opt(0.999, "Adam/Lion beta2.", key="BETA2", lo=0.0, hi=1.0)
    eps: float = opt(1e-8, "Optimizer epsilon.", key="EPS", lo=0.0)
    weight_decay: float = opt(0.01, "Weight decay (never applied to biases and norm weights).",
                              key="WEIGHT_DECAY", lo=0.0)
    initial_accumulator_value: float = opt(0.0, "Adagrad initial accumulator.", key="INITIAL_ACCUMULATOR_VALUE",
                                           lo=0.0)
    lr_decay: float = opt(0.0, "Adagrad learning-rate decay.", key="LR_DECAY", lo=0.0)
    alpha: float = opt(0.99, "RMSprop smoothing constant.", key="ALPHA", lo=0.0, hi=1.0)
    momentum: float = opt(0.0, "SGD/RMSprop momentum.", key="MOMENTUM", lo=0.0)
    centered: bool = opt(False, "RMSprop centered.", key="CENTERED")
    dampening: float = opt(0.0, "SGD dampening.", key="DAMPENING", lo=0.0)
    nesterov: bool = opt(False, "SGD Nesterov momentum.", key="NESTEROV")


@dataclass
class SchedConfig:
    name: str = opt("linear", "Learning-rate schedule (case-insensitive); see docs/optim.md.", key="SCHEDULER")
    num_training_steps: int = opt(0, "Total optimizer steps of each phase's schedule; 0 = derived from the run.",
                                  key="NUM_TRAINING_STEPS", lo=0)
    steps_per_epoch: int = opt(0, "With EPOCHS, another way to give the total steps.", key="STEPS_PER_EPOCH", lo=0)
    num_warmup_steps: int = opt(0, "Warm-up steps.", key="NUM_WARMUP_STEPS", lo=0)
    warmup_ratio: float = opt(0.0, "Warm-up as a fraction of the total steps.", key="WARMUP_RATIO", lo=0.0, hi=1.0)
    num_cycles: float = opt(0.5, "Cosine waves (cosine) or restarts (cosine_with_restarts).", key="NUM_CYCLES",
                            lo=0.0)
    poly_power: float = opt(1.0, "Polynomial decay power.", key="POLY_POWER", lo=0.0)
    lr_floor: float = opt(0.0, "Final learning rate of the polynomial and lambda schedules.", key="LR_FLOOR",
                          lo=0.0)
    step_size: int = opt(1000, "StepLR period.", key="STEP_SIZE", lo=1)
    gamma: float = opt(0.95, "StepLR/MultiStepLR/ExponentialLR/cyclic exp_range factor.", key="GAMMA", lo=0.0)
    milestones: list = opt([], "MultiStepLR milestones (steps).", key="MILESTONES")
    t_max: int = opt(0, "CosineAnnealingLR period; 0 = the total steps.", key="T_MAX", lo=0)
    min_lr: float = opt(0.0, "Minimum learning rate (cosineannealing eta_min, reduce_on_plateau min_lr).",
                        key="MIN_LR", lo=0.0)
    t0: int = opt(10, "CosineAnnealingWarmRestarts first period.", key="T0", lo=1)
    t_mult: int = opt(2, "CosineAnnealingWarmRestarts period multiplier.", key="T_MULT", lo=1)
    max_lr: float = opt(0.0, "OneCycle/cyclic peak; 0 = the phase's learning rate.", key="MAX_LR", lo=0.0)
    base_lr: float = opt(0.0, "Cyclic lower bound; 0 = a tenth of MAX_LR.", key="BASE_LR", lo=0.0)
    pct_start: float = opt(0.3, "OneCycle warm-up fraction.", key="PCT_START", lo=0.0, hi=1.0)
    anneal_strategy: str = opt("cos", "OneCycle annealing.", key="ANNEAL_STRATEGY", choices=("cos", "linear"))
    div_factor: float = opt(25.0, "OneCycle initial lr = max_lr / div_factor.", key="DIV_FACTOR", lo=0.0,
                            lo_open=True)
    final_div_factor: float = opt(1e4, "OneCycle final lr = initial / final_div_factor.", key="FINAL_DIV_FACTOR",
                                  lo=0.0, lo_open=True)
    three_phase: bool = opt(False, "OneCycle three-phase variant.", key="THREE_PHASE")
    base_momentum: float = opt(0.85, "OneCycle/cyclic lower momentum.", key="BASE_MOMENTUM", lo=0.0)
    max_momentum: float = opt(0.95, "OneCycle/cyclic upper momentum.", key="MAX_MOMENTUM", lo=0.0)
    cycle_momentum: bool = opt(True, "OneCycle/cyclic: also cycle momentum (beta1).", key="CYCLE_MOMENTUM")
    step_size_up: int = opt(2000, "Cyclic steps going up.", key="STEP_SIZE_UP", lo=1)
    step_size_down: int = opt(0, "Cyclic steps going down; 0 = STEP_SIZE_UP.", key="STEP_SIZE_DOWN", lo=0)
    cyclic_mode: str = opt("triangular", "Cyclic policy (the spec's cyclic MODE; renamed because MODE is the "
                                         "run mode).", key="CYCLIC_MODE",
                           choices=("triangular", "triangular2", "exp_range"))
    plateau_mode: str = opt("min", "reduce_on_plateau: min or max of PLATEAU_METRIC (the spec's MODE).",
                            key="PLATEAU_MODE", choices=("min", "max"))
    plateau_metric: str = opt("", "SFT metric that steps reduce_on_plateau (any sft/* key); empty = sft/loss. "
                                  "The PPO schedule steps on each minibatch's policy loss.", key="PLATEAU_METRIC")
    factor: float = opt(0.1, "reduce_on_plateau factor.", key="FACTOR", lo=0.0, hi=1.0, lo_open=True)
    patience: int = opt(10, "reduce_on_plateau patience.", key="PATIENCE", lo=0)
    threshold: float = opt(1e-4, "reduce_on_plateau threshold.", key="THRESHOLD", lo=0.0)
    threshold_mode: str = opt("rel", "reduce_on_plateau threshold mode.", key="THRESHOLD_MODE",
                              choices=("rel", "abs"))
    cooldown: int = opt(0, "reduce_on_plateau cooldown.", key="COOLDOWN", lo=0)
    last_epoch: int = opt(-1, "PyTorch's last_epoch: -1 starts each schedule at its first step; N >= 0 starts it "
                              "as if N + 1 optimizer steps were already done (e.g. to continue a schedule of "
                              "an earlier run).", key="LAST_EPOCH", lo=-1)
    plateau_eps: float = opt(1e-8, "reduce_on_plateau eps (the spec's EPS; renamed: EPS is the optimizer's).",
                             key="PLATEAU_EPS", lo=0.0)


@dataclass
class Config:
    """The whole run configuration (see docs/config.md for every key)."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    gen: GenConfig = field(default_factory=GenConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    reward: dict = field(default_factory=lambda: {"type": "cosine_sts"})

    # -- derived ------------------------------------------------------------------------
    @property
    def ppo_mini(self) -> int:
        return self.ppo.mini or self.ppo.batch

    def to_json_dict(self) -> dict:
        out = {}
        for key, (sec, f) in key_table().items():
            out[key] = getattr(getattr(self, sec), f.name) if sec else getattr(self, f.name)
        return out


SECTIONS = ("run", "data", "sft", "ppo", "hybrid", "gen", "optim", "sched")
ALIASES = {"ETA_MIN": "MIN_LR", "T_0": "T0"}  # torch's argument names (CosineAnnealingLR, ...WarmRestarts)
REWARD_KEY = "REWARD"


def key_table() -> dict[str, tuple[str, dataclasses.Field]]:
    """JSON key -> (section attribute, dataclass field). REWARD maps to ('', field)."""
    table: dict[str, tuple[str, dataclasses.Field]] = {}
    for sec in SECTIONS:
        cls = {f.name: f for f in dataclasses.fields(Config)}[sec].default_factory
        for f in dataclasses.fields(cls):
            key = f.metadata.get("key") or f.name.upper()
            assert key not in table, f"duplicate config key {key}"
            table[key] = (sec, f)
    table[REWARD_KEY] = ("", {f.name: f for f in dataclasses.fields(Config)}["reward"])
    return table


def _field_types() -> dict[str, Any]:
    types = {}
    for sec in SECTIONS:
        cls = {f.name: f for f in dataclasses.fields(Config)}[sec].default_factory
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            types[f.metadata.get("key") or f.name.upper()] = hints[f.name]
    types[REWARD_KEY] = dict
    return types


# --------------------------------------------------------------------------------------
# value coercion


_YES = {"yes", "true", "1", "y", "on"}
_NO = {"no", "false", "0", "n", "off"}


def _type_name(tp) -> str:
    if get_origin(tp) is Union:
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None)) + " (or null)"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", dict: "an object",
            list: "a list"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp) -> tuple[Any, Optional[str]]:
    """Return (value, problem). Accepts ints for floats; yes/no strings for booleans."""
    if get_origin(tp) is Union:
        if value is None:
            return None, None
        tp = next(a for a in get_args(tp) if a is not type(None))
    if tp is bool:
        if isinstance(value, bool):
            return value, None
        if isinstance(value, int) and value in (0, 1):
            return bool(value), None
        if isinstance(value, str) and value.strip().lower() in _YES | _NO:
            return value.strip().lower() in _YES, None
        hint = ""
        if isinstance(value, str) and (("/" in value) or value.strip().endswith((".sh", ".py")) or " " in value):
            hint = (" It looks like a command or script path: hybrid_ds never runs config strings; "
                    "shuffling is done in Python with SEED, so write true or false.")
        return value, f"{key}: expected true/false (or yes/no), got {value!r}.{hint}"
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                return value, f"{key}: {value} is not a finite number; write a finite value."
            return float(value), None
        if isinstance(value, str) and value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
            return value, f"{key}: {value!r} is not a finite number; write a finite value."
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        if isinstance(value, float) and value.is_integer():
            return int(value), None
    elif tp in (str, dict, list):
        if isinstance(value, tp):
            return value, None
    return value, f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}."


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from the command line; VALUE is JSON when it parses as JSON, else a string."""
    if "=" not in text:
        raise ConfigError([f"override {text!r}: expected KEY=VALUE (e.g. LR_SFT=1e-4)."], "command line")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().upper(), value


# --------------------------------------------------------------------------------------
# loading


def load_config(path: Optional[str], overrides: list[str] = (), *, check_files: bool = True,
                world_size: Optional[int] = None) -> Config:
    """Load ``path`` (a JSON object), apply ``KEY=VALUE`` overrides, build and validate a Config.

    Raises ConfigError listing every problem found. ``world_size`` (default: $WORLD_SIZE or 1)
    is used to check that batch sizes divide across processes x accumulation.
    """
    source = path or "command line"
    raw = read_config_file(path) if path else {}
    problems: list[str] = []
    for text in overrides:
        try:
            k, v = parse_override(text)
        except ConfigError as e:
            problems += e.problems
            continue
        raw[k] = v
    cfg, more = build_config(raw)
    problems += more
    normalise_paths(cfg)
    problems += validate(cfg, check_files=check_files, world_size=world_size)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def _pairs_refusing_duplicates(pairs: list) -> dict:
    """``object_pairs_hook`` of the config reader: a key written twice is an error, not "last one wins"."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _DuplicateKey(ValueError):
    pass


def read_config_file(path: str) -> dict:
    """The JSON object in ``path``; ConfigError for anything a file can do wrong (missing, a directory,
    not UTF-8, not JSON, a key written twice, nesting deeper than the parser goes, not an object)."""
    def fail(problem: str) -> ConfigError:
        return ConfigError([problem], path)

    try:
        with open(path, encoding="utf-8-sig") as f:
            raw = json.loads(f.read(), object_pairs_hook=_pairs_refusing_duplicates)
    except FileNotFoundError:
        raise fail(f"config file {path!r} does not exist.") from None
    except IsADirectoryError:
        raise fail(f"config file {path!r} is a directory; give the path of a JSON file.") from None
    except UnicodeDecodeError as e:
        raise fail(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                   f"save the config as UTF-8.") from None
    except _DuplicateKey as e:
        raise fail(f"{path}: key {e.args[0]!r} is written more than once (a duplicate key); keep one.") from None
    except json.JSONDecodeError as e:
        raise fail(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).") from None
    except RecursionError:
        raise fail(f"{path}: JSON nested too deeply to read; a config is one flat object of KEY: value "
                   f"pairs.") from None
    except OSError as e:
        raise fail(f"config file {path!r} cannot be read ({e.strerror or e}).") from None
    if not isinstance(raw, dict):
        raise fail(f"{path}: the config must be a JSON object of KEY: value pairs.")
    return raw


# Keys that name files or directories: ``~`` is expanded in every one of them when the config is
# loaded, so each consumer (validation, loading, the written config.json) sees the same path.
PATH_KEYS = ("MODEL", "TOKENIZER", "TRAIN_FILE", "OUTPUT_DIR", "DS_CONFIG", "RESUME")
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def normalise_paths(cfg: Config) -> None:
    """Expand ``~`` in every path key and in the reward spec's model paths; resolve DS_CONFIG
    (see :func:`resolve_ds_config`); give a perplexity reward without ``model`` the policy's MODEL."""
    table = key_table()
    for key in PATH_KEYS:
        sec, f = table[key]
        obj = getattr(cfg, sec)
        value = getattr(obj, f.name)
        if isinstance(value, str) and value.startswith("~"):
            setattr(obj, f.name, os.path.expanduser(value))
    if isinstance(cfg.run.ds_config, str) and cfg.run.ds_config:
        cfg.run.ds_config = resolve_ds_config(cfg.run.ds_config) or cfg.run.ds_config
    if isinstance(cfg.reward, dict) and isinstance(cfg.run.model, str):
        _fill_reward_models(cfg.reward, cfg.run.model)


def _fill_reward_models(spec: dict, policy_model: str) -> None:
    """In place: ``~`` expanded in every leaf's ``model``; ``perplexity`` leaves without ``model``
    score fluency under the policy's own base model (MODEL)."""
    for comp in spec.get("components") or []:
        if isinstance(comp, dict):
            _fill_reward_models(comp, policy_model)
    if spec.get("type") == "perplexity" and "model" not in spec and policy_model:
        spec["model"] = policy_model
    for k in ("model", "model_type", "checkpoint", "huggingface_config_path"):
        if isinstance(spec.get(k), str) and spec[k].startswith("~"):
            spec[k] = os.path.expanduser(spec[k])


def ds_config_names() -> list[str]:
    """Names of the DeepSpeed configs shipped in ds_configs/ (usable as DS_CONFIG=zero2)."""
    d = os.path.join(_REPO_ROOT, "ds_configs")
    return sorted(n[:-5] for n in os.listdir(d) if n.endswith(".json")) if os.path.isdir(d) else []


def resolve_ds_config(path: str) -> Optional[str]:
    """An absolute path for a DeepSpeed config named by DS_CONFIG or an accelerate yaml, or None.

    Tried in order: the path itself (relative to the working directory), relative to the repository
    (so ``ds_configs/zero2.json`` in ``launch/*.yaml`` works from any directory), and a bare name of a
    shipped config (``zero2`` = ``ds_configs/zero2.json``).
    """
    path = os.path.expanduser(path)
    candidates = [path]
    if not os.path.isabs(path):
        candidates.append(os.path.join(_REPO_ROOT, path))
        if os.sep not in path:
            candidates.append(os.path.join(_REPO_ROOT, "ds_configs", path if path.endswith(".json") else path + ".json"))
    for c in candidates:
        if os.path.isfile(c):
            return os.path.abspath(c)
    return None


def build_config(raw: dict) -> tuple[Config, list[str]]:
    """Map a flat dict of UPPER_CASE keys into a Config; return it with the problems found."""
    table, types = key_table(), _field_types()
    cfg, problems = Config(), []
    for key, value in raw.items():
        if str(key) != str(key).upper() and str(key).upper() in table:
            problems.append(f"{key}: keys are UPPER_CASE; write {str(key).upper()}.")
            continue
        ukey = ALIASES.get(str(key), str(key))
        if ukey not in table:
            near = difflib.get_close_matches(ukey, list(table) + list(ALIASES), n=1, cutoff=0.6)
            hint = f" Did you mean {near[0]}?" if near else " See docs/config.md for the valid keys."
            problems.append(f"{key}: unknown key.{hint}")
            continue
        sec, f = table[ukey]
        if ukey == "SCHEDULER" and value is None:
            value = "none"  # null, like "" and "no", means no schedule
        value, problem = _coerce(ukey, value, types[ukey])
        if problem:
            problems.append(problem)
            continue
        setattr(getattr(cfg, sec) if sec else cfg, f.name, value)
    return cfg, problems


# --------------------------------------------------------------------------------------
# validation


def _check_bounds(key: str, value, meta) -> Optional[str]:
    if value is None:
        return None
    if meta.get("choices") and value not in meta["choices"]:
        near = difflib.get_close_matches(str(value), meta["choices"], n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        return f"{key}: {value!r} is not one of {', '.join(map(str, meta['choices']))}.{hint}"
    lo, hi = meta.get("lo"), meta.get("hi")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
            return f"{key}: {value} is out of range; it must be {'>' if meta.get('lo_open') else '>='} {lo}."
        if hi is not None and value > hi:
            return f"{key}: {value} is out of range; it must be <= {hi}."
    return None


def env_world_size() -> int:
    """Processes the launcher started, known before any process group exists (placement.py keeps it
    readable after the policy ranks' WORLD_SIZE is rewritten)."""
    from hybrid_ds.placement import launch_world_size

    return launch_world_size()


def validate(cfg: Config, *, check_files: bool = True, world_size: Optional[int] = None) -> list[str]:
    """Every problem of a built Config: bounds, required keys, batch arithmetic, files, reward spec."""
    problems = []
    for key, (sec, f) in key_table().items():
        value = getattr(getattr(cfg, sec), f.name) if sec else getattr(cfg, f.name)
        if f.metadata.get("required") and not value:
            problems.append(f"{key}: required; {f.metadata['doc']}")
            continue
        p = _check_bounds(key, value, f.metadata)
        if p:
            problems.append(p)
    if cfg.run.bf16 and cfg.run.fp16:
        problems.append("BF16 and FP16: choose one mixed-precision mode, not both.")
    if cfg.gen.old_logprobs == "rollout" and cfg.gen.sampler == "hf":
        problems.append('OLD_LOGPROBS="rollout" needs the lean sampler (SAMPLER "lean" or "lean_exact"): '
                        'transformers generate returns no values; use "auto" or "recompute".')
    if not all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in cfg.sched.milestones):
        problems.append(f"MILESTONES: expected a list of positive integers, got {cfg.sched.milestones!r}.")
    if cfg.run.mode == "hybrid" and cfg.hybrid.cycle_sft_steps + cfg.hybrid.cycle_ppo_updates == 0:
        problems.append("CYCLE_SFT_STEPS and CYCLE_PPO_UPDATES are both 0: a hybrid cycle would do nothing.")
    if cfg.hybrid.curriculum != "none" and cfg.run.mode != "hybrid":
        problems.append(f"CURRICULUM ({cfg.hybrid.curriculum}) applies to MODE=hybrid only.")
    if cfg.hybrid.curriculum != "none" and cfg.hybrid.curriculum_sft_steps_end + cfg.hybrid.curriculum_ppo_updates_end == 0:
        problems.append("CURRICULUM_SFT_STEPS_END and CURRICULUM_PPO_UPDATES_END are both 0: the last cycles would do "
                        "nothing.")
    if cfg.hybrid.sft_warmup_steps and cfg.run.mode != "hybrid":
        problems.append(f"SFT_WARMUP_STEPS ({cfg.hybrid.sft_warmup_steps}) applies to MODE=hybrid only; "
                        f"for {cfg.run.mode} start from an SFT run's output instead.")
    if cfg.hybrid.ref_init == "after_warmup" and not (cfg.run.mode == "hybrid" and cfg.hybrid.sft_warmup_steps):
        problems.append("REF_INIT=after_warmup needs MODE=hybrid and SFT_WARMUP_STEPS > 0.")
    if cfg.gen.min_new_tokens > cfg.gen.max_new_tokens:
        problems.append(f"MIN_NEW_TOKENS ({cfg.gen.min_new_tokens}) exceeds MAX_NEW_TOKENS "
                        f"({cfg.gen.max_new_tokens}).")
    if cfg.run.mode != "sft" and cfg.gen.max_new_tokens >= cfg.data.maxseq:
        problems.append(f"MAX_NEW_TOKENS ({cfg.gen.max_new_tokens}) must be below MAXSEQ ({cfg.data.maxseq}): MAXSEQ "
                        f"bounds prompt + response, so PPO prompts keep their last MAXSEQ - MAX_NEW_TOKENS tokens.")
    from hybrid_ds.placement import placement_problems, policy_world_size

    launched = world_size or env_world_size()
    place = placement_problems(cfg.run.ref_placement, cfg.run.ref_ranks, launched)
    problems += place
    if cfg.run.ref_placement == "separate" and cfg.run.mode == "sft":
        problems.append("REF_PLACEMENT=separate with MODE=sft: SFT uses no reference model; use colocated.")
    if cfg.run.ref_placement == "separate" and cfg.hybrid.ref_init != "start":
        problems.append("REF_INIT=after_warmup needs the reference on the policy ranks (REF_PLACEMENT=colocated).")
    if not place:
        problems += batch_problems(cfg, policy_world_size(cfg.run.ref_placement, cfg.run.ref_ranks, launched))
    problems += _optim_sched_problems(cfg)
    problems += _reward_problems(cfg)
    if check_files:
        problems += _file_problems(cfg)
    return problems


def batch_problems(cfg: Config, world: int) -> list[str]:
    """Batch sizes must split exactly into processes x accumulation x micro-batch."""
    from hybrid_ds.batching import BatchPlan

    out = []
    uses_sft = cfg.run.mode in ("sft", "hybrid") or cfg.ppo.ptx_coef > 0
    uses_ppo = cfg.run.mode in ("ppo", "hybrid")
    if uses_sft:
        out += BatchPlan.problems("SFT_BATCH", cfg.sft.batch, world, cfg.sft.grad_accum, "GRAD_ACCUM")
    if uses_ppo:
        if cfg.ppo.mini and cfg.ppo.batch % cfg.ppo.mini:
            out.append(f"PPO_MINI ({cfg.ppo.mini}) must divide PPO_BATCH ({cfg.ppo.batch}).")
        elif cfg.ppo.batch % world:
            out.append(f"PPO_BATCH ({cfg.ppo.batch}) must be divisible by the {world} processes.")
        else:
            out += BatchPlan.problems("PPO_MINI" if cfg.ppo.mini else "PPO_BATCH", cfg.ppo_mini, world,
                                      cfg.ppo.grad_accum, "PPO_GRAD_ACCUM")
    return out


def _optim_sched_problems(cfg: Config) -> list[str]:
    try:
        from hybrid_ds.optim import validate_optim_config
    except ImportError:  # pragma: no cover - optim module is part of the package
        return []
    return validate_optim_config(cfg)


def _reward_problems(cfg: Config) -> list[str]:
    if cfg.run.mode == "sft":
        return []
    try:
        from hybrid_ds.rewards import validate_reward_spec
    except ImportError:  # pragma: no cover
        return []
    return validate_reward_spec(cfg.reward, path=REWARD_KEY)


_BUILTIN_DATA = ("builtin:demo-tasks",)


def _file_problems(cfg: Config) -> list[str]:
    from hybrid_ds.assets import BUILTIN_MODELS

    out = []
    tf = cfg.run.train_file
    if tf and tf not in _BUILTIN_DATA:
        if tf.startswith("builtin:"):
            out.append(f"TRAIN_FILE: unknown builtin dataset {tf!r}; available: {', '.join(_BUILTIN_DATA)}.")
        elif not os.path.exists(tf):
            out.append(f"TRAIN_FILE: {tf!r} does not exist (working directory {os.getcwd()}).")
        elif not (os.path.isfile(tf) or os.path.isdir(tf)):
            out.append(f"TRAIN_FILE: {tf!r} is not a regular file (a FIFO, socket or device); give a JSON/JSONL "
                       f"file, a datasets file or a save_to_disk directory.")
        elif os.path.isfile(tf) and not os.access(tf, os.R_OK):
            out.append(f"TRAIN_FILE: {tf!r} is not readable.")
    for key, name in (("MODEL", cfg.run.model), ("TOKENIZER", cfg.run.tokenizer)):
        if name:
            p = model_problem(key, name, BUILTIN_MODELS)
            if p:
                out.append(p)
    out_dir = cfg.run.output_dir
    problem = output_dir_problem(out_dir) if out_dir else None
    if problem:
        out.append(problem)
    else:  # a run already in OUTPUT_DIR: resumed, refused or moved aside per RESUME (checkpoint.py)
        from hybrid_ds.checkpoint import resume_problems

        out += resume_problems(cfg)
    launcher_ds = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if cfg.run.ds_config:
        out += ds_config_problems(cfg.run.ds_config)
    elif launcher_ds not in ("", "none"):  # deepspeed_config_file of an accelerate launch yaml
        out += ds_config_problems(launcher_ds, "deepspeed_config_file (accelerate config)")
    out += reward_path_problems(cfg.reward) if cfg.run.mode != "sft" else []
    return out


def output_dir_problem(path: str) -> Optional[str]:
    """Why OUTPUT_DIR cannot be created or written, or None. Probes with a temporary file in the
    directory (or its nearest existing ancestor), removed at once: nothing is left behind."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"OUTPUT_DIR: {path!r} exists and is not a directory."
    target = os.path.abspath(path)
    while not os.path.exists(target):
        target = os.path.dirname(target)
    if not os.path.isdir(target):
        return f"OUTPUT_DIR: {path!r} cannot be created: {target!r} is not a directory (a regular file)."
    try:
        fd, probe = tempfile.mkstemp(dir=target, prefix=".hybrid_ds-write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        what = "written" if target == os.path.abspath(path) else f"created (in {target})"
        return f"OUTPUT_DIR: {path!r} cannot be {what}: {e.strerror or e}."
    return None


def ds_config_problems(path: str, key: str = "DS_CONFIG") -> list[str]:
    """Why the DeepSpeed config ``path`` cannot be used: missing (see resolve_ds_config), not JSON."""
    found = resolve_ds_config(path)
    if found is None:
        return [f"{key}: {path!r} does not exist (working directory {os.getcwd()}); give a path or one of the "
                f"shipped names: {', '.join(ds_config_names())}."]
    try:
        with open(found, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, OSError) as e:
        return [f"{key}: {found} is not a readable JSON file ({e})."]
    if not isinstance(data, dict):
        return [f"{key}: {found} must hold a JSON object (a DeepSpeed config)."]
    return []


def reward_path_problems(spec: Any, path: str = REWARD_KEY) -> list[str]:
    """A reward leaf's model given as a local path (``./x``, ``/x``, ``~/x``) that does not exist."""
    if not isinstance(spec, dict):
        return []
    out = []
    for i, comp in enumerate(spec.get("components") or []):
        out += reward_path_problems(comp, f"{path}.components[{i}]")
    for k in ("model", "model_type", "checkpoint", "huggingface_config_path"):
        v = spec.get(k)
        if not (isinstance(v, str) and v.startswith((".", "/", "~"))):
            continue
        local = os.path.expanduser(v)
        if not os.path.exists(local):
            out.append(f"{path}.{k}: {v!r} does not exist (working directory {os.getcwd()}).")
        elif k in ("model", "model_type") and os.path.isdir(local) and not os.path.isfile(
                os.path.join(local, "config.json")):
            out.append(f"{path}.{k}: {v!r} is a directory without config.json; point it at a saved model.")
    return out


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def safetensors_problem(path: str) -> Optional[str]:
    """Why the safetensors file ``path`` is unusable (unreadable header, shorter than its header says),
    or None. Reads the header only: 8 bytes of header length, the JSON header, no tensor data."""
    import struct

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path} is truncated ({size} bytes, no safetensors header)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{path} is truncated or not a safetensors file (header of {n} bytes, file of {size})"
            header = json.loads(f.read(n))
    except OSError as e:
        return f"{path} cannot be read ({e.strerror or e})"
    except ValueError:
        return f"{path} is not a safetensors file (its header is not JSON)"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        return f"{path} is truncated: its header describes {8 + n + end} bytes, the file has {size}"
    return None


def weight_file_problems(model_dir: str) -> list[str]:
    """Problems of the weight files of a local model directory, found without loading them."""
    present = [f for f in _WEIGHT_FILES if os.path.isfile(os.path.join(model_dir, f))]
    if not present:
        return [f"{model_dir} has config.json but no weights ({' or '.join(_WEIGHT_FILES[::2])}); "
                f"copy the whole saved model"]
    out = []
    for index in (f for f in present if f.endswith(".index.json")):
        try:
            with open(os.path.join(model_dir, index), encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            out.append(f"{os.path.join(model_dir, index)} is not a weight index ({type(e).__name__}: {e})")
            continue
        missing = [s for s in shards if not os.path.isfile(os.path.join(model_dir, s))]
        if missing:
            out.append(f"{model_dir}: shard(s) {', '.join(missing)} listed in {index} are missing")
        out += [p for s in shards if s.endswith(".safetensors") and s not in missing
                for p in [safetensors_problem(os.path.join(model_dir, s))] if p]
        return out
    if "model.safetensors" in present:
        p = safetensors_problem(os.path.join(model_dir, "model.safetensors"))
        out += [p] if p else []
    elif os.path.getsize(os.path.join(model_dir, "pytorch_model.bin")) == 0:
        out.append(f"{os.path.join(model_dir, 'pytorch_model.bin')} is empty")
    return out


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def model_problem(key: str, name: str, builtins) -> Optional[str]:
    """None if ``name`` can be loaded: a builtin, a local model dir, or a hub name (cached when offline)."""
    if name.startswith("builtin:"):
        if name not in builtins:
            return f"{key}: unknown builtin model {name!r}; available: {', '.join(builtins)}."
        return None
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            return f"{key}: {name!r} is a directory without config.json; point it at a saved Hugging Face model."
        if key == "MODEL":
            weights = weight_file_problems(expanded)
            return f"{key}: " + "; ".join(weights) + "." if weights else None
        return None
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not _HUB_NAME.match(name):
        return f"{key}: {name!r} does not exist (not a local directory, not a hub model name)."
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        try:
            from huggingface_hub import try_to_load_from_cache
            if isinstance(try_to_load_from_cache(name, "config.json"), str):
                return None
        except Exception:
            pass
        return (f"{key}: {name!r} is not a local directory and is not in the Hugging Face cache, and the hub "
                f"is offline (HF_HUB_OFFLINE=1). Point {key} at a local model directory or builtin:tiny-gpt2.")
    return None


# --------------------------------------------------------------------------------------
# docs


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
    types = _field_types()
    lines = ["# Configuration reference", "",
             "Generated from `hybrid_ds/config.py` by `python -m hybrid_ds.config --docs`; do not edit by hand.",
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
        lines.append(f"| `{key}` | {_type_name(types[key])} | {_fmt_default(f)} | {doc}{extra} |")
    lines += ["", "Aliases: " + ", ".join(f"`{a}` = `{b}`" for a, b in ALIASES.items()) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m hybrid_ds.config --docs
    import sys

    if sys.argv[1:] == ["--docs"]:
        sys.stdout.write(config_reference_markdown())
    else:
        print("usage: python -m hybrid_ds.config --docs")
