"""The Python API: ``hybrid_ds.train(config, overrides, *, reward_fns=None)``.

The same run as ``python -m hybrid_ds.train`` (the CLI's checks, preflight and steps 3-8,
:mod:`hybrid_ds.run.cli`), in the calling process: one process under plain ``python``, or each rank
of a launch already under way (``accelerate launch script.py``). Problems raise the exceptions the
CLI turns into exit codes (ConfigError, DataError, RewardSpecError, ResumeError, CheckpointError,
NonFiniteLossError) with the message it prints; nothing calls ``sys.exit``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

from hybrid_ds.config import Config, ConfigError, read_config_file
from hybrid_ds.config.schema import REWARD_KEY
from hybrid_ds.rewards.callables import RewardFunctions


@dataclass
class TrainResult:
    """What a finished run left: where its outputs are and its last metrics."""

    output_dir: str
    paths: dict[str, str]  # inference_lm, ppo_full, adapter, metrics, samples, config: the ones written
    metrics: dict[str, float]  # the last logged value of every metric (all phases; reduced over ranks)
    phases: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> its last logged metrics
    completed: bool = True  # False when SIGTERM/SIGINT stopped it at a checkpoint


def _overrides(overrides) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, dict):
        return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    return list(overrides)  # "KEY=VALUE" strings, as on the command line


def load(config, overrides=None):
    """(Config, whether REWARD was set) from a dict of keys, a Config, or a JSON file's path, plus
    ``overrides`` (a dict or ``KEY=VALUE`` strings); every problem at once as a ConfigError."""
    from hybrid_ds.run.preflight import load_config

    extra = _overrides(overrides)
    set_keys = {t.split("=", 1)[0].strip().upper() for t in extra}
    if isinstance(config, Config):
        raw, set_reward = config.to_json_dict(), config.reward != Config().reward
    elif isinstance(config, dict):
        raw, set_reward = config, any(k.upper() == REWARD_KEY for k in config)
    elif isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        set_reward = REWARD_KEY in {k.upper() for k in read_config_file(path)}
        return load_config(path, extra), set_reward or REWARD_KEY in set_keys
    else:
        raise ConfigError([f"config: expected a dict of keys, a Config or a JSON file's path, got "
                           f"{type(config).__name__}."], "hybrid_ds.train")
    cfg = load_config(None, _overrides(raw) + extra)
    return cfg, set_reward or REWARD_KEY in set_keys


def train(config: Union[dict, Config, str, os.PathLike], overrides=None, *,
          reward_fns: Optional[Sequence[Callable]] = None) -> TrainResult:
    """Train as ``python -m hybrid_ds.train`` would, in this process; see README "Python API".

    ``reward_fns``: callables ``fn(prompts, completions, **fields) -> list[float]`` (TRL's
    ``reward_funcs`` signature; hybrid_ds/rewards/callables.py), weighted equally, as the reward; when
    the config sets REWARD too, its reward is one more equally weighted component."""
    from hybrid_ds.engine.placement import launch_world_size
    from hybrid_ds.run.cli import execute
    from hybrid_ds.run.preflight import preflight

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg, set_reward = load(config, overrides)
    fns = None
    if reward_fns is not None:
        fns = list(reward_fns) if isinstance(reward_fns, (list, tuple)) else [reward_fns]
        bad = [repr(f) for f in fns if not callable(f)]
        if not fns or bad:
            raise ConfigError([f"reward_fns: expected callables fn(prompts, completions, **fields) -> list[float], "
                               f"got {', '.join(bad) or 'none'}."], "hybrid_ds.train")
        if cfg.run.mode == "sft":
            raise ConfigError(["reward_fns: MODE=sft scores nothing; use MODE=ppo or hybrid, or leave them out."],
                              "hybrid_ds.train")
    pre = preflight(cfg, cfg.run.seed if cfg.run.seed is not None else 0)
    run = execute(cfg, launch_world_size(), pre,
                  reward_fns=RewardFunctions(fns, with_spec=set_reward) if fns else None)
    out = cfg.run.output_dir
    names = ("inference_lm", "ppo_full", "adapter", "metrics.jsonl", "samples.jsonl", "config.json")
    paths = {n.split(".")[0]: os.path.join(out, n) for n in names if os.path.exists(os.path.join(out, n))}
    phases = dict(run.logger.last) if run is not None else {}
    metrics = {k: v for m in phases.values() for k, v in m.items()}
    stopped = run is not None and run.guard is not None and bool(run.guard.stopped_by)
    return TrainResult(out, paths, metrics, phases, completed=not stopped)
