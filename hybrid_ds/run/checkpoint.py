"""Checkpoints, exact resume, merged weights, and surviving faults.

On disk, under ``OUTPUT_DIR/checkpoints/``::

    latest                      name of the newest complete checkpoint (rewritten atomically)
    step-0000004/               after hybrid cycle 4 (SFT step / PPO update 4 in sft / ppo mode)
      COMPLETE                  written last: a directory without it is never resumed
      engine/                   DeepSpeed: the engine as ``save_checkpoint`` shards it (weights, optimizer)
      model.pt, optimizer.pt    without DeepSpeed: the model and optimizer state dicts (rank 0)
      schedules.pt              the phases' learning-rate schedules
      trainer_state.json        counters, data positions, KL controller, reward statistics, launch layout
      rng/rank-00000.pt         python, numpy, torch (and CUDA) generators, one file per rank
      reference.pt              the reference model, when REF_INIT=after_warmup took its snapshot
      config.json               the resolved config the run was started with (compared on resume)
      hf/                       model config and tokenizer, for ``export``
    warmup-0000003/             (hybrid) a checkpoint taken during the SFT warm-up, on SIGTERM/SIGINT

A checkpoint is written into ``<name>.tmp``; when every rank is done rank 0 writes ``COMPLETE``,
renames the directory and only then moves ``latest``, so a crash while writing leaves the previous
checkpoint in use. ``KEEP_LAST`` prunes older complete checkpoints after that. ``inference_lm/``
and ``ppo_full/`` are refreshed at each checkpoint. The file system must be shared by the ranks.

Resume (``RESUME``): see :func:`resolve_resume`. Faults: SIGTERM/SIGINT set a flag that the ranks
agree on (all-reduce) between steps; then all checkpoint and exit 0. A non-finite loss has its
update skipped by the engine (DeepSpeed skips non-finite gradients; ``TrainEngine.step`` does the
same without it); ``MAX_NAN_STEPS`` of them in a row stop the run with an error.

``python -m hybrid_ds.checkpoint export CKPT_DIR OUT_DIR`` turns a checkpoint into plain HF weights.
This module imports torch lazily: config validation uses its resume checks.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

from hybrid_ds.engine.signals import Guard
from hybrid_ds.run.outputs import save_outputs, write_resolved_config

CHECKPOINTS, LATEST, COMPLETE = "checkpoints", "latest", "COMPLETE"
STATE_FILE, CONFIG_FILE, ENGINE_TAG = "trainer_state.json", "config.json", "engine"
_NAME = re.compile(r"^(warmup|step)-(\d{7,})$")
# Keys that steer the run but not its math: they may always differ on resume.
SAFE_KEYS = frozenset({"EPOCHS", "MAX_STEPS", "SAVE_EVERY", "KEEP_LAST", "LOG_EVERY", "RESUME",
                       "ALLOW_CONFIG_CHANGE", "MAX_NAN_STEPS", "DIST_TIMEOUT_S", "CLEANSE", "OUTPUT_DIR"})


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or a run cannot be resumed from one."""


def _log(msg: str) -> None:
    print(f"[hybrid_ds] {msg}", flush=True)


# --------------------------------------------------------------------------------------
# names and discovery (no torch)


def checkpoint_name(run) -> str:
    """``step-N`` with N = cycles (hybrid), SFT steps (sft) or PPO updates (ppo); ``warmup-N`` in the warm-up."""
    c, mode = run.counters, run.cfg.run.mode
    if mode == "hybrid" and c.cycle == 0 and run.cfg.hybrid.sft_warmup_steps:
        return f"warmup-{c.sft_step:07d}"
    return f"step-{unit(run):07d}"


def unit(run) -> int:
    """Steps done in the unit SAVE_EVERY and MAX_STEPS count."""
    key = {"sft": "sft_step", "ppo": "ppo_update"}.get(run.cfg.run.mode, "cycle")
    return getattr(run.counters, key)


def _order(name: str) -> Optional[tuple]:
    m = _NAME.match(name)
    return (m.group(1) == "step", int(m.group(2))) if m else None


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE)) and _order(os.path.basename(path.rstrip("/"))) is not None


def list_complete(root: str) -> list[str]:
    """Complete checkpoint directories under ``root`` (OUTPUT_DIR/checkpoints), oldest first."""
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if _order(n) and is_complete(os.path.join(root, n))]
    return [os.path.join(root, n) for n in sorted(names, key=_order)]


def find_latest(output_dir: str) -> Optional[str]:
    """The checkpoint ``latest`` names; the newest complete one if that pointer is missing or broken."""
    root = os.path.join(output_dir, CHECKPOINTS)
    try:
        with open(os.path.join(root, LATEST)) as f:
            path = os.path.join(root, f.read().strip())
        if is_complete(path):
            return path
    except OSError:
        pass
    done = list_complete(root)
    return done[-1] if done else None


def _holds_run(output_dir: str) -> bool:
    root = os.path.join(output_dir, CHECKPOINTS)
    return os.path.isfile(os.path.join(output_dir, "metrics.jsonl")) or bool(
        os.path.isdir(root) and os.listdir(root))


# --------------------------------------------------------------------------------------
# resume planning (no torch): used by config validation and by train.run


@dataclass
class ResumePoint:
    path: str  # the complete checkpoint directory
    state: dict  # its trainer_state.json
    config: dict  # its config.json (resolved, with SEED)

    @property
    def seed(self) -> int:
        return int(self.state["seed"])

    def describe(self) -> str:
        c, plan = self.state["counters"], self.state["plan"]
        parts = {"hybrid": f"cycle {c['cycle']} of {plan['cycles']}", "sft": f"SFT step {c['sft_step']}",
                 "ppo": f"PPO update {c['ppo_update']}"}
        return f"{self.path} ({parts[self.state['mode']]}; SFT steps {c['sft_step']}, PPO updates {c['ppo_update']})"


def read_point(path: str) -> ResumePoint:
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    with open(os.path.join(path, CONFIG_FILE)) as f:
        config = json.load(f)
    return ResumePoint(os.path.abspath(path), state, config)


def resolve_resume(cfg) -> tuple[Optional[ResumePoint], list[str]]:
    """The checkpoint this run continues from (None: start fresh), and the problems that forbid starting.

    RESUME=auto resumes OUTPUT_DIR's latest complete checkpoint, starts fresh in an empty OUTPUT_DIR,
    and refuses a run without one (hybrid_ds never overwrites work). never refuses any existing run.
    fresh starts over after moving the old run aside (``prepare_output_dir``). A path resumes that
    checkpoint (or that run directory's latest); from another run, OUTPUT_DIR must not hold a run.
    """
    out, how = cfg.run.output_dir, cfg.run.resume
    held = bool(out) and _holds_run(out)
    if how == "fresh":
        return None, []
    if how == "never":
        return None, [f"OUTPUT_DIR: {out!r} already holds a run and RESUME=never; choose a new OUTPUT_DIR, or "
                      f"set RESUME=auto to continue it or RESUME=fresh to move it aside."] if held else []
    if how == "auto":
        path = find_latest(out) if out else None
        if path:
            return _read_or_problem(path)
        if held:
            return None, [f"OUTPUT_DIR: {out!r} already holds a run (metrics.jsonl) but no complete checkpoint "
                          f"to resume from, and hybrid_ds never overwrites finished work: set RESUME=fresh to "
                          f"move it aside and start over, or choose a new OUTPUT_DIR."]
        return None, []
    path = os.path.abspath(os.path.expanduser(how))
    if os.path.isdir(os.path.join(path, CHECKPOINTS)):
        path = find_latest(path) or path
    if not os.path.isdir(path):
        return None, [f"RESUME: {how!r} is neither auto, never, fresh nor an existing checkpoint directory."]
    if not is_complete(path):
        return None, [f"RESUME: {path} is not a complete checkpoint (no {COMPLETE} marker: writing it was "
                      f"interrupted, or it is not a checkpoint directory)."]
    if held and not _inside(path, os.path.join(out, CHECKPOINTS)):
        return None, [f"RESUME: resuming another run's checkpoint needs an empty OUTPUT_DIR; {out!r} already "
                      f"holds a run."]
    return _read_or_problem(path)


def _read_or_problem(path: str) -> tuple[Optional[ResumePoint], list[str]]:
    try:
        return read_point(path), []
    except (OSError, ValueError, KeyError) as e:
        return None, [f"RESUME: cannot read checkpoint {path}: {e}"]


def _inside(path: str, root: str) -> bool:
    return os.path.abspath(path).startswith(os.path.abspath(root) + os.sep)


def config_differences(cfg, saved: dict) -> list[str]:
    """``KEY (saved A, now B)`` for each key that differs and is neither safe nor in ALLOW_CONFIG_CHANGE."""
    from hybrid_ds.config import Config

    now = cfg.to_json_dict()
    now["SEED"] = cfg.run.seed if cfg.run.seed is not None else saved.get("SEED")
    defaults = Config().to_json_dict()
    allowed = SAFE_KEYS | {str(k).upper() for k in cfg.run.allow_config_change}
    out = []
    for key in sorted(set(saved) | set(now)):
        if key in allowed:
            continue
        old = saved.get(key, defaults.get(key))  # a key newer than the checkpoint: its default then
        if old != now.get(key):
            out.append(f"{key} (saved {json.dumps(old)}, now {json.dumps(now.get(key))})")
    return out


def resume_problems(cfg) -> list[str]:
    """Everything about RESUME/ALLOW_CONFIG_CHANGE and OUTPUT_DIR that forbids starting (config validation)."""
    from hybrid_ds.config import key_table

    table = key_table()
    problems = [f"ALLOW_CONFIG_CHANGE: {k!r} is not a config key." for k in cfg.run.allow_config_change
                if str(k).upper() not in table]
    point, more = resolve_resume(cfg)
    problems += more
    if point is not None:
        diff = config_differences(cfg, point.config)
        if diff:
            problems.append(f"RESUME: the config differs from the one checkpoint {point.path} was written with: "
                            f"{'; '.join(diff)}. Resume with the original values, list the keys in "
                            f"ALLOW_CONFIG_CHANGE to accept the change, or set RESUME=fresh to start over.")
    return problems


def describe_resume(cfg) -> str:
    point, problems = resolve_resume(cfg)
    if problems:
        return "resume: refused (" + problems[0] + ")"
    return f"resume: from {point.describe()}" if point else "resume: none, a new run"


# --------------------------------------------------------------------------------------
# the output directory, before the run is built (rank 0 changes it, the others wait)


def prepare_output_dir(cfg, dist) -> Optional[ResumePoint]:
    """Apply RESUME to OUTPUT_DIR: move an old run aside (fresh), or cut metrics.jsonl and TensorBoard
    back to the checkpoint being resumed. Returns that checkpoint (None for a new run)."""
    out = cfg.run.output_dir
    point, problems = resolve_resume(cfg)
    if problems:  # validated before, so only a directory changed since then gets here
        raise CheckpointError("\n".join(problems))
    if dist.is_main:
        if cfg.run.resume == "fresh" and _holds_run(out):
            aside = f"{out.rstrip(os.sep)}.prev-{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(out, aside)
            _log(f"RESUME=fresh: the previous run in {out} was moved to {aside}; starting over")
        root = os.path.join(out, CHECKPOINTS)
        if os.path.isdir(root):
            for n in os.listdir(root):  # leftovers of checkpoints whose writing was interrupted
                if n.endswith(".tmp") or n.endswith(".replaced"):
                    shutil.rmtree(os.path.join(root, n), ignore_errors=True)
        if point is not None:
            _rewind_logs(cfg, point)
            if _inside(point.path, root):
                _set_aside_newer(root, os.path.basename(point.path))
    dist.barrier()
    return point


def _rewind_logs(cfg, point: ResumePoint) -> None:
    """metrics.jsonl keeps exactly the rows up to the checkpoint; TensorBoard purges the rest."""
    out = cfg.run.output_dir
    c = point.state["counters"]
    limit = {"sft": c["sft_step"], "ppo": c["ppo_update"]}
    other = c[{"sft": "sft_step", "ppo": "ppo_update"}.get(point.state["mode"], "cycle")]
    path = os.path.join(out, "metrics.jsonl")
    src = path if os.path.isfile(path) else os.path.join(os.path.dirname(os.path.dirname(point.path)),
                                                         "metrics.jsonl")  # resuming another run
    rows = []
    if os.path.isfile(src):
        with open(src, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    kept = [r for r in rows if r.get("step", 0) <= limit.get(r.get("phase"), other)]
    os.makedirs(out, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(path + ".tmp", path)
    if len(kept) < len(rows):
        _log(f"metrics.jsonl: dropped {len(rows) - len(kept)} row(s) logged after the checkpoint")
    # TensorBoard: a session-start event at the purge step hides every later event of the old run;
    # kept rows at or after it are written again so nothing goes missing.
    purge = min(limit.values()) + 1 if point.state["mode"] == "hybrid" else other + 1
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - TensorBoard is optional
        return
    w = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=purge)
    for r in kept:
        if r.get("step", 0) >= purge:
            for k, v in r.items():
                if k not in ("step", "phase", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                    w.add_scalar(k, float(v), r["step"])
    w.close()


def _set_aside_newer(root: str, name: str) -> None:
    """Resuming an older checkpoint abandons the newer ones: move them to ``superseded-<time>/``."""
    newer = [p for p in list_complete(root) if _order(os.path.basename(p)) > _order(name)]
    if not newer:
        return
    dest = os.path.join(root, f"superseded-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(dest, exist_ok=True)
    for p in newer:
        os.rename(p, os.path.join(dest, os.path.basename(p)))
    _write_latest(root, name)
    _log(f"resuming {name}: {len(newer)} newer checkpoint(s) moved to {dest}")


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
    dist.barrier()
    # 1. every rank: the engine shards (DeepSpeed), its RNG states; rank 0: the rest
    ref_state = _reference_state(run)  # collective under ZeRO-3
    error = ""
    try:
        if dist.uses_deepspeed:
            run.engine.wrapped.save_checkpoint(tmp, tag=ENGINE_TAG, save_latest=False)
        _save_rng(tmp, dist.rank, rng)
        if dist.is_main:
            _save_main(run, tmp, ref_state)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        error = str(e)
    if not _all_ok(dist, not error):
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {tmp}: {error or 'another rank failed writing'}; "
                              f"{keep}.")
    # 2. rank 0 makes it visible: COMPLETE, rename, then the latest pointer; then prune
    error = ""
    if dist.is_main:
        try:
            _fsync_tree(tmp)
            _write_json(os.path.join(tmp, COMPLETE), {"name": name, "counters": run.counters.state_dict(),
                                                      "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            if os.path.exists(final):  # only after resuming an older checkpoint in odd ways
                os.rename(final, final + ".replaced")
            os.rename(tmp, final)
            _fsync_dir(root)
            _write_latest(root, name)
            shutil.rmtree(final + ".replaced", ignore_errors=True)
        except OSError as e:
            error = str(e)
    if not _all_ok(dist, not error):
        raise CheckpointError(f"could not publish checkpoint {final}: {error or 'rank 0 failed'}; {keep}.")
    if dist.is_main:
        _prune(root, cfg.run.keep_last, name)
    # 3. merged weights, from the same state
    save_outputs(run)
    restore_rng(rng)
    if run.guard is not None:
        run.guard.last_saved = name
    if dist.is_main:
        _log(f"checkpoint {final} ({time.perf_counter() - t0:.1f}s)")
    return final


def _all_ok(dist, ok: bool) -> bool:
    """True on every rank when every rank is ok (also a barrier)."""
    import torch

    return float(dist.all_reduce_max(torch.tensor([0.0 if ok else 1.0]))[0]) == 0.0


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
    _write_json(os.path.join(path, STATE_FILE), state)
    write_resolved_config(cfg, run.seed, os.path.join(path, CONFIG_FILE))
    torch.save({k: s.state_dict() for k, s in run.schedules.items()}, os.path.join(path, "schedules.pt"))
    if not dist.uses_deepspeed:
        torch.save(run.engine.module.state_dict(), os.path.join(path, "model.pt"))
        torch.save(run.engine.optimizer.state_dict(), os.path.join(path, "optimizer.pt"))
    if ref_state is not None:
        torch.save(ref_state, os.path.join(path, "reference.pt"))
    hf = os.path.join(path, "hf")
    run.engine.module.lm.config.save_pretrained(hf)
    run.engine.module.lm.generation_config.save_pretrained(hf)
    run.tokenizer.save_pretrained(hf)


def _reference_state(run) -> Optional[dict]:
    """The reference model's weights on rank 0 when it is a snapshot (REF_INIT=after_warmup), else None."""
    if not run.counters.ref_snapshot or run.ref is None:
        return None
    return run.dist.frozen_state_dict(run.ref)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _write_latest(root: str, name: str) -> None:
    tmp = os.path.join(root, LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, LATEST))
    _fsync_dir(root)


def _fsync_tree(path: str) -> None:
    for d, _, files in os.walk(path):
        for n in files:
            fd = os.open(os.path.join(d, n), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
            _log(f"warning: could not delete old checkpoint {p}: {e}")


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
    torch.save(state, os.path.join(path, "rng", f"rank-{rank:05d}.pt"))


# --------------------------------------------------------------------------------------
# load


def attach(run, point: Optional[ResumePoint]) -> None:
    """Give ``run`` its fault guard (signal handlers) and, when resuming, the checkpoint's whole state."""
    run.guard = Guard()  # hybrid_ds.engine.signals
    if point is not None:
        if run.dist.is_main:
            _log(f"resuming from {point.describe()}")
        load_checkpoint(run, point)
        if _inside(point.path, os.path.join(run.cfg.run.output_dir, CHECKPOINTS)):
            run.guard.last_saved = os.path.basename(point.path)
    run.guard.install()


def load_checkpoint(run, point: ResumePoint) -> None:
    """Restore engine, optimizer, schedules, counters, data positions, KL, reward and RNG states."""
    import torch

    st, dist, path = point.state, run.dist, point.path
    layout = (st["world"], st["zero_stage"], st["precision"])
    if layout != (dist.world, dist.zero_stage, dist.plan.mixed_precision):
        msg = (f"checkpoint {path} was written by {st['world']} process(es), ZeRO stage {st['zero_stage']}, "
               f"precision {st['precision']}; this launch has {dist.world}, {dist.zero_stage}, "
               f"{dist.plan.mixed_precision}")
        if dist.uses_deepspeed or st["engine"] == "deepspeed":
            raise CheckpointError(msg + ": relaunch with the same layout to resume.")
        if dist.is_main:
            _log(f"warning: {msg}; the model and optimizer resume, per-rank sampling will differ")
    # 1. weights and optimizer
    if dist.uses_deepspeed:
        loaded, _ = run.engine.wrapped.load_checkpoint(path, tag=ENGINE_TAG, load_optimizer_states=True,
                                                       load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load {os.path.join(path, ENGINE_TAG)}.")
    else:
        dev = dist.device
        run.engine.module.load_state_dict(torch.load(os.path.join(path, "model.pt"), map_location=dev))
        run.engine.optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location=dev))
    if os.path.isfile(os.path.join(path, "reference.pt")):
        dist.load_frozen_state_dict(run.ref, torch.load(os.path.join(path, "reference.pt"), map_location="cpu"))
    # 2. schedules, counters, data positions, KL controller, reward statistics
    schedules = torch.load(os.path.join(path, "schedules.pt"), weights_only=False)
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
        restore_rng(torch.load(rng_file, weights_only=False))
    elif dist.is_main:
        _log(f"warning: {rng_file} is missing; this rank's sampling starts from its seed")


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
        _log(f"{phase} schedule re-planned for {sched.total_steps} steps (was {state['total_steps']}); "
             f"continuing at step {state['steps_done']} with lr {sched.lr:.3g}")


# --------------------------------------------------------------------------------------
# the end of a run


def finish(run) -> bool:
    """The final checkpoint (unless the last step was just saved) and merged weights.
    Returns False when the run stopped early on a signal."""
    g = run.guard
    if g is not None and g.stopped_by:
        if run.dist.is_main:
            _log(f"stopped by {g.stopped_by} after {checkpoint_name(run)}; checkpoint "
                 f"{os.path.join(run.cfg.run.output_dir, CHECKPOINTS, g.last_saved)}. "
                 f"Run the same command again to resume.")
        g.uninstall()
        return False
    if g is None or g.last_saved != checkpoint_name(run):
        save_checkpoint(run)
    if g is not None:
        g.uninstall()
    return True


# --------------------------------------------------------------------------------------
# export: python -m hybrid_ds.checkpoint export CKPT_DIR OUT_DIR


def export(ckpt: str, out_dir: str, with_value_head: bool = False) -> str:
    """Write checkpoint ``ckpt`` (or a run directory's latest) as plain HF weights + tokenizer in ``out_dir``.

    DeepSpeed checkpoints are consolidated with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``
    (fp32 master weights, whatever the training precision)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if os.path.isdir(os.path.join(ckpt, CHECKPOINTS)):
        ckpt = find_latest(ckpt) or ckpt
    if not is_complete(ckpt):
        raise CheckpointError(f"{ckpt} is not a complete checkpoint (no {COMPLETE} marker).")
    point = read_point(ckpt)
    if point.state["engine"] == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag=ENGINE_TAG)
    else:
        state = torch.load(os.path.join(ckpt, "model.pt"), map_location="cpu")
    hf = os.path.join(ckpt, "hf")
    with torch.device("meta"):  # a skeleton for save_pretrained's naming and tied-weight handling
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf))
    model.generation_config = GenerationConfig.from_pretrained(hf)
    lm_state = {k[len("lm."):]: v.float().contiguous() for k, v in state.items() if k.startswith("lm.")}
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=lm_state, safe_serialization=True)
    AutoTokenizer.from_pretrained(hf).save_pretrained(out_dir)
    if with_value_head:
        from hybrid_ds.models.policy_value import VALUE_HEAD_FILE

        vh = {k[len("v_head."):]: v.float().clone() for k, v in state.items() if k.startswith("v_head.")}
        torch.save(vh, os.path.join(out_dir, VALUE_HEAD_FILE))
    return out_dir


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m hybrid_ds.checkpoint",
                                description="Work with hybrid_ds checkpoints.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write a checkpoint as plain Hugging Face weights + tokenizer")
    e.add_argument("ckpt", help="a checkpoint directory (OUTPUT_DIR/checkpoints/step-XXXXXXX) or a run's OUTPUT_DIR")
    e.add_argument("out", help="output directory")
    e.add_argument("--with-value-head", action="store_true", help="also write value_head.pt (as ppo_full/)")
    args = p.parse_args(argv)
    try:
        out = export(args.ckpt, args.out, args.with_value_head)
    except (CheckpointError, OSError) as err:
        print(f"hybrid_ds: {err}", file=sys.stderr)
        return 2
    print(f"[hybrid_ds] exported {args.ckpt} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
