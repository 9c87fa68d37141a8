"""The run: set everything up, then loop over SFT steps, PPO updates or hybrid cycles.

Read top to bottom: ``build_run`` creates the pieces (data, models, optimizer, schedules, reward,
logger); ``train`` walks the schedule of the chosen MODE, each step one call into its phase module
(sft.py, ppo.py); ``save_outputs`` writes ``inference_lm/`` and ``ppo_full/``.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from hybrid_ds.checkpoint import check_finite
from hybrid_ds import curriculum
from hybrid_ds.config import Config, ConfigError
from hybrid_ds.data import BatchStream, DataReport, Example, load_items, rank_slice, tokenize_items


@dataclass
class Schedule:
    """How many of each unit the run does, derived once from the config and the data."""

    sft_steps: int  # SFT optimizer steps in the whole run
    ppo_updates: int  # PPO updates (rollout + epochs) in the whole run
    cycles: int  # hybrid cycles (0 outside hybrid mode)
    ppo_optimizer_steps: int  # PPO optimizer steps = updates x epochs x minibatches per batch

    def describe(self) -> str:
        parts = []
        if self.cycles:
            parts.append(f"{self.cycles} hybrid cycles")
        if self.sft_steps:
            parts.append(f"{self.sft_steps} SFT steps")
        if self.ppo_updates:
            parts.append(f"{self.ppo_updates} PPO updates ({self.ppo_optimizer_steps} optimizer steps)")
        return ", ".join(parts)


def plan_schedule(cfg: Config, n_examples: int) -> Schedule:
    """Steps per phase: MAX_STEPS when given, else EPOCHS passes over the data (see config docs)."""
    mode, h = cfg.run.mode, cfg.hybrid
    minis = cfg.ppo.batch // cfg.ppo_mini
    if mode == "sft":
        steps = cfg.run.max_steps or cfg.run.epochs * (n_examples // cfg.sft.batch)
        return Schedule(steps, 0, 0, 0)
    if mode == "ppo":
        updates = cfg.run.max_steps or cfg.run.epochs * (n_examples // cfg.ppo.batch)
        return Schedule(0, updates, 0, updates * cfg.ppo.epochs * minis)
    per_cycle = cfg.sft.batch * h.cycle_sft_steps if h.cycle_sft_steps else cfg.ppo.batch * h.cycle_ppo_updates
    cycles = cfg.run.max_steps or cfg.run.epochs * max(1, n_examples // per_cycle)
    mixes = curriculum.plan(cfg, cycles)
    updates = sum(p for _, p in mixes)
    return Schedule(h.sft_warmup_steps + sum(n for n, _ in mixes), updates, cycles,
                    updates * cfg.ppo.epochs * minis)


@dataclass
class Run:
    """Everything the phases share."""

    cfg: Config
    dist: Any
    tokenizer: Any
    examples: list[Example]
    engine: Any  # dist.TrainEngine of the PolicyValue model
    ref: Any  # frozen reference model (None in sft mode)
    reward: Any  # hybrid_ds.rewards.Reward (None in sft mode)
    schedules: dict  # phase -> optim.PhaseSchedule
    kl_ctl: Any  # ppo_math KL controller (None in sft mode)
    logger: Any
    plan: Schedule
    seed: int = 0
    ref_client: Any = None  # refproto.RefClient when the reference runs on its own ranks
    sft_stream: Optional[BatchStream] = None
    ppo_stream: Optional[BatchStream] = None
    counters: dict = field(default_factory=lambda: {"sft_step": 0, "ppo_update": 0, "cycle": 0})
    guard: Any = None  # checkpoint.Guard (signals, last checkpoint), set by checkpoint.attach

    def seed_for(self, tag: str, step: int) -> int:
        """A reproducible seed for ``tag`` at ``step`` on this rank (resumable: no hidden RNG state)."""
        return (self.seed * 1_000_003 + zlib.crc32(tag.encode()) * 1009 + step * 7919 + self.dist.rank) % 2**31


# --------------------------------------------------------------------------------------
# setup


def prepare_data(cfg: Config, tokenizer, seed: int, report: Optional[DataReport] = None) -> list[Example]:
    d = cfg.data
    items = load_items(cfg.run.train_file, d.select_output, split=d.split, shuffle=d.shuffle, seed=seed,
                       percent=d.percent, num_samples=d.num_samples, on_bad_item=d.on_bad_item, report=report)
    return tokenize_items(items, tokenizer, d.select_output, d.maxseq, report)


@dataclass
class Preflight:
    """What the checks before training found and built: shared by --dry-run and build_run."""

    seed: int  # the seed the data was shuffled with
    tokenizer: Any
    examples: list[Example]
    report: DataReport
    plan: Schedule
    schedules: dict  # phase -> optim.PhaseSchedule
    warnings: list[str]  # valid but probably unintended settings, with their numbers


def preflight(cfg: Config, seed: int) -> Preflight:
    """Every check the run makes before it loads weights or creates a process group.

    Config validation (``load_config``) has already checked keys, bounds, files, OUTPUT_DIR and the
    weight files' headers; here come the checks that need the tokenizer, the model's config and the
    data: the tokenizer loads and has EOS, MAXSEQ fits the model's positions, the data reads and
    tokenises, the batches fit the items actually kept, the schedules can be built. Each user-caused
    problem raises ConfigError or DataError (train.py: exit 2, one message).
    """
    from hybrid_ds.model import ModelFileError, load_model_config, load_tokenizer, max_positions
    from hybrid_ds.optim import make_phase_schedules, schedule_warnings

    # 1. tokenizer and the model's config
    problems = []
    tok_key, tok_name = ("TOKENIZER", cfg.run.tokenizer) if cfg.run.tokenizer else ("MODEL", cfg.run.model)
    tokenizer = None
    try:
        tokenizer = load_tokenizer(tok_name)
    except Exception as e:  # noqa: BLE001 - a user's tokenizer files: name them and give the loader's reason
        text = str(e).strip()
        problems.append(f"{tok_key}: the tokenizer of {tok_name!r} cannot be used "
                        f"({text.splitlines()[0] if text else type(e).__name__}).")
    try:
        n_pos = max_positions(load_model_config(cfg.run.model))
        if n_pos and cfg.data.maxseq > n_pos:
            problems.append(f"MAXSEQ ({cfg.data.maxseq}) exceeds the {n_pos} positions of MODEL {cfg.run.model!r} "
                            f"(n_positions / max_position_embeddings); set MAXSEQ <= {n_pos}.")
    except ModelFileError as e:
        problems.append(f"MODEL: {e}.")
    if problems:
        raise ConfigError(problems, "the model and tokenizer")

    # 2. the data, through the tokenisation the run uses
    report = DataReport()
    examples = prepare_data(cfg, tokenizer, seed, report)
    plan = plan_schedule(cfg, len(examples))

    # 3. batches against the items kept, the schedules over the run's steps
    n = len(examples)
    if (plan.sft_steps or cfg.ppo.ptx_coef > 0) and cfg.sft.batch > n:
        problems.append(f"SFT_BATCH ({cfg.sft.batch}) is larger than the {n} usable items of TRAIN_FILE; lower "
                        f"SFT_BATCH or use more data.")
    if plan.ppo_updates and cfg.ppo.batch > n:
        problems.append(f"PPO_BATCH ({cfg.ppo.batch}) is larger than the {n} usable items of TRAIN_FILE; lower "
                        f"PPO_BATCH or use more data.")
    if problems:
        raise ConfigError(problems, "the data")
    try:  # the schedules' totals come from the data, so some checks can only run here
        schedules = make_phase_schedules(cfg, plan.sft_steps, plan.ppo_optimizer_steps)
    except ValueError as e:
        raise ConfigError([str(e).replace("\n", " ")], "the run's schedule") from None
    steps = {"LR_SFT": plan.sft_steps, "LR_PPO": plan.ppo_optimizer_steps}
    warnings = schedule_warnings(cfg, {k: v for k, v in steps.items() if v > 0})
    return Preflight(seed, tokenizer, examples, report, plan, schedules, warnings)


def build_run(cfg: Config, dist, seed: int, ref_client=None, pre: Optional[Preflight] = None) -> Run:
    """Models, optimizer, reward and logger on top of ``pre`` (the checks of :func:`preflight`,
    repeated here when they ran with another seed)."""
    from hybrid_ds.metrics import MetricsLogger
    from hybrid_ds.model import PolicyValue, build_param_groups, load_lm
    from hybrid_ds.optim import build_optimizer

    torch.manual_seed(seed + 1000 * dist.rank)  # per-rank seed: sampling differs across ranks
    if pre is None or pre.seed != seed:
        pre = preflight(cfg, seed)
    tokenizer, examples, plan, schedules = pre.tokenizer, pre.examples, pre.plan, pre.schedules
    if dist.is_main:
        for line in pre.report.lines():
            print(f"[hybrid_ds] data: {line}")
        for line in pre.warnings:
            print(f"[hybrid_ds] warning: {line}")
    rl = cfg.run.mode != "sft"

    # Models: policy+value trunk (trainable), reference (frozen copy of the start).
    lm = load_lm(cfg.run.model, tokenizer)  # under ZeRO-3, Accelerate's DeepSpeed plugin partitions it at load
    model = PolicyValue(lm, seed=seed)
    colocated_ref = rl and ref_client is None  # else the reference answers from its own ranks
    ref = load_lm(cfg.run.model, tokenizer) if colocated_ref else None
    optimizer = build_optimizer(build_param_groups(model, cfg.optim.weight_decay), cfg, cfg.sft.lr,
                                ds_config=dist.ds_config)
    engine = dist.prepare_trainable(model, optimizer)
    ref = dist.prepare_frozen(ref) if colocated_ref else None

    reward = kl_ctl = None
    if rl:
        from hybrid_ds.ppo_math import make_kl_controller
        from hybrid_ds.rewards import make_reward

        reward = make_reward(cfg.reward, device=str(dist.device), all_reduce_sum=dist.all_reduce_sum)
        kl_ctl = make_kl_controller(cfg.ppo.init_kl_coef, cfg.ppo.target_kl, cfg.ppo.kl_horizon,
                                    adaptive=cfg.ppo.adaptive_kl)
    total = plan.cycles or plan.sft_steps or plan.ppo_updates
    logger = MetricsLogger(cfg.run.output_dir, enabled=dist.is_main, total=total, desc=cfg.run.mode)
    run = Run(cfg, dist, tokenizer, examples, engine, ref, reward, schedules, kl_ctl, logger, plan, seed=seed,
              ref_client=ref_client)
    if plan.sft_steps or cfg.ppo.ptx_coef > 0:
        run.sft_stream = BatchStream(len(examples), cfg.sft.batch, seed, cfg.data.shuffle)
    if plan.ppo_updates:
        run.ppo_stream = BatchStream(len(examples), cfg.ppo.batch, seed + 1, cfg.data.shuffle)
    return run


def serve_reference(cfg: Config, placement, bridge) -> int:
    """Main loop of a reference rank (REF_PLACEMENT=separate): load the frozen reference, answer
    log-prob requests from its policy ranks until they all shut down, exit."""
    from hybrid_ds.model import load_lm, load_tokenizer
    from hybrid_ds.refproto import RefServer, model_logprob_fn

    dev = torch.device("cuda", placement.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dtype = torch.bfloat16 if cfg.run.bf16 else torch.float16 if cfg.run.fp16 else torch.float32
    ref = load_lm(cfg.run.model, load_tokenizer(cfg.run.tokenizer or cfg.run.model), dtype=dtype)
    ref = ref.to(dev).eval().requires_grad_(False)
    chunk = len(bridge.clients) * max(1, cfg.ppo_mini // (placement.policy_world * cfg.ppo.grad_accum))
    os.makedirs(cfg.run.output_dir, exist_ok=True)  # operators (and tests) find the process here
    with open(os.path.join(cfg.run.output_dir, f"reference-rank-{placement.rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    stats = RefServer(bridge, model_logprob_fn(ref, chunk=chunk, device=dev)).serve()
    from hybrid_ds.dist import peak_rss_mb

    print(f"[hybrid_ds] reference rank {placement.rank}: served {stats.requests} requests, "
          f"peak_rss_mb {peak_rss_mb():.1f}", flush=True)
    return 0


# --------------------------------------------------------------------------------------
# the loop


def _batch(run: Run, stream: BatchStream) -> list[Example]:
    """This rank's share of the next global batch of ``stream``."""
    idx = rank_slice(stream.next(), run.dist.rank, run.dist.world)
    return [run.examples[i] for i in idx]


def do_sft_step(run: Run) -> dict:
    from hybrid_ds.sft import sft_step

    sched = run.schedules["sft"]
    m = sft_step(run.engine, _batch(run, run.sft_stream), accum=run.cfg.sft.grad_accum, lr=sched.lr,
                 pad_id=run.tokenizer.pad_token_id, dist=run.dist, momentum=sched.momentum)
    sched.step(m.get(run.cfg.sched.plateau_metric or "sft/loss"))
    run.counters["sft_step"] += 1
    check_finite(run, "sft", m)  # a non-finite loss: its update was skipped; counted, limited
    return m


def do_ppo_update(run: Run) -> dict:
    from hybrid_ds.ppo import ppo_update

    ptx = _batch(run, run.sft_stream) if run.cfg.ppo.ptx_coef > 0 else None
    kl_before = run.kl_ctl.state_dict()
    m = ppo_update(run, _batch(run, run.ppo_stream), ptx_examples=ptx)
    run.counters["ppo_update"] += 1
    check_finite(run, "ppo", m, kl_before)  # non-finite: update skipped, KL controller kept
    return m


def train(run: Run) -> None:
    """Walk the run's schedule: SFT steps, PPO updates, or hybrid cycles of both.

    Every loop runs from the counters (restored on resume) to the plan's end; after each step
    ``at_boundary`` writes SAVE_EVERY checkpoints and, after SIGTERM/SIGINT, stops all ranks together.
    """
    from hybrid_ds.checkpoint import at_boundary

    cfg, plan, log, c = run.cfg, run.plan, run.logger, run.counters
    if cfg.run.mode == "sft":
        while c["sft_step"] < plan.sft_steps:
            m = do_sft_step(run)
            _log(run, run.counters["sft_step"], "sft", m)
            if at_boundary(run):
                return
    elif cfg.run.mode == "ppo":
        while c["ppo_update"] < plan.ppo_updates:
            m = do_ppo_update(run)
            _log(run, run.counters["ppo_update"], "ppo", m)
            if at_boundary(run):
                return
    else:
        # 0. SFT warm-up (optional), then the reference snapshot if REF_INIT=after_warmup.
        while c["sft_step"] < cfg.hybrid.sft_warmup_steps:
            _log(run, run.counters["sft_step"] + 1, "sft", do_sft_step(run), advance=False)
            if at_boundary(run):
                return
        if cfg.hybrid.ref_init == "after_warmup" and not c.get("ref_snapshot"):
            run.dist.copy_weights(run.engine.module.lm, run.ref)
            c["ref_snapshot"] = 1  # checkpoints from now on carry the reference
        while c["cycle"] < plan.cycles:
            # 1. SFT steps, 2. PPO updates, as many as the curriculum says for this cycle; the
            # phases meet at collectives, so no rank runs ahead.
            n_sft, n_ppo = curriculum.cycle_mix(cfg, c["cycle"], plan.cycles)
            mix = {"curriculum/sft_steps": n_sft, "curriculum/ppo_updates": n_ppo}
            for _ in range(n_sft):
                _log(run, run.counters["sft_step"] + 1, "sft", {**do_sft_step(run), **mix}, advance=False)
            for _ in range(n_ppo):
                _log(run, run.counters["ppo_update"] + 1, "ppo", {**do_ppo_update(run), **mix}, advance=False)
            run.counters["cycle"] += 1
            log.advance()
            if cfg.run.cleanse:
                run.dist.cleanse()
            if at_boundary(run):
                return
    run.dist.barrier()


def _log(run: Run, step: int, phase: str, metrics: dict, advance: bool = True) -> None:
    if step % run.cfg.run.log_every == 0 or step == 1:
        extra = {"progress/cycle": run.counters["cycle"]} if run.cfg.run.mode == "hybrid" else {}
        run.logger.log(step, phase, {**metrics, **extra})
    if advance:
        run.logger.advance()


# --------------------------------------------------------------------------------------
# outputs


def save_outputs(run: Run) -> None:
    """``inference_lm/`` (plain causal LM + tokenizer) and, for RL modes, ``ppo_full/`` (+ value head)."""
    from hybrid_ds.model import save_policy_value

    state = run.dist.full_state_dict(run.engine)  # collective under ZeRO-3: every rank calls it
    if run.dist.is_main:
        out = run.cfg.run.output_dir
        save_policy_value(state, run.engine.module, run.tokenizer, os.path.join(out, "inference_lm"),
                          with_value_head=False)
        if run.cfg.run.mode != "sft":
            save_policy_value(state, run.engine.module, run.tokenizer, os.path.join(out, "ppo_full"),
                              with_value_head=True)
    run.dist.barrier()


def write_resolved_config(cfg: Config, seed: int, path: str) -> None:
    d = cfg.to_json_dict()
    d["SEED"] = seed
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(d, f, indent=2)
