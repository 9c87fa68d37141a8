"""The command line: ``python -m hybrid_ds.train cfg.json [KEY=VALUE ...] [--dry-run]``.

The same code runs under ``accelerate launch``, ``deepspeed --module``, ``torchrun`` and plain
``python``. Config, files and data are checked on every rank before any model or process group
exists (:mod:`hybrid_ds.run.preflight`); a problem the user or a file caused ends every rank with
exit code 2 and one message, never a traceback. Tracebacks are for bugs.

Life of a run: 1. load and check the config, 2. preflight (tokenizer, model config, data,
schedules), 3. split off reference ranks (REF_PLACEMENT=separate), 4. the process group and the
engine seam (:mod:`hybrid_ds.engine.dist`), 5. lock OUTPUT_DIR and open a resume
(:mod:`hybrid_ds.run.resume`), 6. build the run (:mod:`hybrid_ds.run.setup`), restore a
checkpoint, 7. the loop (:mod:`hybrid_ds.run.loop`), 8. the final checkpoint and merged weights.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import os
import sys

EXIT_USER = 2  # a problem with the config, the data, a file or a checkpoint: the user must act


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
    sys.exit(EXIT_USER)


def user_errors() -> tuple:
    """Exceptions that mean the user's config or files must change: exit 2 and their message, no
    traceback. Anything else is a bug and keeps its traceback."""
    from hybrid_ds.config import ConfigError
    from hybrid_ds.data import DataError
    from hybrid_ds.models.policy_value import ModelFileError
    from hybrid_ds.rewards import RewardSpecError
    from hybrid_ds.run.checkpoint_dir import ResumeError

    return ConfigError, DataError, ModelFileError, RewardSpecError, ResumeError


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A rank killed by a fatal signal (SIGSEGV, SIGABRT from a C++ abort) prints every thread's
    # Python stack first: which rank died where is then in the launcher's log. (Not when stderr is
    # no real file, as under a test runner that captures it.)
    try:
        faulthandler.enable()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError/ValueError
        pass
    # Imported here, not at the top: --help and argument errors stay instant (no torch import).
    from hybrid_ds.engine.placement import launch_world_size
    from hybrid_ds.run.preflight import describe_plan, load_config, preflight

    try:
        cfg = load_config(args.config, args.overrides)
        # Every rank runs the same checks before any process group exists, so a problem ends each
        # rank with the same message instead of leaving the others waiting in a collective.
        pre = preflight(cfg, cfg.run.seed if cfg.run.seed is not None else 0)
    except user_errors() as e:
        fail(str(e))
    if args.dry_run:
        print(describe_plan(cfg, pre))
        return 0
    return run(cfg, launch_world_size(), pre)


def run(cfg, world: int, pre=None) -> int:
    """Steps 3-8 of a run (module docstring); returns the exit code."""
    from hybrid_ds.run.checkpoint_dir import CheckpointError
    from hybrid_ds.run.faults import NonFiniteLossError

    try:
        execute(cfg, world, pre)
    except user_errors() as e:  # a damaged checkpoint, OUTPUT_DIR in use, preflight with the drawn seed
        print(f"hybrid_ds: {e}", file=sys.stderr, flush=True)
        return EXIT_USER
    except (CheckpointError, NonFiniteLossError) as e:  # finished work is safe; the run could not go on
        print(f"hybrid_ds: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def execute(cfg, world: int, pre=None, reward_fns=None):
    """Steps 3-8 of a run, raising what :func:`run` turns into exit codes (``hybrid_ds.train`` lets them
    through). Returns the run on a policy rank, None on a reference rank."""
    from hybrid_ds.config import ConfigError
    from hybrid_ds.config.batch_plan import BatchPlans
    from hybrid_ds.engine.dist import init_dist
    from hybrid_ds.engine.launch_plan import plan_launch
    from hybrid_ds.engine.placement import Placement, setup_placement
    from hybrid_ds.engine.jit_ops import shm_op_unbuilt
    from hybrid_ds.engine.torch_compat import prefer_all_gather_single
    from hybrid_ds.reference.protocol import RefClient
    from hybrid_ds.run import checkpoint as ckpt
    from hybrid_ds.run.loop import train
    from hybrid_ds.run.output_lock import release_output_dir
    from hybrid_ds.run.outputs import write_resolved_config
    from hybrid_ds.run.resume import prepare_output_dir
    from hybrid_ds.run.setup import build_run

    # 3. Reference ranks (REF_PLACEMENT=separate) split off before any default process group exists,
    # so Accelerate and DeepSpeed only ever see the policy ranks.
    placement = Placement.from_env(cfg.run.ref_placement, cfg.run.ref_ranks)
    bridge = setup_placement(placement, cfg.run.ref_timeout_s)
    if placement.role == "reference":
        from hybrid_ds.reference.serve import serve_reference

        serve_reference(cfg, placement, bridge)
        return None
    # 4. the policy ranks' process group and engine configuration
    sft = BatchPlans.from_config(cfg, placement.policy_world).sft
    if int(os.environ.get("RANK", "0")) == 0:
        ds = plan_launch(cfg).zero_stage > 0
        build = " (first use: compiling DeepSpeed's shared-memory all-reduce op, about a minute)" if (
            ds and shm_op_unbuilt()) else ""
        print(f"[hybrid_ds] starting {'DeepSpeed and ' if ds else ''}the process group{build}", flush=True)
    dist = init_dist(cfg, sft_micro=sft.micro, sft_accum=sft.accum)
    prefer_all_gather_single()  # DeepSpeed's gathers under torch's current name (no FutureWarning)
    ref_client = RefClient(bridge) if bridge is not None else contextlib.nullcontext()
    try:
        # 5. OUTPUT_DIR: lock, RESUME, the seed, the resolved config
        try:
            point = prepare_output_dir(cfg, dist)  # RESUME: the checkpoint to continue from, or None
            seed = point.seed if point else cfg.run.seed if cfg.run.seed is not None else dist.broadcast_object(
                int.from_bytes(os.urandom(4), "little"))
            if dist.is_main:
                write_resolved_config(cfg, seed, os.path.join(cfg.run.output_dir, "config.json"))
        except OSError as e:  # checked by validation; a directory changed since then gets here
            raise ConfigError([f"OUTPUT_DIR: {cfg.run.output_dir!r} cannot be written "
                               f"({e.strerror or e}: {e.filename or cfg.run.output_dir})."], "the run") from None
        if dist.is_main:
            print(f"[hybrid_ds] {cfg.run.mode} on {dist.world} process(es), device {dist.device.type}, "
                  f"process group {dist.backend}, ZeRO stage {dist.zero_stage} ({dist.plan.source}), precision {dist.plan.mixed_precision}, "
                  f"seed {seed}")
            if note := dist.plan.single_process_note(dist.world):
                print(f"[hybrid_ds] {note}")
        with ref_client as client:  # SHUTDOWN to the reference at the end, ABORT on an error
            # 6. build, restore; 7. train; 8. the final checkpoint, inference_lm/ and ppo_full/
            r = build_run(cfg, dist, seed, ref_client=client, pre=pre, reward_fns=reward_fns)
            ckpt.attach(r, point)  # restores the checkpoint's state; SIGTERM/SIGINT stop after a step
            train(r)
            completed = ckpt.finish(r)
        r.logger.close()
        dist.barrier()  # every rank done with every group before any rank tears its groups down
        if dist.is_main and completed:
            print(f"[hybrid_ds] done: outputs in {cfg.run.output_dir}")
    finally:
        dist.shutdown()
        release_output_dir()
    return r
