"""Reading a config: the JSON file (duplicate keys and non-finite numbers refused), ``KEY=VALUE``
overrides, values coerced to each field's type, and paths resolved once (``~`` expanded)."""

from __future__ import annotations

import difflib
import json
import math
import os
from typing import Any, Optional, Union, get_args, get_origin

from hybrid_ds.config.refs import follows_policy
from hybrid_ds.config.schema import ALIASES, Config, ConfigError, field_types, key_table
_YES = {"yes", "true", "1", "y", "on"}


_NO = {"no", "false", "0", "n", "off"}


def type_name(tp) -> str:
    if get_origin(tp) is Union:
        null = " (or null)" if type(None) in get_args(tp) else ""
        return " or ".join(type_name(a) for a in get_args(tp) if a is not type(None)) + null
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", dict: "an object",
            list: "a list"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp) -> tuple[Any, Optional[str]]:
    """Return (value, problem). Accepts ints for floats; yes/no strings for booleans."""
    if get_origin(tp) is Union:
        kinds = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(kinds) < len(get_args(tp)):
            return None, None
        if len(kinds) > 1:  # e.g. LORA_TARGET_MODULES: a string or a list, whichever the value is
            for kind in kinds:
                coerced, problem = _coerce(key, value, kind)
                if problem is None:
                    return coerced, None
            return value, f"{key}: expected {type_name(tp)}, got {type(value).__name__} {value!r}."
        tp = kinds[0]
    if tp is bool:
        if isinstance(value, bool):
            return value, None
        if isinstance(value, int) and value in (0, 1):
            return bool(value), None
        if isinstance(value, str) and value.strip().lower() in _YES | _NO:
            return value.strip().lower() in _YES, None
        hint = ""
        if isinstance(value, str) and (("/" in value) or value.strip().endswith((".sh", ".py")) or " " in value):
            hint = (" It looks like a command or script path: hybrid_ds never runs config strings; "
                    "shuffling is done in Python with SEED, so write true or false.")
        return value, f"{key}: expected true/false (or yes/no), got {value!r}.{hint}"
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                return value, f"{key}: {value} is not a finite number; write a finite value."
            return float(value), None
        if isinstance(value, str) and value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
            return value, f"{key}: {value!r} is not a finite number; write a finite value."
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        if isinstance(value, float) and value.is_integer():
            return int(value), None
    elif tp in (str, dict, list):
        if isinstance(value, tp):
            return value, None
    return value, f"{key}: expected {type_name(tp)}, got {type(value).__name__} {value!r}."


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from the command line; VALUE is JSON when it parses as JSON, else a string."""
    if "=" not in text:
        raise ConfigError([f"override {text!r}: expected KEY=VALUE (e.g. LR_SFT=1e-4)."], "command line")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().upper(), value


def _pairs_refusing_duplicates(pairs: list) -> dict:
    """``object_pairs_hook`` of the config reader: a key written twice is an error, not "last one wins"."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _DuplicateKey(ValueError):
    pass


def read_config_file(path: str) -> dict:
    """The JSON object in ``path``; ConfigError for anything a file can do wrong (missing, a directory,
    not UTF-8, not JSON, a key written twice, nesting deeper than the parser goes, not an object)."""
    def fail(problem: str) -> ConfigError:
        return ConfigError([problem], path)

    try:
        with open(path, encoding="utf-8-sig") as f:
            raw = json.loads(f.read(), object_pairs_hook=_pairs_refusing_duplicates)
    except FileNotFoundError:
        raise fail(f"config file {path!r} does not exist.") from None
    except IsADirectoryError:
        raise fail(f"config file {path!r} is a directory; give the path of a JSON file.") from None
    except UnicodeDecodeError as e:
        raise fail(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                   f"save the config as UTF-8.") from None
    except _DuplicateKey as e:
        raise fail(f"{path}: key {e.args[0]!r} is written more than once (a duplicate key); keep one.") from None
    except json.JSONDecodeError as e:
        raise fail(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).") from None
    except RecursionError:
        raise fail(f"{path}: JSON nested too deeply to read; a config is one flat object of KEY: value "
                   f"pairs.") from None
    except OSError as e:
        raise fail(f"config file {path!r} cannot be read ({e.strerror or e}).") from None
    if not isinstance(raw, dict):
        raise fail(f"{path}: the config must be a JSON object of KEY: value pairs.")
    return raw


# Keys that name files or directories: ``~`` is expanded in every one of them when the config is
# loaded, so each consumer (validation, loading, the written config.json) sees the same path.
PATH_KEYS = ("MODEL", "TOKENIZER", "TRAIN_FILE", "OUTPUT_DIR", "DS_CONFIG", "RESUME", "EVAL_FILE", "PREF_FILE")


_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ds_configs/ lives here


def normalise_paths(cfg: Config) -> None:
    """Expand ``~`` in every path key and in the reward spec's and REFS' model paths; resolve DS_CONFIG
    (see :func:`resolve_ds_config`); give a perplexity reward without ``model`` the policy's MODEL."""
    table = key_table()
    for key in PATH_KEYS:
        sec, f = table[key]
        obj = getattr(cfg, sec)
        value = getattr(obj, f.name)
        if isinstance(value, str) and value.startswith("~"):
            setattr(obj, f.name, os.path.expanduser(value))
    if isinstance(cfg.run.ds_config, str) and cfg.run.ds_config:
        cfg.run.ds_config = resolve_ds_config(cfg.run.ds_config) or cfg.run.ds_config
    if isinstance(cfg.reward, dict) and isinstance(cfg.run.model, str):
        _fill_reward_models(cfg.reward, cfg.run.model)
    for entry in cfg.ppo.refs if isinstance(cfg.ppo.refs, list) else []:  # REFS' model paths too
        if isinstance(entry, dict) and isinstance(entry.get("model"), str) and entry["model"].startswith("~"):
            entry["model"] = os.path.expanduser(entry["model"])


def _fill_reward_models(spec: dict, policy_model: str) -> None:
    """In place: ``~`` expanded in every leaf's ``model``; ``perplexity`` leaves without ``model``
    score fluency under the policy's own base model (MODEL)."""
    for comp in [*(spec.get("components") or []), spec.get("judge")]:  # weighted_sum's parts, self_play's judge
        if isinstance(comp, dict):
            _fill_reward_models(comp, policy_model)
    if spec.get("type") == "perplexity" and "model" not in spec and policy_model:
        spec["model"] = policy_model
    for k in ("model", "model_type", "checkpoint", "huggingface_config_path"):
        if isinstance(spec.get(k), str) and spec[k].startswith("~"):
            spec[k] = os.path.expanduser(spec[k])


def ds_config_names() -> list[str]:
    """Names of the DeepSpeed configs shipped in ds_configs/ (usable as DS_CONFIG=zero2)."""
    d = os.path.join(_REPO_ROOT, "ds_configs")
    return sorted(n[:-5] for n in os.listdir(d) if n.endswith(".json")) if os.path.isdir(d) else []


def resolve_ds_config(path: str) -> Optional[str]:
    """An absolute path for a DeepSpeed config named by DS_CONFIG or an accelerate yaml, or None.

    Tried in order: the path itself (relative to the working directory), relative to the repository
    (so ``ds_configs/zero2.json`` in ``launch/*.yaml`` works from any directory), and a bare name of a
    shipped config (``zero2`` = ``ds_configs/zero2.json``).
    """
    path = os.path.expanduser(path)
    candidates = [path]
    if not os.path.isabs(path):
        candidates.append(os.path.join(_REPO_ROOT, path))
        if os.sep not in path:
            candidates.append(os.path.join(_REPO_ROOT, "ds_configs", path if path.endswith(".json") else path + ".json"))
    for c in candidates:
        if os.path.isfile(c):
            return os.path.abspath(c)
    return None


def build_config(raw: dict) -> tuple[Config, list[str]]:
    """Map a flat dict of UPPER_CASE keys into a Config; return it with the problems found."""
    table, types = key_table(), field_types()
    cfg, problems = Config(), []
    for key, value in raw.items():
        if str(key) != str(key).upper() and str(key).upper() in table:
            problems.append(f"{key}: keys are UPPER_CASE; write {str(key).upper()}.")
            continue
        ukey = ALIASES.get(str(key), str(key))
        if ukey not in table:
            near = difflib.get_close_matches(ukey, list(table) + list(ALIASES), n=1, cutoff=0.6)
            hint = f" Did you mean {near[0]}?" if near else " See docs/config.md for the valid keys."
            problems.append(f"{key}: unknown key.{hint}")
            continue
        sec, f = table[ukey]
        if ukey == "SCHEDULER" and value is None:
            value = "none"  # null, like "" and "no", means no schedule
        value, problem = _coerce(ukey, value, types[ukey])
        if problem:
            problems.append(problem)
            continue
        setattr(getattr(cfg, sec) if sec else cfg, f.name, value)
    resolve_auto(cfg)
    return cfg, problems


def resolve_auto(cfg: Config) -> None:
    """In place: REF_SYNC_EVERY=-1 (auto) becomes the value the run uses, so validation, the run and
    the written config.json all see one number.

    Auto is 1 (the reference follows the policy after every cycle's SFT steps) for MODE=hybrid whose
    cycles have SFT steps, with the reference on the policy ranks and no LoRA; else 0. Why 1: SFT moves
    the policy away from a frozen reference, the per-token KL penalty then outweighs a small task reward
    and PPO learns to end responses at once (README, "Hybrid defaults", has the measured curves). Where
    a sync cannot run (REF_PLACEMENT=separate, LORA_R > 0: see checks.py; REFS without "policy": refs.py) or
    has nothing to follow (no SFT steps in any cycle, where a sync would only erase the KL anchor of PPO
    itself) auto is 0."""
    h = cfg.hybrid
    if h.ref_sync_every != -1:
        return
    sft_in_cycles = h.cycle_sft_steps > 0 or (h.curriculum != "none" and h.curriculum_sft_steps_end > 0)
    syncable = cfg.run.ref_placement == "colocated" and not cfg.lora.r and follows_policy(cfg.ppo.refs)
    h.ref_sync_every = int(cfg.run.mode == "hybrid" and sft_in_cycles and syncable)
