"""Checkpoints, exact resume, merged weights, and surviving faults.

On disk, under ``OUTPUT_DIR/checkpoints/``::

    latest                      name of the newest complete checkpoint (rewritten atomically)
    step-0000004/               after hybrid cycle 4 (SFT step / PPO update 4 in sft / ppo mode)
      COMPLETE                  written last: a directory without it is never resumed
      engine/                   DeepSpeed: the engine as ``save_checkpoint`` shards it (weights, optimizer);
                                with LoRA only the trainable adapters and value head (the base is MODEL's)
      model.pt, optimizer.pt    without DeepSpeed: the model and optimizer state dicts (rank 0)
      scaler.pt                 without DeepSpeed, FP16: the loss scaler's state
      schedules.pt              the phases' learning-rate schedules
      trainer_state.json        counters, data positions, KL controller, reward statistics, launch layout
      rng/rank-00000.pt         python, numpy, torch (and CUDA) generators as tensors, one file per rank
      reference.pt              the reference model, when REF_INIT=after_warmup took its snapshot
      self_play.pt              a self_play REWARD's snapshot opponent and the PPO update it was taken at
      config.json               the resolved config the run was started with (compared on resume)
      hf/                       model config and tokenizer, for ``export``
    warmup-0000003/             (hybrid) a checkpoint taken during the SFT warm-up, on SIGTERM/SIGINT

A checkpoint is written into ``<name>.tmp``; when every rank is done rank 0 writes ``COMPLETE``,
renames the directory and only then moves ``latest``, so a crash while writing leaves the previous
checkpoint in use. ``KEEP_LAST`` prunes older complete checkpoints after that. ``inference_lm/``
and ``ppo_full/`` are refreshed at each checkpoint. The file system must be shared by the ranks.

Every file is loaded with ``weights_only=True`` (a checkpoint cannot run code); DeepSpeed's own
files, which DeepSpeed unpickles itself, are first checked to name only its plain data classes.
Resume (``RESUME``): see :func:`resolve_resume`; OUTPUT_DIR is locked for one run, and resuming
verifies the checkpoint and deletes nothing (see "the output directory" below). Faults:
SIGTERM/SIGINT set a flag that the ranks agree on (all-reduce) between steps; then all checkpoint
and exit 0. A non-finite loss has its
update skipped by the engine (DeepSpeed skips non-finite gradients; ``TrainEngine.step`` does the
same without it); ``MAX_NAN_STEPS`` of them in a row stop the run with an error.

``python -m hybrid_ds.checkpoint export CKPT_DIR OUT_DIR`` turns a checkpoint into plain HF weights.
This module imports torch lazily: config validation uses its resume checks.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from typing import Optional

from hybrid_ds.algorithms import self_play
from hybrid_ds.engine.signals import Guard
from hybrid_ds.run.checkpoint_dir import (
    CHECKPOINTS,
    COMPLETE,
    CONFIG_FILE,
    ENGINE_TAG,
    STATE_FILE,
    CheckpointError,
    ResumeError,
    ResumePoint,
    checkpoint_name,
    find_latest,
    fsync_dir,
    fsync_tree,
    list_complete,
    log,
    unit,
    write_json,
    write_latest,
)
from hybrid_ds.run.checkpoint_verify import load_verified
from hybrid_ds.run.outputs import save_outputs, write_resolved_config
from hybrid_ds.run.resume import finish_resume, inside

# --------------------------------------------------------------------------------------
# names and discovery (no torch)


# --------------------------------------------------------------------------------------
# resume planning (no torch): used by config validation and by train.run


# --------------------------------------------------------------------------------------
# the output directory, before the run is built (rank 0 changes it, the others wait)
#
# One run at a time: the main rank holds an flock on OUTPUT_DIR/.lock for the whole run (the file
# names the holder: pid, host, start time); the kernel drops it when the process dies, so a lock
# left by a killed run is simply taken over.
#
# Resuming is a transaction that never deletes anything. Before anything changes, the checkpoint
# is verified completely (every file present, intact, loadable with weights_only=True). Until the
# resumed run publishes its own first complete checkpoint, the newer checkpoints, ``latest`` and
# metrics.jsonl stay as they were; the new rows are appended and RESUME_JOURNAL records where they
# start. Publishing that checkpoint (``finish_resume``) first moves the newer checkpoints to
# ``checkpoints/superseded-<time>/`` and the old rows logged after the resume point to
# ``metrics.superseded-<time>.jsonl``, then makes the new checkpoint ``latest``. A resumed run that
# dies before that leaves the journal: the next start moves the rows it appended to
# ``metrics.abandoned-<time>.jsonl`` and finds OUTPUT_DIR as it was before that run.


# -- verifying a checkpoint before it is used


# -- the resume transaction


# --------------------------------------------------------------------------------------
# faults: signals and non-finite losses


def at_boundary(run) -> bool:
    """Between steps: periodic checkpoint (SAVE_EVERY), and stop all ranks together after a signal.
    Returns True when the run must stop (a checkpoint was written)."""
    g = run.guard
    if g is None:
        return False
    sig = g.agreed_stop(run.dist)
    n, u = run.cfg.run.save_every, unit(run)
    periodic = n > 0 and u > 0 and u % n == 0 and not checkpoint_name(run).startswith("warmup")
    if periodic or sig:
        save_checkpoint(run)
    if sig:
        g.stopped_by = signal.Signals(sig).name
        return True
    return False


# --------------------------------------------------------------------------------------
# save


def save_checkpoint(run) -> str:
    """Write a checkpoint of the whole run state (collective: every rank calls it). Returns its path."""
    cfg, dist = run.cfg, run.dist
    root = os.path.join(cfg.run.output_dir, CHECKPOINTS)
    name = checkpoint_name(run)
    final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    rng = capture_rng()  # writing must not move any generator: a checkpointed run equals an uninterrupted one
    t0 = time.perf_counter()
    previous = find_latest(cfg.run.output_dir)
    keep = f"the previous checkpoint ({previous}) is intact" if previous else "no earlier checkpoint exists"
    if dist.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    # 1. every rank: the engine's weights and optimizer state, its RNG states; rank 0: the rest
    ref_state = _reference_state(run)  # collective under ZeRO-3
    error = ""
    try:
        run.engine.save_state(tmp, ENGINE_TAG)
        _save_rng(tmp, dist.rank, rng)
        if dist.is_main:
            _save_main(run, tmp, ref_state)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        error = str(e)
    if not dist.all_ok(not error):
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {tmp}: {error or 'another rank failed writing'}; "
                              f"{keep}.")
    # 2. rank 0 makes it visible: COMPLETE, rename, then the latest pointer; then prune
    error = ""
    if dist.is_main:
        try:
            fsync_tree(tmp)
            write_json(os.path.join(tmp, COMPLETE), {"name": name, "counters": run.counters.state_dict(),
                                                      "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            if run.resuming is not None:
                finish_resume(run, root, run.resuming)  # newer checkpoints aside, metrics rewound
            if os.path.exists(final):  # an incomplete leftover of that name (complete ones were set aside)
                os.rename(final, final + ".replaced")
            os.rename(tmp, final)
            fsync_dir(root)
            write_latest(root, name)
            shutil.rmtree(final + ".replaced", ignore_errors=True)
        except OSError as e:
            error = str(e)
    if not dist.all_ok(not error):
        raise CheckpointError(f"could not publish checkpoint {final}: {error or 'rank 0 failed'}; {keep}.")
    run.resuming = None
    if dist.is_main:
        _prune(root, cfg.run.keep_last, name)
    # 3. merged weights, from the same state
    save_outputs(run)
    restore_rng(rng)
    run.last_checkpoint = name
    if dist.is_main:
        log(f"checkpoint {final} ({time.perf_counter() - t0:.1f}s)")
    return final


def _save_main(run, path: str, ref_state: Optional[dict]) -> None:
    import torch

    cfg, dist = run.cfg, run.dist
    state = {"version": 1, "mode": cfg.run.mode, "counters": run.counters.state_dict(), "seed": run.seed,
             "plan": {"cycles": run.plan.cycles, "sft_steps": run.plan.sft_steps,
                      "ppo_updates": run.plan.ppo_updates},
             "streams": {k: s.state_dict() for k, s in run.streams.items()},
             "kl_ctl": run.kl_ctl.state_dict() if run.kl_ctl is not None else None,
             "reward": run.reward.state_dict() if run.reward is not None else None,
             "world": dist.world, "zero_stage": dist.zero_stage, "precision": dist.plan.mixed_precision,
             "engine": "deepspeed" if dist.uses_deepspeed else "torch"}
    write_json(os.path.join(path, STATE_FILE), state)
    write_resolved_config(cfg, run.seed, os.path.join(path, CONFIG_FILE))
    torch.save({k: s.state_dict() for k, s in run.schedules.items()}, os.path.join(path, "schedules.pt"))
    if ref_state is not None:
        torch.save(ref_state, os.path.join(path, "reference.pt"))
    snapshot = self_play.snapshot_state(run)  # a self_play REWARD's snapshot opponent (exact resume)
    if snapshot is not None:
        torch.save(snapshot, os.path.join(path, self_play.SNAPSHOT_FILE))
    hf = os.path.join(path, "hf")
    run.engine.module.lm.config.save_pretrained(hf)
    run.engine.module.lm.generation_config.save_pretrained(hf)
    run.tokenizer.save_pretrained(hf)


def _reference_state(run) -> Optional[dict]:
    """The reference model's weights on rank 0 when it is a snapshot (REF_INIT=after_warmup), else None."""
    if not run.counters.ref_snapshot or run.ref is None:
        return None
    return run.dist.frozen_state_dict(run.ref)


def _prune(root: str, keep_last: int, current: str) -> None:
    """Delete complete checkpoints older than the newest KEEP_LAST (never the current one)."""
    if keep_last <= 0:
        return
    done = [p for p in list_complete(root) if os.path.basename(p) != current]
    for p in done[:max(0, len(done) - (keep_last - 1))]:
        try:
            os.remove(os.path.join(p, COMPLETE))  # first, so a half-deleted one is never resumed
            shutil.rmtree(p)
        except OSError as e:
            log(f"warning: could not delete old checkpoint {p}: {e}")


# --------------------------------------------------------------------------------------
# RNG states


def capture_rng() -> dict:
    import random

    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(state: dict) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_rng(path: str, rank: int, state: dict) -> None:
    import torch

    os.makedirs(os.path.join(path, "rng"), exist_ok=True)
    torch.save(_rng_to_file(state), os.path.join(path, "rng", f"rank-{rank:05d}.pt"))


def _rng_to_file(state: dict) -> dict:
    """``capture_rng``'s states as tensors, ints and floats only (loadable with weights_only=True)."""
    import torch

    version, words, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    return {"python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": state["torch"], "cuda": state["cuda"]}


def _rng_from_file(saved: dict) -> dict:
    """The inverse of :func:`_rng_to_file`: states ``restore_rng`` takes, bit for bit."""
    import numpy as np

    py, npy = saved["python"], saved["numpy"]
    return {"python": (py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]),
            "numpy": (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                      npy["cached_gaussian"]),
            "torch": saved["torch"], "cuda": saved["cuda"]}


# --------------------------------------------------------------------------------------
# load


def attach(run, point: Optional[ResumePoint]) -> None:
    """Give ``run`` its fault guard (signal handlers) and, when resuming, the checkpoint's whole state."""
    run.guard = Guard()  # hybrid_ds.engine.signals
    if point is not None:
        if run.dist.is_main:
            log(f"resuming from {point.describe()}")
        load_checkpoint(run, point)
        if inside(point.path, os.path.join(run.cfg.run.output_dir, CHECKPOINTS)):
            run.last_checkpoint = os.path.basename(point.path)
            run.resuming = point
    run.guard.install()


def load_checkpoint(run, point: ResumePoint) -> None:
    """Restore engine, optimizer, schedules, counters, data positions, KL, reward and RNG states."""
    st, dist, path = point.state, run.dist, point.path
    layout = (st["world"], st["zero_stage"], st["precision"])
    if layout != (dist.world, dist.zero_stage, dist.plan.mixed_precision):
        msg = (f"checkpoint {path} was written by {st['world']} process(es), ZeRO stage {st['zero_stage']}, "
               f"precision {st['precision']}; this launch has {dist.world}, {dist.zero_stage}, "
               f"{dist.plan.mixed_precision}")
        if dist.uses_deepspeed or st["engine"] == "deepspeed":
            raise ResumeError(msg + ": relaunch with the same layout to resume.")
        if dist.is_main:
            log(f"warning: {msg}; the model and optimizer resume, per-rank sampling will differ")
    # 1. weights and optimizer
    if not run.engine.load_state(path, ENGINE_TAG, load_verified):
        raise ResumeError(f"DeepSpeed could not load {os.path.join(path, ENGINE_TAG)}.")
    if os.path.isfile(os.path.join(path, "reference.pt")):
        dist.load_frozen_state_dict(run.ref, load_verified(os.path.join(path, "reference.pt")))
    if os.path.isfile(os.path.join(path, self_play.SNAPSHOT_FILE)):
        self_play.load_snapshot(run, load_verified(os.path.join(path, self_play.SNAPSHOT_FILE)))
    # 2. schedules, counters, data positions, KL controller, reward statistics
    schedules = load_verified(os.path.join(path, "schedules.pt"))
    for phase, sched in run.schedules.items():
        if phase in schedules:
            _load_schedule(run, phase, sched, schedules[phase])
    run.counters.load_state_dict(st["counters"])
    for key, stream in run.streams.items():
        if key in st["streams"]:
            stream.load_state_dict(st["streams"][key])
    if run.kl_ctl is not None and st.get("kl_ctl"):
        run.kl_ctl.load_state_dict(st["kl_ctl"])
    if run.reward is not None and st.get("reward") is not None:
        run.reward.load_state_dict(st["reward"])
    run.logger.advance(unit(run))
    # 3. this rank's generators, last: nothing may draw from them before training continues
    rng_file = os.path.join(path, "rng", f"rank-{dist.rank:05d}.pt")
    if os.path.isfile(rng_file):
        restore_rng(_rng_from_file(load_verified(rng_file)))
    elif dist.is_main:
        log(f"warning: {rng_file} is missing; this rank's sampling starts from its seed")


def _load_schedule(run, phase: str, sched, state: dict) -> None:
    """Continue a phase's schedule; when the run's length changed (EPOCHS/MAX_STEPS), follow the new
    schedule from the same optimizer step."""
    if (state["total_steps"], state["warmup_steps"]) == (sched.total_steps, sched.warmup_steps):
        sched.load_state_dict(state)
        return
    if sched.name == "reduce_on_plateau":  # no end: its state carries over as it is
        sched.load_state_dict({**state, "total_steps": sched.total_steps, "warmup_steps": sched.warmup_steps})
    else:
        for _ in range(int(state["steps_done"])):
            sched.step()
    if run.dist.is_main:
        log(f"{phase} schedule re-planned for {sched.total_steps} steps (was {state['total_steps']}); "
             f"continuing at step {state['steps_done']} with lr {sched.lr:.3g}")


# --------------------------------------------------------------------------------------
# the end of a run


def finish(run) -> bool:
    """The final checkpoint (unless the last step was just saved) and merged weights.
    Returns False when the run stopped early on a signal."""
    g = run.guard
    if g is not None and g.stopped_by:
        if run.dist.is_main:
            log(f"stopped by {g.stopped_by} after {checkpoint_name(run)}; checkpoint "
                 f"{os.path.join(run.cfg.run.output_dir, CHECKPOINTS, run.last_checkpoint)}. "
                 f"Run the same command again to resume.")
        g.uninstall()
        return False
    if g is None or run.last_checkpoint != checkpoint_name(run):
        save_checkpoint(run)
    if g is not None:
        g.uninstall()
    return True


# --------------------------------------------------------------------------------------
# export: python -m hybrid_ds.checkpoint export CKPT_DIR OUT_DIR

