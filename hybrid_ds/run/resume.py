"""Resume: which checkpoint a run continues from (RESUME), what may differ from it, and the resume
transaction on OUTPUT_DIR.

Resuming is a transaction that never deletes anything. Before anything changes, the checkpoint
is verified completely (:mod:`hybrid_ds.run.checkpoint_verify`). Until the resumed run publishes
its own first complete checkpoint, the newer checkpoints, ``latest`` and metrics.jsonl stay as
they were; the new rows are appended and RESUME_JOURNAL records where they start. Publishing that
checkpoint (:func:`finish_resume`) first moves the newer checkpoints to
``checkpoints/superseded-<time>/`` and the old rows logged after the resume point to
``metrics.superseded-<time>.jsonl``, then makes the new checkpoint ``latest``. A resumed run that
dies before that leaves the journal: the next start moves the rows it appended to
``metrics.abandoned-<time>.jsonl`` and finds OUTPUT_DIR as it was before that run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from typing import Optional

from hybrid_ds.run.checkpoint_dir import (
    CHECKPOINTS,
    COMPLETE,
    ResumeError,
    ResumePoint,
    checkpoint_order,
    find_latest,
    fsync_dir,
    holds_run,
    is_complete,
    list_complete,
    log,
    read_point,
    write_json,
)
from hybrid_ds.run.checkpoint_verify import verify_checkpoint
from hybrid_ds.run.output_lock import RESUME_JOURNAL, lock_output_dir, output_dir_busy

# Keys that steer the run but not its math: they may always differ on resume.
SAFE_KEYS = frozenset({"EPOCHS", "MAX_STEPS", "SAVE_EVERY", "KEEP_LAST", "LOG_EVERY", "RESUME",
                       "ALLOW_CONFIG_CHANGE", "MAX_NAN_STEPS", "DIST_TIMEOUT_S", "CLEANSE", "OUTPUT_DIR"})
# Evaluation reads the policy and changes nothing of training (tests/test_eval.py), so its keys may too.
SAFE_KEYS |= {"EVAL_FILE", "EVAL_SPLIT", "EVAL_EVERY", "EVAL_NUM_SAMPLES"}
# Where metrics and samples are reported only reads the run (hybrid_ds/engine/trackers.py, run/samples.py).
SAFE_KEYS |= {"REPORT_TO", "TRACKER_PROJECT", "LOG_SAMPLES_EVERY", "LOG_SAMPLES_ROWS"}


def resolve_resume(cfg) -> tuple[Optional[ResumePoint], list[str]]:
    """The checkpoint this run continues from (None: start fresh), and the problems that forbid starting.

    RESUME=auto resumes OUTPUT_DIR's latest complete checkpoint, starts fresh in an empty OUTPUT_DIR,
    and refuses a run without one (hybrid_ds never overwrites work). never refuses any existing run.
    fresh starts over after moving the old run aside (``prepare_output_dir``). A path resumes that
    checkpoint (or that run directory's latest); from another run, OUTPUT_DIR must not hold a run.
    """
    out, how = cfg.run.output_dir, cfg.run.resume
    held = bool(out) and holds_run(out)
    if how == "fresh":
        return None, []
    if how == "never":
        return None, [f"OUTPUT_DIR: {out!r} already holds a run and RESUME=never; choose a new OUTPUT_DIR, or "
                      f"set RESUME=auto to continue it or RESUME=fresh to move it aside."] if held else []
    if how == "auto":
        path = find_latest(out) if out else None
        if path:
            return read_or_problem(path)
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
    if held and not inside(path, os.path.join(out, CHECKPOINTS)):
        return None, [f"RESUME: resuming another run's checkpoint needs an empty OUTPUT_DIR; {out!r} already "
                      f"holds a run."]
    return read_or_problem(path)


def read_or_problem(path: str) -> tuple[Optional[ResumePoint], list[str]]:
    try:
        return read_point(path), []
    except (OSError, ValueError, KeyError) as e:
        root, name = os.path.dirname(path), os.path.basename(path)
        older = [p for p in list_complete(root) if checkpoint_order(os.path.basename(p)) < checkpoint_order(name)] if checkpoint_order(name) else []
        hint = f" To continue from the previous complete checkpoint, set RESUME={older[-1]}." if older else ""
        return None, [f"RESUME: cannot read checkpoint {path}: {e}.{hint}"]


def inside(path: str, root: str) -> bool:
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
            recover_abandoned_resume(out)
            if point is not None:
                verify_checkpoint(point, cfg.run.resume)
            if cfg.run.resume == "fresh" and holds_run(out):
                aside = f"{out.rstrip(os.sep)}.prev-{time.strftime('%Y%m%d-%H%M%S')}"
                os.rename(out, aside)  # the lock moves with it; take the new directory's
                lock_output_dir(out)
                log(f"RESUME=fresh: the previous run in {out} was moved to {aside}; starting over")
            root = os.path.join(out, CHECKPOINTS)
            if os.path.isdir(root):
                for n in os.listdir(root):  # leftovers of checkpoints whose writing was interrupted
                    if n.endswith(".tmp") or n.endswith(".replaced"):
                        shutil.rmtree(os.path.join(root, n), ignore_errors=True)
            if point is not None:
                begin_resume(cfg, point)
        except (ResumeError, OSError) as e:
            problem = str(e) if isinstance(e, ResumeError) else f"OUTPUT_DIR {out}: {e}"
    problem = dist.broadcast_object(problem)  # every rank learns the main rank's decision
    if problem:
        raise ResumeError(problem)
    return point


def begin_resume(cfg, point: ResumePoint) -> None:
    """Open the resume transaction (main rank): record where the new run's metrics rows will start,
    and purge TensorBoard's view past the checkpoint. Nothing is deleted or moved."""
    out = cfg.run.output_dir
    if not inside(point.path, os.path.join(out, CHECKPOINTS)):  # another run's: copy its rows up to the point
        rewind_logs(cfg, point)
        return
    path = os.path.join(out, "metrics.jsonl")
    st = os.stat(path) if os.path.isfile(path) else None
    point.metrics_bytes = st.st_size if st else 0
    tmp = os.path.join(out, RESUME_JOURNAL + ".tmp")
    write_json(tmp, {"from": os.path.basename(point.path), "metrics_inode": st.st_ino if st else None,
                      "metrics_bytes": point.metrics_bytes, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    os.replace(tmp, os.path.join(out, RESUME_JOURNAL))
    _purge_tensorboard(out, point, [r for r in _read_rows(path) if _logged_by(point, r)])


def finish_resume(run, root: str, point: ResumePoint) -> None:
    """Close the resume transaction (main rank), when the resumed run's first checkpoint is complete but
    not yet renamed: newer checkpoints go to superseded-<time>/, then old rows logged after the
    resume point go to a side file. The caller then renames the checkpoint and moves ``latest``."""
    out = run.cfg.run.output_dir
    newer = [p for p in list_complete(root) if checkpoint_order(os.path.basename(p)) > checkpoint_order(os.path.basename(point.path))]
    if newer:
        dest = _aside_path(root, "superseded", "")
        os.makedirs(dest)
        for p in newer:
            os.rename(p, os.path.join(dest, os.path.basename(p)))
        fsync_dir(root)
        log(f"resumed {os.path.basename(point.path)}: {len(newer)} newer checkpoint(s) moved to {dest}")
    _rewind_metrics(out, point, new_from=point.metrics_bytes)
    run.logger.reopen()  # metrics.jsonl is a new file now
    try:
        os.remove(os.path.join(out, RESUME_JOURNAL))
    except FileNotFoundError:
        pass


def recover_abandoned_resume(out: str) -> None:
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
        log(f"metrics.jsonl: {len([ln for ln in tail.splitlines() if ln.strip()])} row(s) of a run resumed from "
             f"{j.get('from')} that ended before its first checkpoint moved to {aside}")
    os.remove(journal)


def _aside_path(parent: str, stem: str, ext: str) -> str:
    base = os.path.join(parent, f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    path, n = base + ext, 1
    while os.path.exists(path):
        path, n = f"{base}.{n}{ext}", n + 1
    return path


def _limits(point: ResumePoint) -> tuple[dict, dict, int]:
    """The checkpoint's counters, each phase's last logged step (``phase`` of a metrics row -> step) and
    the step of the phase-less rows (cycles in hybrid mode, else the mode's own counter)."""
    c = point.state["counters"]
    pref = c.get("pref_step", 0)  # checkpoints written before the preference phases lack it
    limit = {"sft": c["sft_step"], "ppo": c["ppo_update"], "dpo": pref, "rm": pref}
    other = limit[point.state["mode"]] if point.state["mode"] in limit else c["cycle"]
    return c, limit, other


def _logged_by(point: ResumePoint, row: dict) -> bool:
    """Whether metrics row ``row`` was logged at or before checkpoint ``point``."""
    _, limit, other = _limits(point)
    return row.get("step", 0) <= limit.get(row.get("phase"), other)


def _read_rows(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def rewind_logs(cfg, point: ResumePoint) -> None:
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
    fsync_dir(out)
    if later:
        log(f"metrics.jsonl: dropped {len(later)} row(s) logged after the checkpoint{note}")
    return [r for r in rows if _logged_by(point, r)]


def _purge_tensorboard(out: str, point: ResumePoint, kept: list[dict]) -> None:
    # TensorBoard: a session-start event at the purge step hides every later event of the old run
    # (its event files stay on disk); kept rows at or after it are written again so nothing goes missing.
    _, limit, other = _limits(point)
    # hybrid: the RL phase is PPO or DPO (HYBRID_RL), whose counter is the one that moved
    rl = max(limit["ppo"], limit["dpo"])
    purge = min(limit["sft"], rl) + 1 if point.state["mode"] == "hybrid" else other + 1
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
