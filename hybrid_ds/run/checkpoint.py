"""Checkpoints, exact resume, merged weights, and surviving faults.

On disk, under ``OUTPUT_DIR/checkpoints/``::

    latest                      name of the newest complete checkpoint (rewritten atomically)
    step-0000004/               after hybrid cycle 4 (SFT step / PPO update 4 in sft / ppo mode)
      COMPLETE                  written last: a directory without it is never resumed
      engine/                   DeepSpeed: the engine as ``save_checkpoint`` shards it (weights, optimizer)
      model.pt, optimizer.pt    without DeepSpeed: the model and optimizer state dicts (rank 0)
      schedules.pt              the phases' learning-rate schedules
      trainer_state.json        counters, data positions, KL controller, reward statistics, launch layout
      rng/rank-00000.pt         python, numpy, torch (and CUDA) generators as tensors, one file per rank
      reference.pt              the reference model, when REF_INIT=after_warmup took its snapshot
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


class ResumeError(CheckpointError):
    """A checkpoint or OUTPUT_DIR this run must not use as it is: a damaged or unsafe checkpoint, another
    launch layout, OUTPUT_DIR held by another run. Found before anything is changed; the run exits 2."""


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
    metrics_bytes: Optional[int] = None  # size of metrics.jsonl when this run started from it (main rank)

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
        root, name = os.path.dirname(path), os.path.basename(path)
        older = [p for p in list_complete(root) if _order(os.path.basename(p)) < _order(name)] if _order(name) else []
        hint = f" To continue from the previous complete checkpoint, set RESUME={older[-1]}." if older else ""
        return None, [f"RESUME: cannot read checkpoint {path}: {e}.{hint}"]


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
    busy = output_dir_busy(cfg.run.output_dir) if cfg.run.output_dir else ""
    if busy:
        return problems + [busy]
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
#
# One run at a time: the main rank holds an flock on OUTPUT_DIR/.lock for the whole run (the file
# names the holder: pid, host, start time); the kernel drops it when the process dies, so a lock
# left by a killed run is simply taken over.
#
# Resuming is a transaction that never deletes anything. Before anything changes, the checkpoint
# is verified completely (every file present, intact, loadable with weights_only=True). Until the
# resumed run publishes its own first complete checkpoint, the newer checkpoints, ``latest`` and
# metrics.jsonl stay as they were; the new rows are appended and RESUME_JOURNAL records where they
# start. Publishing that checkpoint (``_finish_resume``) first moves the newer checkpoints to
# ``checkpoints/superseded-<time>/`` and the old rows logged after the resume point to
# ``metrics.superseded-<time>.jsonl``, then makes the new checkpoint ``latest``. A resumed run that
# dies before that leaves the journal: the next start moves the rows it appended to
# ``metrics.abandoned-<time>.jsonl`` and finds OUTPUT_DIR as it was before that run.

LOCK_FILE, RESUME_JOURNAL = ".lock", "resume-pending.json"
_held_lock: Optional[int] = None  # descriptor of the OUTPUT_DIR lock this process holds
# Globals that DeepSpeed's own checkpoint files may name (besides torch's weights_only allowlist);
# DeepSpeed unpickles them with weights_only=False, so verify_checkpoint refuses any other.
DEEPSPEED_SAFE_GLOBALS = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler", "deepspeed.utils.tensor_fragment.fragment_address"})


def prepare_output_dir(cfg, dist) -> Optional[ResumePoint]:
    """Lock OUTPUT_DIR and apply RESUME: move an old run aside (fresh), or verify the checkpoint to
    resume and open the resume transaction. Returns that checkpoint (None for a new run). Raises
    ResumeError on every rank, with nothing changed, when OUTPUT_DIR is in use or the checkpoint is
    damaged."""
    out = cfg.run.output_dir
    point, problems = resolve_resume(cfg)
    if problems:  # validated before, so only a directory changed since then gets here
        raise ResumeError("\n".join(problems))
    problem = ""
    if dist.is_main:
        try:
            lock_output_dir(out)
            _recover_abandoned_resume(out)
            if point is not None:
                verify_checkpoint(point, cfg.run.resume)
            if cfg.run.resume == "fresh" and _holds_run(out):
                aside = f"{out.rstrip(os.sep)}.prev-{time.strftime('%Y%m%d-%H%M%S')}"
                os.rename(out, aside)  # the lock moves with it; take the new directory's
                lock_output_dir(out)
                _log(f"RESUME=fresh: the previous run in {out} was moved to {aside}; starting over")
            root = os.path.join(out, CHECKPOINTS)
            if os.path.isdir(root):
                for n in os.listdir(root):  # leftovers of checkpoints whose writing was interrupted
                    if n.endswith(".tmp") or n.endswith(".replaced"):
                        shutil.rmtree(os.path.join(root, n), ignore_errors=True)
            if point is not None:
                _begin_resume(cfg, point)
        except (ResumeError, OSError) as e:
            problem = str(e) if isinstance(e, ResumeError) else f"OUTPUT_DIR {out}: {e}"
    problem = dist.broadcast_object(problem)  # every rank learns the main rank's decision
    if problem:
        raise ResumeError(problem)
    return point


def lock_output_dir(out: str) -> None:
    """Hold OUTPUT_DIR for this process (flock on OUTPUT_DIR/.lock until release or exit). Raises
    ResumeError naming the holder when another process holds it; a lock whose holder died is
    taken over, and said so."""
    import fcntl
    import socket

    global _held_lock
    os.makedirs(out, exist_ok=True)
    fd = os.open(os.path.join(out, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        raise ResumeError(_busy_message(out, holder)) from None
    stale = _lock_holder(fd)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    os.fsync(fd)
    if _held_lock is not None:  # RESUME=fresh moved the old directory (and its lock) aside
        release_output_dir()
    _held_lock = fd
    if stale and (stale.get("pid"), stale.get("host")) != (me["pid"], me["host"]):
        _log(f"OUTPUT_DIR {out}: took over the lock of pid {stale.get('pid')} on host {stale.get('host')} "
             f"(started {stale.get('started')}), which ended without releasing it (killed or crashed)")


def release_output_dir() -> None:
    """Drop the OUTPUT_DIR lock (a clean end leaves no holder in the file)."""
    global _held_lock
    if _held_lock is None:
        return
    fd, _held_lock = _held_lock, None
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass
    os.close(fd)  # closing drops the flock


def output_dir_busy(out: str) -> str:
    """The refusal when another process holds OUTPUT_DIR's lock, else "" (a probe: takes no lock)."""
    import fcntl

    try:
        fd = os.open(os.path.join(out, LOCK_FILE), os.O_RDONLY)
    except OSError:
        return ""
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: probing ranks never block each other
        except BlockingIOError:
            holder = _lock_holder(fd)
            return "" if holder and holder.get("pid") == os.getpid() else _busy_message(out, holder)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return ""
    finally:
        os.close(fd)


def _lock_holder(fd: int) -> Optional[dict]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _busy_message(out: str, holder: Optional[dict]) -> str:
    who = (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}" if holder
           else "its pid is not recorded yet")
    return (f"OUTPUT_DIR {out} is in use by another hybrid_ds run ({who}; it holds {os.path.join(out, LOCK_FILE)}). "
            f"Two runs in one OUTPUT_DIR would overwrite each other's checkpoints and metrics: wait for that run to "
            f"end or stop it, or choose another OUTPUT_DIR.")


# -- verifying a checkpoint before it is used


def verify_checkpoint(point: ResumePoint, how: str = "") -> None:
    """Every file of checkpoint ``point`` present, intact and loadable without running code from it
    (torch files with weights_only=True; DeepSpeed's own files naming only DEEPSPEED_SAFE_GLOBALS).
    Raises ResumeError naming the file and the way on. Reads every file once; changes nothing."""
    problem = checkpoint_problem(point)
    if not problem:
        return
    root = os.path.dirname(point.path)
    older = [p for p in list_complete(root) if _order(os.path.basename(p)) < _order(os.path.basename(point.path))]
    msg = f"checkpoint {point.path} cannot be resumed: {problem}. Nothing was changed."
    if older:
        msg += (f" To continue from the previous complete checkpoint, run again with RESUME={older[-1]}: this one "
                f"and any newer stay on disk until that run has written its own first checkpoint, then move to "
                f"{os.path.join(root, 'superseded-<time>')}/.")
    else:
        msg += " No earlier complete checkpoint exists here."
    raise ResumeError(msg + " RESUME=fresh starts over (moving this run aside).")


def checkpoint_problem(point: ResumePoint) -> str:
    """What is wrong with checkpoint ``point``'s files ("" when nothing is)."""
    st, path = point.state, point.path
    try:
        world, deepspeed = int(st["world"]), st["engine"] == "deepspeed"
        counters = st["counters"]
    except (KeyError, TypeError, ValueError) as e:
        return f"{os.path.join(path, STATE_FILE)} lacks {e}"
    files = [("schedules.pt", "torch"), (os.path.join("hf", "config.json"), "json")]
    files += [(os.path.join("rng", f"rank-{r:05d}.pt"), "torch") for r in range(world)]
    if counters.get("ref_snapshot"):
        files.append(("reference.pt", "torch"))
    if deepspeed:
        engine = os.path.join(path, ENGINE_TAG)
        names = sorted(os.listdir(engine)) if os.path.isdir(engine) else []
        for r in range(world):
            if not any(re.search(rf"zero_pp_rank_{r}_mp_rank_\d+_optim_states\.pt$", n) for n in names):
                return f"{engine} has no optimizer shard of rank {r} (zero_pp_rank_{r}_..._optim_states.pt)"
        if not any(n.endswith("model_states.pt") for n in names):
            return f"{engine} has no model states (*model_states.pt)"
        files += [(os.path.join(ENGINE_TAG, n), "deepspeed") for n in names if n.endswith(".pt")]
    else:
        files += [("model.pt", "torch"), ("optimizer.pt", "torch")]
    for name, kind in files:
        problem = _file_problem(os.path.join(path, name), kind)
        if problem:
            return problem
    return ""


def _file_problem(path: str, kind: str) -> str:
    import zipfile

    if not os.path.isfile(path):
        return f"{path} is missing"
    try:
        if kind == "json":
            with open(path) as f:
                json.load(f)
            return ""
        with zipfile.ZipFile(path) as z:  # torch.save writes a zip with a CRC per entry
            bad = z.testzip()
        if bad:
            return f"{path} is damaged (entry {bad} fails its checksum)"
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        return f"{path} is damaged or truncated ({e})"
    import torch

    if kind == "deepspeed":  # DeepSpeed unpickles these itself, with weights_only=False
        unsafe = set(_unsafe_globals(path)) - DEEPSPEED_SAFE_GLOBALS
        return (f"{path} names {', '.join(sorted(unsafe))}: loading it would run code from the file, and "
                f"DeepSpeed's checkpoints never need that") if unsafe else ""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to load means the file cannot be resumed from
        return _load_problem(path, e)
    return ""


# torch's own plain-data globals, for torch without get_unsafe_globals_in_checkpoint (before 2.5)
_TORCH_DATA_GLOBAL = re.compile(r"^(torch\._utils\._rebuild_\w+|torch\._tensor\._rebuild_\w+|torch\.\w*Storage|"
                                r"torch\.Size|torch\.device|torch\.(b?float|half|u?int|bool|complex)\d*|"
                                r"torch\.Tensor|collections\.OrderedDict|_codecs\.encode)$")


def _unsafe_globals(path: str) -> list[str]:
    """The globals the pickle in torch archive ``path`` names beyond torch's plain data (nothing runs)."""
    import torch

    if hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    names, strings = [], []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            names.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(f"{strings[-2]}.{strings[-1]}")
        elif isinstance(arg, str):
            strings.append(arg)
    return [n for n in names if not _TORCH_DATA_GLOBAL.match(n)]


def _load_problem(path: str, e: Exception) -> str:
    import pickle

    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, pickle.UnpicklingError):
        return (f"{path} holds pickled objects that loading would run as code ({first}); hybrid_ds loads "
                f"checkpoint files with weights_only=True only (a checkpoint written by an older hybrid_ds "
                f"stored its RNG states this way and cannot be resumed)")
    return f"{path} cannot be loaded ({first})"


# -- the resume transaction


def _begin_resume(cfg, point: ResumePoint) -> None:
    """Open the resume transaction (main rank): record where the new run's metrics rows will start,
    and purge TensorBoard's view past the checkpoint. Nothing is deleted or moved."""
    out = cfg.run.output_dir
    if not _inside(point.path, os.path.join(out, CHECKPOINTS)):  # another run's: copy its rows up to the point
        _rewind_logs(cfg, point)
        return
    path = os.path.join(out, "metrics.jsonl")
    st = os.stat(path) if os.path.isfile(path) else None
    point.metrics_bytes = st.st_size if st else 0
    tmp = os.path.join(out, RESUME_JOURNAL + ".tmp")
    _write_json(tmp, {"from": os.path.basename(point.path), "metrics_inode": st.st_ino if st else None,
                      "metrics_bytes": point.metrics_bytes, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    os.replace(tmp, os.path.join(out, RESUME_JOURNAL))
    _purge_tensorboard(out, point, [r for r in _read_rows(path) if _logged_by(point, r)])


def _finish_resume(run, root: str, point: ResumePoint) -> None:
    """Close the resume transaction (main rank), when the resumed run's first checkpoint is complete but
    not yet renamed: newer checkpoints go to superseded-<time>/, then old rows logged after the
    resume point go to a side file. The caller then renames the checkpoint and moves ``latest``."""
    out = run.cfg.run.output_dir
    newer = [p for p in list_complete(root) if _order(os.path.basename(p)) > _order(os.path.basename(point.path))]
    if newer:
        dest = _aside_path(root, "superseded", "")
        os.makedirs(dest)
        for p in newer:
            os.rename(p, os.path.join(dest, os.path.basename(p)))
        _fsync_dir(root)
        _log(f"resumed {os.path.basename(point.path)}: {len(newer)} newer checkpoint(s) moved to {dest}")
    _rewind_metrics(out, point, new_from=point.metrics_bytes)
    run.logger.reopen()  # metrics.jsonl is a new file now
    try:
        os.remove(os.path.join(out, RESUME_JOURNAL))
    except FileNotFoundError:
        pass


def _recover_abandoned_resume(out: str) -> None:
    """A resumed run that ended before its first checkpoint left RESUME_JOURNAL; the rows it appended
    to metrics.jsonl belong to no checkpoint: move them to metrics.abandoned-<time>.jsonl."""
    journal = os.path.join(out, RESUME_JOURNAL)
    try:
        with open(journal) as f:
            j = json.load(f)
    except FileNotFoundError:
        return
    except ValueError:
        j = {}
    path = os.path.join(out, "metrics.jsonl")
    st = os.stat(path) if os.path.isfile(path) else None
    start = j.get("metrics_bytes")
    if st is not None and st.st_ino == j.get("metrics_inode") and isinstance(start, int) and st.st_size > start:
        with open(path, "rb") as f:
            f.seek(start)
            tail = f.read()
        aside = _aside_path(out, "metrics.abandoned", ".jsonl")
        with open(aside, "wb") as f:
            f.write(tail)
            f.flush()
            os.fsync(f.fileno())
        os.truncate(path, start)
        _log(f"metrics.jsonl: {len([ln for ln in tail.splitlines() if ln.strip()])} row(s) of a run resumed from "
             f"{j.get('from')} that ended before its first checkpoint moved to {aside}")
    os.remove(journal)


def _aside_path(parent: str, stem: str, ext: str) -> str:
    base = os.path.join(parent, f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    path, n = base + ext, 1
    while os.path.exists(path):
        path, n = f"{base}.{n}{ext}", n + 1
    return path


def _logged_by(point: ResumePoint, row: dict) -> bool:
    """Whether metrics row ``row`` was logged at or before checkpoint ``point``."""
    c = point.state["counters"]
    limit = {"sft": c["sft_step"], "ppo": c["ppo_update"]}
    other = c[{"sft": "sft_step", "ppo": "ppo_update"}.get(point.state["mode"], "cycle")]
    return row.get("step", 0) <= limit.get(row.get("phase"), other)


def _read_rows(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _rewind_logs(cfg, point: ResumePoint) -> None:
    """metrics.jsonl keeps exactly the rows up to the checkpoint (:func:`_rewind_metrics`); TensorBoard
    purges the rest."""
    _purge_tensorboard(cfg.run.output_dir, point, _rewind_metrics(cfg.run.output_dir, point))


def _rewind_metrics(out: str, point: ResumePoint, new_from: Optional[int] = None) -> list[dict]:
    """metrics.jsonl keeps the rows logged up to checkpoint ``point`` and, from byte ``new_from`` on, the
    rows of the run resumed from it; the other rows move to metrics.superseded-<time>.jsonl (a
    checkpoint of another run: its rows are copied, its file left alone). Returns the old rows kept."""
    path = os.path.join(out, "metrics.jsonl")
    src = path if os.path.isfile(path) else os.path.join(os.path.dirname(os.path.dirname(point.path)),
                                                         "metrics.jsonl")  # resuming another run
    data = b""
    if os.path.isfile(src):
        with open(src, "rb") as f:
            data = f.read()
    cut = len(data) if new_from is None else new_from
    old = [ln for ln in data[:cut].splitlines(keepends=True) if ln.strip()]
    new = [ln for ln in data[cut:].splitlines(keepends=True) if ln.strip()]
    rows = [json.loads(ln) for ln in old]
    kept = [ln for ln, r in zip(old, rows) if _logged_by(point, r)]
    later = [ln for ln, r in zip(old, rows) if not _logged_by(point, r)]
    os.makedirs(out, exist_ok=True)
    note = ""
    if later and src == path:
        aside = _aside_path(out, "metrics.superseded", ".jsonl")
        with open(aside, "wb") as f:
            f.writelines(later)
            f.flush()
            os.fsync(f.fileno())
        note = f" (kept in {aside})"
    with open(path + ".tmp", "wb") as f:
        f.writelines(ln if ln.endswith(b"\n") else ln + b"\n" for ln in kept + new)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    _fsync_dir(out)
    if later:
        _log(f"metrics.jsonl: dropped {len(later)} row(s) logged after the checkpoint{note}")
    return [r for r in rows if _logged_by(point, r)]


def _purge_tensorboard(out: str, point: ResumePoint, kept: list[dict]) -> None:
    # TensorBoard: a session-start event at the purge step hides every later event of the old run
    # (its event files stay on disk); kept rows at or after it are written again so nothing goes missing.
    c = point.state["counters"]
    limit = {"sft": c["sft_step"], "ppo": c["ppo_update"]}
    other = c[{"sft": "sft_step", "ppo": "ppo_update"}.get(point.state["mode"], "cycle")]
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
            if run.guard is not None and run.guard.resuming is not None:
                _finish_resume(run, root, run.guard.resuming)  # newer checkpoints aside, metrics rewound
            if os.path.exists(final):  # an incomplete leftover of that name (complete ones were set aside)
                os.rename(final, final + ".replaced")
            os.rename(tmp, final)
            _fsync_dir(root)
            _write_latest(root, name)
            shutil.rmtree(final + ".replaced", ignore_errors=True)
        except OSError as e:
            error = str(e)
    if not _all_ok(dist, not error):
        raise CheckpointError(f"could not publish checkpoint {final}: {error or 'rank 0 failed'}; {keep}.")
    if run.guard is not None:
        run.guard.resuming = None
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
            _log(f"resuming from {point.describe()}")
        load_checkpoint(run, point)
        if _inside(point.path, os.path.join(run.cfg.run.output_dir, CHECKPOINTS)):
            run.guard.last_saved = os.path.basename(point.path)
            run.guard.resuming = point
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
            _log(f"warning: {msg}; the model and optimizer resume, per-rank sampling will differ")
    # 1. weights and optimizer
    if dist.uses_deepspeed:
        loaded, _ = run.engine.wrapped.load_checkpoint(path, tag=ENGINE_TAG, load_optimizer_states=True,
                                                       load_lr_scheduler_states=False)
        if loaded is None:
            raise ResumeError(f"DeepSpeed could not load {os.path.join(path, ENGINE_TAG)}.")
    else:
        dev = dist.device
        run.engine.module.load_state_dict(_load(os.path.join(path, "model.pt"), dev))
        run.engine.optimizer.load_state_dict(_load(os.path.join(path, "optimizer.pt"), dev))
    if os.path.isfile(os.path.join(path, "reference.pt")):
        dist.load_frozen_state_dict(run.ref, _load(os.path.join(path, "reference.pt")))
    # 2. schedules, counters, data positions, KL controller, reward statistics
    schedules = _load(os.path.join(path, "schedules.pt"))
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
        restore_rng(_rng_from_file(_load(rng_file)))
    elif dist.is_main:
        _log(f"warning: {rng_file} is missing; this rank's sampling starts from its seed")


def _load(path: str, map_location="cpu"):
    """A checkpoint file, loaded with weights_only=True: a file cannot run code (ResumeError if it tries)."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means the file cannot be resumed from
        raise ResumeError(f"cannot resume: {_load_problem(path, e)}.") from None


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
        state = torch.load(os.path.join(ckpt, "model.pt"), map_location="cpu", weights_only=True)
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
