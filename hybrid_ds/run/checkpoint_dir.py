"""What OUTPUT_DIR/checkpoints/ holds: checkpoint names, the complete ones, ``latest``, and the
durable writes that publish them (see :mod:`hybrid_ds.run.checkpoint` for the layout of one)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Optional

CHECKPOINTS, LATEST, COMPLETE = "checkpoints", "latest", "COMPLETE"


STATE_FILE, CONFIG_FILE, ENGINE_TAG = "trainer_state.json", "config.json", "engine"


_NAME = re.compile(r"^(warmup|step)-(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or a run cannot be resumed from one."""


class ResumeError(CheckpointError):
    """A checkpoint or OUTPUT_DIR this run must not use as it is: a damaged or unsafe checkpoint, another
    launch layout, OUTPUT_DIR held by another run. Found before anything is changed; the run exits 2."""


def log(msg: str) -> None:
    print(f"[hybrid_ds] {msg}", flush=True)


def checkpoint_name(run) -> str:
    """``step-N`` with N = cycles (hybrid), SFT steps (sft), PPO updates (ppo) or preference steps (dpo, rm);
    ``warmup-N`` in the warm-up."""
    c, mode = run.counters, run.cfg.run.mode
    if mode == "hybrid" and c.cycle == 0 and run.cfg.hybrid.sft_warmup_steps:
        return f"warmup-{c.sft_step:07d}"
    return f"step-{unit(run):07d}"


def unit(run) -> int:
    """Steps done in the unit SAVE_EVERY and MAX_STEPS count."""
    key = {"sft": "sft_step", "ppo": "ppo_update", "dpo": "pref_step", "rm": "pref_step"}.get(run.cfg.run.mode, "cycle")
    return getattr(run.counters, key)


def checkpoint_order(name: str) -> Optional[tuple]:
    m = _NAME.match(name)
    return (m.group(1) == "step", int(m.group(2))) if m else None


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE)) and checkpoint_order(os.path.basename(path.rstrip("/"))) is not None


def list_complete(root: str) -> list[str]:
    """Complete checkpoint directories under ``root`` (OUTPUT_DIR/checkpoints), oldest first."""
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if checkpoint_order(n) and is_complete(os.path.join(root, n))]
    return [os.path.join(root, n) for n in sorted(names, key=checkpoint_order)]


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


def holds_run(output_dir: str) -> bool:
    root = os.path.join(output_dir, CHECKPOINTS)
    return os.path.isfile(os.path.join(output_dir, "metrics.jsonl")) or bool(
        os.path.isdir(root) and os.listdir(root))


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def write_latest(root: str, name: str) -> None:
    tmp = os.path.join(root, LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, LATEST))
    fsync_dir(root)


def fsync_tree(path: str) -> None:
    for d, _, files in os.walk(path):
        for n in files:
            fd = os.open(os.path.join(d, n), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def fsync_dir(path: str) -> None:
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
                 "ppo": f"PPO update {c['ppo_update']}", "dpo": f"DPO step {c.get('pref_step', 0)}",
                 "rm": f"reward-model step {c.get('pref_step', 0)}"}
        return f"{self.path} ({parts[self.state['mode']]}; SFT steps {c['sft_step']}, PPO updates {c['ppo_update']})"


def read_point(path: str) -> ResumePoint:
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    with open(os.path.join(path, CONFIG_FILE)) as f:
        config = json.load(f)
    return ResumePoint(os.path.abspath(path), state, config)
