"""Everything checked before a run loads weights or creates a process group, shared by
``--dry-run`` and the real run, so a config that passes ``--dry-run`` does not fail in setup.

1. :func:`load_config`: read and build the Config, then every problem it has, at once: its keys on
   their own (:mod:`hybrid_ds.config.checks`), the optimizer and scheduler, the reward spec, the
   launched world against the one the launch asked for (:mod:`hybrid_ds.engine.launcher`), the
   placement and batch arithmetic for the launched world, the files it names, and what OUTPUT_DIR
   holds (resume).
2. :func:`preflight`: the checks that need the tokenizer, the model's config and the data: the
   tokenizer loads and has EOS, MAXSEQ fits the model's positions, REFS' models share the policy's
   vocabulary, the data reads and tokenises, the batches fit the items actually kept, the schedules
   can be built.

Each user-caused problem raises ConfigError or DataError: the CLI prints it and exits 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hybrid_ds.algorithms.self_play import self_play_problems
from hybrid_ds.config import Config, ConfigError
from hybrid_ds.config.batch_plan import BatchPlan, BatchPlans
from hybrid_ds.config.checks import (batch_problems, file_problems, output_dir_problem, pref_problems,
                                     tracker_package_problems, uses_pairs, validate)
from hybrid_ds.config.load import build_config, normalise_paths, parse_override, read_config_file
from hybrid_ds.config.refs import follows_policy, ref_model_keys
from hybrid_ds.config.schema import REWARD_KEY
from hybrid_ds.data import (DataReport, Example, Pair, chat_template_problem, load_items, load_pairs,
                            prompt_template_problem, tokenize_items, tokenize_pairs, use_chat_template)
from hybrid_ds.engine.launch_plan import plan_launch
from hybrid_ds.engine.launcher import launched_world_problem
from hybrid_ds.engine.placement import launch_world_size, placement_problems, policy_world_size
from hybrid_ds.models.heads import label_problems
from hybrid_ds.optim import PhaseSchedule, make_phase_schedules, schedule_warnings, validate_optim_config
from hybrid_ds.rewards import validate_reward_spec
from hybrid_ds.rollout.multiturn import env_problem
from hybrid_ds.run.resume import describe_resume, resume_problems
from hybrid_ds.run.schedule import Schedule, plan_schedule


def load_config(path: Optional[str], overrides: list[str] = (), *, check_files: bool = True,
                world_size: Optional[int] = None) -> Config:
    """Load ``path`` (a JSON object), apply ``KEY=VALUE`` overrides, build and validate a Config.

    Raises ConfigError listing every problem found. ``world_size`` (default: the launcher's
    WORLD_SIZE, or 1) is used to check that batch sizes divide across processes x accumulation.
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
    problems += config_problems(cfg, check_files=check_files, world_size=world_size)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def config_problems(cfg: Config, *, check_files: bool = True, world_size: Optional[int] = None) -> list[str]:
    """Every problem of a built Config, its own and those only other layers can judge."""
    problems = validate(cfg) + tracker_package_problems(cfg)
    launched = world_size or launch_world_size()
    place = placement_problems(cfg.run.ref_placement, cfg.run.ref_ranks, launched)
    problems += place
    if world_size is None:  # the real launch: did it start every process it asked for?
        problems += [p for p in (launched_world_problem(launched),) if p]
    if not place:
        problems += batch_problems(cfg, policy_world_size(cfg.run.ref_placement, cfg.run.ref_ranks, launched))
    problems += pref_problems(cfg, launched if place else policy_world_size(cfg.run.ref_placement, cfg.run.ref_ranks,
                                                                            launched), check_files)
    problems += validate_optim_config(cfg)
    problems += [p for p in (prompt_template_problem(cfg.data.prompt_template, cfg.data.select_output),
                             chat_template_problem(cfg.data.chat_template) if check_files else None) if p]
    problems += launch_problems(cfg, check_files)
    if cfg.run.mode != "sft":
        problems += validate_reward_spec(cfg.reward, path=REWARD_KEY)
        problems += self_play_problems(cfg, REWARD_KEY)
        problems += [p for p in (env_problem(cfg.ppo.env),) if p]
    if check_files:
        problems += file_problems(cfg)
        if cfg.run.output_dir and not output_dir_problem(cfg.run.output_dir):
            problems += resume_problems(cfg)  # a run already there: resumed, refused or moved aside (RESUME)
    return problems


def launch_problems(cfg: Config, check_files: bool = True) -> list[str]:
    """What the launch the config and the launcher resolve to (DeepSpeed stage, precision) cannot run:

    * LOAD_IN_4BIT/LOAD_IN_8BIT under ZeRO-3: ZeRO-3 partitions every weight at load, and bitsandbytes'
      quantised weights cannot be partitioned that way; ZeRO-2 and plain torch/DDP keep the quantised
      base whole on every rank;
    * TORCH_DTYPE against the precision and DeepSpeed use (``check_files``: it reads DS_CONFIG);
    * under DeepSpeed (``check_files``), a build lock of its ops that a killed build left behind: the
      run would wait on it forever at start-up."""
    from hybrid_ds.engine.jit_ops import build_lock_problems
    from hybrid_ds.models.policy_value import dtype_problem

    key = "LOAD_IN_4BIT" if cfg.lora.load_in_4bit else "LOAD_IN_8BIT" if cfg.lora.load_in_8bit else ""
    if not (key or check_files):
        return []
    try:
        plan = plan_launch(cfg)
    except (OSError, ValueError):  # an unreadable DS_CONFIG: file_problems names it
        return []
    problems = []
    if key and plan.zero_stage == 3:
        problems.append(f"{key} with ZeRO stage 3: a bitsandbytes-quantised base cannot be partitioned; use ZeRO-2 "
                        f"(ZERO_STAGE=2) or no DeepSpeed, which keep the quantised base whole on each rank.")
    if check_files:
        p = dtype_problem(cfg.model.torch_dtype, plan.mixed_precision, plan.zero_stage > 0,
                          frozen_base=cfg.lora.r > 0)
        problems += [p] if p else []
        problems += build_lock_problems() if plan.zero_stage > 0 else []
    return problems


def prepare_data(cfg: Config, tokenizer, seed: int, report: Optional[DataReport] = None) -> list[Example]:
    """The training items, read, filtered and tokenised exactly as training will see them."""
    d = cfg.data
    report = report if report is not None else DataReport()
    items = load_items(cfg.run.train_file, d.select_output, split=d.split, shuffle=d.shuffle, seed=seed,
                       percent=d.percent, num_samples=d.num_samples, on_bad_item=d.on_bad_item, report=report,
                       data_format=d.data_format, prompt_template=d.prompt_template, config=d.dataset_config)
    return tokenize_items(items, tokenizer, d.select_output, d.maxseq, report, data_format=report.data_format,
                          prompt_template=d.prompt_template)


def prepare_eval_data(cfg: Config, tokenizer, report: Optional[DataReport] = None) -> list[Example]:
    """The EVAL_FILE items (none without it), read and tokenised as the training items are, in file order
    (the first EVAL_NUM_SAMPLES when set)."""
    d = cfg.data
    if not d.eval_file:
        return []
    report = report if report is not None else DataReport()
    items = load_items(d.eval_file, d.select_output, split=d.eval_split or d.split, shuffle=False,
                       num_samples=d.eval_num_samples, on_bad_item=d.on_bad_item, report=report,
                       data_format=d.data_format, prompt_template=d.prompt_template, config=d.dataset_config,
                       key="EVAL_FILE")
    return tokenize_items(items, tokenizer, d.select_output, d.maxseq, report, data_format=report.data_format,
                          prompt_template=d.prompt_template)


def prepare_pairs(cfg: Config, tokenizer, seed: int, report: Optional[DataReport] = None, *,
                  held_out: bool = False) -> list[Pair]:
    """The preference pairs (docs/preference.md), read and tokenised as training sees them: TRAIN_FILE's in
    MODE=dpo and rm, PREF_FILE's in hybrid mode; ``held_out``: EVAL_FILE's, in file order."""
    d = cfg.data
    if held_out:
        key, path, split, shuffle, n = "EVAL_FILE", d.eval_file, d.eval_split or d.split, False, d.eval_num_samples
    else:
        key, path, split, shuffle, n = (("PREF_FILE", cfg.pref.pref_file) if cfg.pref.pref_file else
                                        ("TRAIN_FILE", cfg.run.train_file)) + (d.split, d.shuffle, d.num_samples)
    items = load_pairs(path, key=key, split=split, config=d.dataset_config, shuffle=shuffle, seed=seed,
                       num_samples=n, on_bad_item=d.on_bad_item, report=report,
                       percent=100.0 if held_out else d.percent)
    return tokenize_pairs(items, tokenizer, d.maxseq, report, key=key)


def eval_warnings(cfg: Config) -> list[str]:
    """EVAL_FILE naming the very data trained on: allowed, but its numbers then measure no generalisation."""
    d = cfg.data
    if d.eval_file and d.eval_file == cfg.run.train_file and (d.eval_split or d.split) == d.split:
        return [f"EVAL_FILE is TRAIN_FILE with the same split ({d.split!r}): evaluation runs on training items; "
                f"set EVAL_SPLIT (e.g. test) or another EVAL_FILE for held-out numbers."]
    return []


def reference_warnings(cfg: Config) -> list[str]:
    """A hybrid run whose SFT steps move the policy away from references that never follow it: REFS
    without "policy" (its models are frozen files, so REF_SYNC_EVERY's auto is 0 there)."""
    h = cfg.hybrid
    if cfg.run.mode == "hybrid" and cfg.ppo.refs and not follows_policy(cfg.ppo.refs) and h.cycle_sft_steps > 0:
        return ["REFS lists no \"policy\" entry: every reference is a frozen file, none follows the policy that "
                "the cycles' SFT steps move, and the KL penalty grows with them (README, \"Hybrid defaults\"); add "
                "{\"model\": \"policy\", \"weight\": w} to keep the auto REF_SYNC_EVERY of 1."]
    return []


@dataclass
class Preflight:
    """What the checks before training found and built: shared by --dry-run and build_run."""

    seed: int  # the seed the data was shuffled with
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    examples: list[Example]
    report: DataReport
    plan: Schedule
    schedules: dict  # phase -> optim.PhaseSchedule
    warnings: list[str]  # valid but probably unintended settings, with their numbers
    eval_examples: list[Example] = field(default_factory=list)  # EVAL_FILE's, tokenised (none without it)
    eval_report: DataReport = field(default_factory=DataReport)
    pairs: list[Pair] = field(default_factory=list)  # the preference pairs (MODE=dpo, rm; HYBRID_RL=dpo)
    pref_report: DataReport = field(default_factory=DataReport)  # PREF_FILE's (hybrid), else unused
    eval_pairs: list[Pair] = field(default_factory=list)  # MODE=dpo and rm: EVAL_FILE's pairs


def preflight(cfg: Config, seed: int) -> Preflight:
    """The checks of step 2 (module docstring); ``load_config`` has run step 1."""
    from hybrid_ds.assets import resolve_model
    from hybrid_ds.models.policy_value import (ModelFileError, attention_problem, first_line, load_model_config,
                                                load_tokenizer, max_positions, value_head_problem)
    from hybrid_ds.models.references import vocabulary_problems

    # 1. tokenizer and the model's config
    problems = []
    tok_key, tok_name = ("TOKENIZER", cfg.run.tokenizer) if cfg.run.tokenizer else ("MODEL", cfg.run.model)
    tokenizer = None
    try:
        tokenizer = load_tokenizer(tok_name)
    except Exception as e:  # noqa: BLE001 - a user's tokenizer files: name them and give the loader's reason
        problems.append(f"{tok_key}: the tokenizer of {tok_name!r} cannot be used ({first_line(e)}).")
    try:
        model_config = load_model_config(cfg.run.model)
        n_pos = max_positions(model_config)
        if n_pos and cfg.data.maxseq > n_pos:
            problems.append(f"MAXSEQ ({cfg.data.maxseq}) exceeds the {n_pos} positions of MODEL {cfg.run.model!r} "
                            f"(n_positions / max_position_embeddings); set MAXSEQ <= {n_pos}.")
        if cfg.lora.r:
            from hybrid_ds.models.lora import target_problems

            problems += target_problems(cfg.lora, model_config, cfg.run.model)
        problems += [p for p in [attention_problem(model_config, cfg.model.attn_implementation),
                                 value_head_problem(resolve_model(cfg.run.model), model_config)
                                 if cfg.run.mode == "sft" or cfg.ppo.advantage == "gae" else None] if p]
        if tokenizer is not None:  # REFS' frozen models read the policy's token ids (models/references.py)
            problems += vocabulary_problems(ref_model_keys(cfg), tokenizer, model_config, cfg.data.maxseq)
    except ModelFileError as e:
        problems.append(f"MODEL: {e}.")
    if problems:
        raise ConfigError(problems, "the model and tokenizer")
    use_chat_template(tokenizer, cfg.data.chat_template)  # CHAT_TEMPLATE: rendering and stop ids follow it

    # 2. the data, through the tokenisation the run uses (MODE=dpo and rm: TRAIN_FILE holds pairs)
    report, pref_report, pairs_only = DataReport(), DataReport(), cfg.run.mode in ("dpo", "rm")
    examples = [] if pairs_only else prepare_data(cfg, tokenizer, seed, report)
    pairs = prepare_pairs(cfg, tokenizer, seed, report if pairs_only else pref_report) if uses_pairs(cfg) else []
    plan = plan_schedule(cfg, len(examples), len(pairs))

    # 3. batches against the items kept, the schedules over the run's steps
    n = len(examples)
    problems += label_problems([e.item for e in examples], cfg.heads.heads)
    if (plan.sft_steps or cfg.ppo.ptx_coef > 0) and cfg.sft.batch > n:
        problems.append(f"SFT_BATCH ({cfg.sft.batch}) is larger than the {n} usable items of TRAIN_FILE; lower "
                        f"SFT_BATCH or use more data.")
    if plan.ppo_updates and cfg.ppo.batch > n:
        problems.append(f"PPO_BATCH ({cfg.ppo.batch}) is larger than the {n} usable items of TRAIN_FILE; lower "
                        f"PPO_BATCH or use more data.")
    if plan.pref_steps and cfg.pref.batch > len(pairs):
        problems.append(f"PREF_BATCH ({cfg.pref.batch}) is larger than the {len(pairs)} usable preference pairs of "
                        f"{'PREF_FILE' if cfg.pref.pref_file else 'TRAIN_FILE'}; lower PREF_BATCH or use more pairs.")
    if problems:
        raise ConfigError(problems, "the data")
    try:  # the schedules' totals come from the data, so some checks can only run here
        schedules = make_phase_schedules(cfg, plan.sft_steps, plan.ppo_optimizer_steps)
        if plan.pref_steps:  # the DPO or reward-model phase's own schedule, over LR_PREF
            schedules["rm" if cfg.run.mode == "rm" else "dpo"] = PhaseSchedule(cfg, cfg.pref.lr, plan.pref_steps)
    except ValueError as e:  # "<what>:\n  - problem\n  - problem" -> one line per problem, each naming <what>
        head, *items = str(e).split("\n")
        raise ConfigError([f"{head.rstrip(':')}: {i.strip().removeprefix('- ')}" for i in items] or [head],
                          "the run's schedule") from None
    steps = {"LR_SFT": plan.sft_steps, "LR_PPO": plan.ppo_optimizer_steps, "LR_PREF": plan.pref_steps}
    warnings = (schedule_warnings(cfg, {k: v for k, v in steps.items() if v > 0}) + eval_warnings(cfg)
                + reference_warnings(cfg))
    eval_report = DataReport()
    eval_examples = [] if pairs_only else prepare_eval_data(cfg, tokenizer, eval_report)
    eval_pairs = prepare_pairs(cfg, tokenizer, seed, eval_report, held_out=True) if pairs_only and \
        cfg.data.eval_file else []
    return Preflight(seed, tokenizer, examples, report, plan, schedules, warnings, eval_examples, eval_report,
                     pairs, pref_report, eval_pairs)


def describe_plan(cfg: Config, pre: Preflight) -> str:
    """What the run would do, for --dry-run (after the checks of :func:`preflight`)."""
    world = launch_world_size()
    plan, batches = pre.plan, BatchPlans.from_config(cfg, world)
    lines = [f"mode: {cfg.run.mode}", f"model: {cfg.run.model}", f"processes: {world}",
             f"seed: {cfg.run.seed if cfg.run.seed is not None else 'drawn from the OS at start'}"]
    lines += [f"data: {x}" for x in pre.report.lines()]
    if cfg.data.eval_file:
        unit = {"hybrid": "cycles", "sft": "SFT steps", "ppo": "PPO updates"}.get(cfg.run.mode, "preference steps")
        every = f"every {cfg.data.eval_every} {unit} and " if cfg.data.eval_every else ""
        what = {"sft": "loss", "dpo": "implicit rewards and pair accuracy", "rm": "pair accuracy"}.get(
            cfg.run.mode, "loss and reward of greedy responses")
        lines.append(f"eval: {len(pre.eval_examples) + len(pre.eval_pairs)} items of {cfg.data.eval_file}, "
                     f"{every}at the end ({what})")
        lines += [f"eval data: {x}" for x in pre.eval_report.lines()]
    lines += [f"warning: {x}" for x in pre.warnings]
    if plan.sft_steps or cfg.ppo.ptx_coef:
        lines.append("SFT batch: " + batches.sft.describe())
    if plan.ppo_updates:
        lines.append(f"PPO batch: {batches.ppo.describe()}, {cfg.ppo.epochs} epochs")
    if plan.pref_steps:
        lines += [f"preference pairs: {x}" for x in pre.pref_report.lines()] if cfg.pref.pref_file else []
        lines.append("preference batch (pairs): " + BatchPlan(cfg.pref.batch, batches.sft.world,
                                                               cfg.pref.grad_accum).describe())
    lines.append(f"steps: {plan.describe()}")
    lines.append(f"output: {cfg.run.output_dir}")
    lines.append(describe_resume(cfg))
    return "\n".join(lines)
