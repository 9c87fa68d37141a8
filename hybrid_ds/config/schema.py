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
import json
from dataclasses import dataclass, field
from typing import Any, Optional, Union, get_type_hints

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
    mode: str = opt("hybrid", "Training mode: sft, ppo, hybrid (SFT steps interleaved with HYBRID_RL updates), dpo "
                              "(DPO on preference pairs) or rm (a reward model trained on preference pairs); "
                              "docs/preference.md.", choices=("sft", "ppo", "hybrid", "dpo", "rm"))
    model: str = opt("", "Base model: a local directory, a hub name, or builtin:tiny-gpt2 (shipped, no download).",
                     required=True)
    tokenizer: str = opt("", "Tokenizer to load; empty means the MODEL's own.")
    train_file: str = opt("", "Training data: JSON list, JSONL, a local datasets file/dir, a Hugging Face hub dataset "
                              "id (org/name; docs/data.md), or builtin:demo-tasks.", required=True)
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
    # -- checkpoints, resume, faults (hybrid_ds/run/checkpoint.py, run/resume.py) --
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
    dataset_config: str = opt("", "The configuration (subset) of a dataset directory or hub dataset id in TRAIN_FILE "
                                  "or EVAL_FILE (datasets.load_dataset's name); empty = its default one.",
                              key="DATASET_CONFIG")
    on_bad_item: str = opt("error", "A malformed data item: error (name it and stop) or skip (count and log).",
                           choices=("error", "skip"))
    data_format: str = opt("auto", "Shape of the items (docs/data.md): fields (SELECT_OUTPUT is the target, the "
                                   "other fields the prompt), text, prompt_completion, messages; auto = detected "
                                   "per file.", choices=("auto", "fields", "text", "prompt_completion", "messages"))
    prompt_template: str = opt("", "fields format: the prompt as a template over item fields, e.g. "
                                   "\"Q: {question}\\nA: \" (plain {field} names only); empty = the seed's "
                                   "### Prompt: template.")
    chat_template: str = opt("", "Conversations: a Jinja chat template file to render them with; none = the plain "
                                 "### Role: rendering; empty = the tokenizer's own template if it has one.")
    # -- evaluation on held-out data (hybrid_ds/algorithms/evaluate.py, docs/data.md) --
    eval_file: str = opt("", "Held-out data, evaluated (eval/loss, and eval/reward_mean of greedy responses outside "
                             "MODE=sft) at EVAL_EVERY and at the end: the same formats and loaders as TRAIN_FILE; "
                             "empty = no evaluation.", key="EVAL_FILE")
    eval_split: str = opt("", "Split of EVAL_FILE when the datasets library loads it; empty = SPLIT.",
                          key="EVAL_SPLIT")
    eval_every: int = opt(0, "Evaluate every N steps (hybrid cycles in hybrid mode, SFT steps in sft mode, PPO "
                             "updates in ppo mode); 0 = only at the end. A run with EVAL_FILE is always evaluated "
                             "when it completes.", key="EVAL_EVERY", lo=0)
    eval_num_samples: int = opt(0, "Evaluate on the first N items of EVAL_FILE (file order); 0 = all.",
                                key="EVAL_NUM_SAMPLES", lo=0)


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
    kl_controller: str = opt("ziegler", "Adaptive KL rule: ziegler (beta moves by at most 0.2 x samples / KL_HORIZON "
                                        "per update) or pi (PI control of log beta on log(KL / TARGET_KL): reaches "
                                        "the target within tens of updates; docs/ppo.md section 8).",
                             key="KL_CONTROLLER", choices=("ziegler", "pi"))
    kl_kp: float = opt(0.5, "KL_CONTROLLER=pi: proportional gain.", key="KL_KP", lo=0.0)
    kl_ki: float = opt(0.2, "KL_CONTROLLER=pi: integral gain.", key="KL_KI", lo=0.0)
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
    ratio_guard: float = opt(10.0, "A micro-batch whose mean probability ratio exceeds this contributes no "
                                   "gradient (counted in ppo/skipped_microbatches).", key="RATIO_GUARD", lo=1.0)
    ptx_coef: float = opt(0.0, "PPO-ptx: add this times the SFT loss on a labelled batch to every PPO "
                               "optimizer step (DeepSpeed-Chat's mixture training); 0 = off.", key="PTX_COEF",
                          lo=0.0)
    advantage: str = opt("gae", "Advantage estimator: gae (value head + GAE), grpo (group-normalised scores), rloo "
                                "(leave-one-out group baseline) or reinforce_pp (batch-whitened returns); the last "
                                "three need no value head, which is then not built. See docs/ppo.md.",
                         key="ADVANTAGE", choices=("gae", "grpo", "rloo", "reinforce_pp"))
    num_generations: int = opt(1, "Responses sampled per prompt (a group, for grpo and rloo: at least 2); "
                                  "PPO_BATCH and PPO_MINI count prompts.", key="NUM_GENERATIONS", lo=1)
    group_std: bool = opt(True, "grpo: divide by the group's standard deviation (false: Dr. GRPO).",
                          key="GROUP_STD")
    loss_agg: str = opt("token_mean", "How token losses add up: token_mean (each token of a minibatch counts the "
                                      "same), seq_mean (each sequence's mean, averaged) or dr_grpo (sums over "
                                      "sequences x MAX_NEW_TOKENS).", key="LOSS_AGG",
                        choices=("token_mean", "seq_mean", "dr_grpo"))
    kl_in: str = opt("reward", "Where the KL to the reference acts: reward (a per-token penalty in the reward, "
                               "INIT_KL_COEF x KL_ESTIMATOR) or loss (beta x the k3 KL in the loss, as GRPO).",
                     key="KL_IN", choices=("reward", "loss"))
    refs: list = opt([], "Several references: [{\"model\": a model or \"policy\" (the run's own reference), \"weight\": "
                         "w > 0}, ...]; the KL is then the weighted sum of each one's KL (docs/ppo.md). [] = the run's "
                         "own reference alone.", key="REFS")
    env: str = opt("", "Multi-turn rollouts: a Python callable package.module:function (imported, never evaluated) "
                       "that gets the conversation so far and the item and returns the next user/tool message, or "
                       "None to end the dialogue; empty = one response per prompt. See docs/ppo.md.", key="ENV")
    max_turns: int = opt(1, "ENV: most policy turns per dialogue.", key="MAX_TURNS", lo=1)


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
    ref_sync_every: int = opt(-1, "Every N hybrid cycles, after the cycle's SFT steps, move the reference to the "
                                  "policy (REF_SYNC_ALPHA), so the KL is measured from where SFT took it; 0 = never; "
                                  "-1 = auto, resolved at load (config.json holds the result): 1 for MODE=hybrid "
                                  "with SFT steps in its cycles, REF_PLACEMENT=colocated and LORA_R=0, else 0 "
                                  "(README, Hybrid defaults).", key="REF_SYNC_EVERY", lo=-1)
    ref_sync_alpha: float = opt(1.0, "Reference sync: ref = alpha x policy + (1 - alpha) x ref (1 = copy; < 1 = an "
                                     "exponential moving average, as TR-DPO).", key="REF_SYNC_ALPHA", lo=0.0, hi=1.0,
                                lo_open=True)


@dataclass
class PrefConfig:
    """Preference pairs, DPO and the reward model (hybrid_ds/algorithms/dpo.py, rm.py; docs/preference.md)."""

    pref_file: str = opt("", "MODE=hybrid with HYBRID_RL=dpo: the preference pairs ({\"prompt\", \"chosen\", "
                             "\"rejected\"}, text or message lists; or builtin:demo-pairs); TRAIN_FILE holds the SFT "
                             "data. MODE=dpo and MODE=rm read their pairs from TRAIN_FILE.", key="PREF_FILE")
    hybrid_rl: str = opt("ppo", "MODE=hybrid: the phase interleaved with SFT: ppo (rollouts and a reward) or dpo (pairs "
                                "of PREF_FILE; CYCLE_PPO_UPDATES then counts DPO steps).", key="HYBRID_RL",
                         choices=("ppo", "dpo"))
    batch: int = opt(4, "Preference pairs per DPO or reward-model optimizer step, over all processes and "
                        "accumulation.", key="PREF_BATCH", lo=1)
    grad_accum: int = opt(1, "Micro-batches accumulated per DPO or reward-model optimizer step.",
                          key="PREF_GRAD_ACCUM", lo=1)
    lr: float = opt(5e-6, "Learning rate of the DPO and reward-model phases (peak of their schedule).",
                    key="LR_PREF", lo=0.0, lo_open=True)
    dpo_beta: float = opt(0.1, "DPO's beta (IPO's tau): the strength of the implicit KL to the reference.",
                          key="DPO_BETA", lo=0.0, lo_open=True)
    dpo_loss: str = opt("sigmoid", "DPO loss: sigmoid (Rafailov et al. 2023) or ipo (Azar et al. 2023, log-ratios "
                                   "averaged per token).", key="DPO_LOSS", choices=("sigmoid", "ipo"))
    dpo_label_smoothing: float = opt(0.0, "DPO_LOSS=sigmoid: the probability that a pair's labels are flipped "
                                          "(conservative DPO); 0 = plain DPO.", key="DPO_LABEL_SMOOTHING",
                                     lo=0.0, hi=0.49)


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
    sampler: str = opt("lean", "Rollout sampler: lean (hybrid_ds.rollout.sampler: generate's distribution with less "
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
    cyclic_mode: str = opt("triangular", "Cyclic policy (the seed configs' cyclic MODE; renamed because MODE is the "
                                         "run mode).", key="CYCLIC_MODE",
                           choices=("triangular", "triangular2", "exp_range"))
    plateau_mode: str = opt("min", "reduce_on_plateau: min or max of PLATEAU_METRIC (the seed configs' MODE).",
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
    plateau_eps: float = opt(1e-8, "reduce_on_plateau eps (the seed configs' EPS; renamed: EPS is the optimizer's).",
                             key="PLATEAU_EPS", lo=0.0)


@dataclass
class ModelConfig:
    torch_dtype: str = opt("auto", "Dtype the weights load and train in: auto (float32, or bfloat16/float16 with BF16/FP16 "
                                   "under DeepSpeed), float32, bfloat16 or float16.", key="TORCH_DTYPE",
                           choices=("auto", "float32", "bfloat16", "float16"))
    attn_implementation: str = opt("", "Attention kernel: sdpa, eager, flash_attention_2, flex_attention ...; empty "
                                       "= transformers' default for the model (sdpa where it supports it).",
                                   key="ATTN_IMPLEMENTATION")
    gradient_checkpointing: bool = opt(False, "Recompute the policy trunk's activations in the backward instead of "
                                              "keeping them (less memory, about a third more compute).",
                                       key="GRADIENT_CHECKPOINTING")


@dataclass
class LoraConfig:
    r: int = opt(0, "LoRA rank (peft; hybrid_ds/models/lora.py): train low-rank adapters on a frozen base instead of "
                    "every weight; the reference is then the same model with its adapters disabled (REF_INIT=start "
                    "only). 0 = off.",
                 key="LORA_R", lo=0)
    alpha: float = opt(16.0, "LoRA scaling numerator: the adapter's update is scaled by LORA_ALPHA / LORA_R.",
                       key="LORA_ALPHA", lo=0.0, lo_open=True)
    dropout: float = opt(0.0, "Dropout on the adapters' input while training (0 keeps PPO's log-probs "
                              "deterministic, docs/ppo.md).", key="LORA_DROPOUT", lo=0.0, hi=0.99)
    target_modules: Union[str, list] = opt("all-linear", "Modules that get adapters: \"all-linear\" (every linear "
                                                         "layer but the LM head) or a list of module names "
                                                         "(e.g. [\"q_proj\", \"v_proj\"]).",
                                           key="LORA_TARGET_MODULES")
    load_in_4bit: bool = opt(False, "QLoRA: load the frozen base quantised to 4-bit NF4 (bitsandbytes); needs LORA_R, "
                                    "not ZeRO-3. The outputs merge the adapters into the full-precision base.",
                             key="LOAD_IN_4BIT")
    load_in_8bit: bool = opt(False, "Load the frozen base quantised to 8-bit (bitsandbytes LLM.int8); needs LORA_R, "
                                    "not ZeRO-3.", key="LOAD_IN_8BIT")


#: REPORT_TO's trackers (Accelerate's tracker classes, hybrid_ds/engine/trackers.py) -> the pip package each needs.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}


@dataclass
class LogConfig:
    report_to: Union[str, list] = opt("tensorboard", "Experiment trackers the main rank logs metrics to, through "
                                                     "Accelerate's tracker API: tensorboard (OUTPUT_DIR/tensorboard), "
                                                     "wandb, mlflow, a list of them, or none. metrics.jsonl is "
                                                     "always written.", key="REPORT_TO")
    tracker_project: str = opt("hybrid_ds", "W&B project and MLflow experiment name (the run is named after "
                                            "OUTPUT_DIR).", key="TRACKER_PROJECT")
    log_samples_every: int = opt(10, "Every N PPO updates, a table of samples (prompt, response, reward and each "
                                     "REWARD component, KL, length) to OUTPUT_DIR/samples.jsonl and the trackers "
                                     "(TensorBoard text, W&B table); 0 = off.", key="LOG_SAMPLES_EVERY", lo=0)
    log_samples_rows: int = opt(8, "Rows per sample table: the first responses of the main rank's share of the "
                                   "batch.", key="LOG_SAMPLES_ROWS", lo=1)

    @property
    def trackers(self) -> list[str]:
        """REPORT_TO as a list of tracker names (empty for none)."""
        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        return [n for n in names if n != "none"]


@dataclass
class HeadsConfig:
    heads: list = opt([], "Task heads on the shared trunk (hybrid_ds/models/heads.py), trained with the SFT loss as "
                          "extra terms on items that carry their field: a list of {\"name\", \"type\": "
                          "\"classification\" | \"regression\", \"field\", \"num_labels\" (classification), "
                          "\"labels\" (optional: the names of labels 0..num_labels-1), \"weight\"}. Saved in "
                          "OUTPUT_DIR/heads/; a `head` reward leaf scores with one. [] = none.", key="HEADS")


@dataclass
class Config:
    """The whole run configuration (see docs/config.md for every key)."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    pref: PrefConfig = field(default_factory=PrefConfig)
    gen: GenConfig = field(default_factory=GenConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    log: LogConfig = field(default_factory=LogConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
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


SECTIONS = ("run", "data", "sft", "ppo", "hybrid", "pref", "gen", "model", "lora", "optim", "sched", "log",
            "heads")
ALIASES = {"ETA_MIN": "MIN_LR", "T_0": "T0"}  # other spellings: the seed configs' (examples/seed/), torch's argument names
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


def field_types() -> dict[str, Any]:
    types = {}
    for sec in SECTIONS:
        cls = {f.name: f for f in dataclasses.fields(Config)}[sec].default_factory
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            types[f.metadata.get("key") or f.name.upper()] = hints[f.name]
    types[REWARD_KEY] = dict
    return types










