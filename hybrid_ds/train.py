"""Entry point: ``python -m hybrid_ds.train cfg.json [KEY=VALUE ...] [--dry-run]``.

The same module runs under ``accelerate launch``, ``deepspeed --module``, ``torchrun`` and plain
``python``. Config and data are validated before any model or process group is created; problems
exit with code 2 and a short message, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

EXIT_CONFIG = 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="hybrid-ds", description="Interleaved SFT + PPO for Hugging Face causal LMs.",
                                epilog="Every config key is listed in docs/config.md.")
    p.add_argument("config", nargs="?", help="JSON config file (UPPER_CASE keys)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. LR_SFT=1e-4")
    p.add_argument("--dry-run", action="store_true", help="validate config and data, print the plan, exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    args = p.parse_intermixed_args(argv)  # options and KEY=VALUE in any order
    if args.config and "=" in args.config and not args.config.endswith(".json"):
        args.overrides.insert(0, args.config)
        args.config = None
    return args


def fail(message: str) -> "NoReturn":  # noqa: F821
    print(f"hybrid_ds: {message}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)


def user_errors() -> tuple:
    """Exceptions that mean the user's config or files must change: exit 2 and their message, no
    traceback. Anything else is a bug and keeps its traceback."""
    from hybrid_ds.config import ConfigError
    from hybrid_ds.data import DataError
    from hybrid_ds.rewards import RewardSpecError

    return ConfigError, DataError, RewardSpecError


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from hybrid_ds.config import env_world_size, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        # Every rank runs the same checks before any process group exists, so a problem ends each
        # rank with the same message instead of leaving the others waiting in a collective.
        pre = preflight_checks(cfg)
    except user_errors() as e:
        fail(str(e))
    if args.dry_run:
        print(describe_plan(cfg, pre))
        return 0
    return run(cfg, env_world_size(), pre)


def preflight_checks(cfg):
    """trainer.preflight with the configured seed (0 when it is drawn at start)."""
    from hybrid_ds.trainer import preflight

    return preflight(cfg, cfg.run.seed if cfg.run.seed is not None else 0)


def describe_plan(cfg, pre=None) -> str:
    """What the run would do, for --dry-run (the checks of trainer.preflight; no model weights)."""
    from hybrid_ds.batching import BatchPlan
    from hybrid_ds.checkpoint import describe_resume
    from hybrid_ds.config import env_world_size

    world = env_world_size()
    pre = pre or preflight_checks(cfg)
    plan = pre.plan
    lines = [f"mode: {cfg.run.mode}", f"model: {cfg.run.model}", f"processes: {world}",
             f"seed: {cfg.run.seed if cfg.run.seed is not None else 'drawn from the OS at start'}"]
    lines += [f"data: {x}" for x in pre.report.lines()]
    lines += [f"warning: {x}" for x in pre.warnings]
    if plan.sft_steps or cfg.ppo.ptx_coef:
        lines.append("SFT batch: " + BatchPlan(cfg.sft.batch, world, cfg.sft.grad_accum).describe())
    if plan.ppo_updates:
        lines.append(f"PPO batch: {cfg.ppo.batch} prompts per update, minibatch "
                     + BatchPlan(cfg.ppo_mini, world, cfg.ppo.grad_accum).describe()
                     + f", {cfg.ppo.epochs} epochs")
    lines.append(f"steps: {plan.describe()}")
    lines.append(f"output: {cfg.run.output_dir}")
    lines.append(describe_resume(cfg))
    return "\n".join(lines)


def run(cfg, world: int, pre=None) -> int:
    from hybrid_ds import checkpoint as ckpt
    from hybrid_ds.batching import BatchPlan
    from hybrid_ds.config import ConfigError
    from hybrid_ds.dist import init_dist
    from hybrid_ds.placement import Placement, setup_placement
    from hybrid_ds.refproto import RefClient
    from hybrid_ds.trainer import build_run, train, write_resolved_config

    # Reference ranks (REF_PLACEMENT=separate) split off before any default process group exists,
    # so Accelerate and DeepSpeed only ever see the policy ranks.
    placement = Placement.from_env(cfg.run.ref_placement, cfg.run.ref_ranks)
    bridge = setup_placement(placement, cfg.run.ref_timeout_s)
    if placement.role == "reference":
        from hybrid_ds.trainer import serve_reference

        return serve_reference(cfg, placement, bridge)
    world = placement.policy_world
    sft = BatchPlan(cfg.sft.batch, world, cfg.sft.grad_accum)
    dist = init_dist(cfg, sft_micro=sft.micro, sft_accum=sft.accum)
    ref_client = RefClient(bridge) if bridge is not None else contextlib.nullcontext()
    try:
        try:
            point = ckpt.prepare_output_dir(cfg, dist)  # RESUME: the checkpoint to continue from, or None
            seed = point.seed if point else cfg.run.seed if cfg.run.seed is not None else dist.broadcast_object(
                int.from_bytes(os.urandom(4), "little"))
            if dist.is_main:
                write_resolved_config(cfg, seed, os.path.join(cfg.run.output_dir, "config.json"))
        except OSError as e:  # checked by validation; a directory changed since then gets here
            raise ConfigError([f"OUTPUT_DIR: {cfg.run.output_dir!r} cannot be written "
                               f"({e.strerror or e}: {e.filename or cfg.run.output_dir})."], "the run") from None
        if dist.is_main:
            print(f"[hybrid_ds] {cfg.run.mode} on {dist.world} process(es), device {dist.device.type}, "
                  f"ZeRO stage {dist.zero_stage} ({dist.plan.source}), precision {dist.plan.mixed_precision}, "
                  f"seed {seed}")
        with ref_client as client:  # SHUTDOWN to the reference at the end, ABORT on an error
            r = build_run(cfg, dist, seed, ref_client=client, pre=pre)
            ckpt.attach(r, point)  # restores the checkpoint's state; SIGTERM/SIGINT stop after a step
            train(r)
            completed = ckpt.finish(r)  # final checkpoint, inference_lm/ and ppo_full/
        r.logger.close()
        if dist.is_main and completed:
            print(f"[hybrid_ds] done: outputs in {cfg.run.output_dir}")
    except (ckpt.CheckpointError, ckpt.NonFiniteLossError) as e:
        print(f"hybrid_ds: {e}", file=sys.stderr, flush=True)
        return 1
    except user_errors() as e:  # the checks of preflight, repeated when the seed was drawn at start
        print(f"hybrid_ds: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
