"""Validation of reward specs: every problem, each naming its path, without loading any model.

Only the registry is consulted; nothing here imports torch or a model library.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

from .registry import ALIASES, LEARN_WEIGHTS_PARAMS, ON_ERROR_MODES, POSTPROCESS_TYPES, REWARD_TYPES, Param
from .self_play import self_play_specs

STRUCTURAL_KEYS = ("type", "postprocess", "weight", "on_error", "fallback")
_KIND_NAMES = {"bool": "a boolean", "int": "an integer", "number": "a number", "str": "a string",
               "str_list": "a list of strings", "spec_list": "a list of reward specs", "object": "a JSON object"}


def suggest(word: str, options) -> str:
    """`` did you mean 'x'?`` for the closest option, or an empty string."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def with_valid(message: str, word: str, options) -> str:
    """``message`` + a did-you-mean suggestion (or a full stop) + the sorted valid options."""
    return f"{message}{suggest(word, options) or '.'} Valid: {', '.join(sorted(options)) or '(none)'}"


def valid_type_names() -> list[str]:
    return sorted([*REWARD_TYPES, *ALIASES])


def _json_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def check_param(param: Param, value: Any, path: str) -> list[str]:
    """Type, choice and range problems of one parameter value."""
    where = f"{path}.{param.name}"
    if value is None:
        return [] if param.nullable else [f"{where}: must be {_KIND_NAMES[param.kind]}, got null"]
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "str_list": isinstance(value, list) and all(isinstance(v, str) for v in value),
        "spec_list": isinstance(value, list),
        "object": isinstance(value, dict),
    }[param.kind]
    if not ok:
        return [f"{where}: must be {_KIND_NAMES[param.kind]}, got {_json_name(value)} {value!r}"]
    if param.kind == "number" and not math.isfinite(value):
        return [f"{where}: must be a finite number, got {value!r}"]
    if param.choices and value not in param.choices:
        valid = ", ".join(repr(c) for c in param.choices)
        return [f"{where}: {value!r} is not one of {valid}{suggest(str(value), param.choices)}"]
    return _check_range(param, value, where)


def _check_range(param: Param, value: Any, where: str) -> list[str]:
    if param.low is None and param.high is None:
        return []
    low_ok = param.low is None or (value > param.low if param.low_open else value >= param.low)
    high_ok = param.high is None or (value < param.high if param.high_open else value <= param.high)
    if low_ok and high_ok:
        return []
    if param.high is None:
        return [f"{where}: must be {'>' if param.low_open else '>='} {param.low}, got {value!r}"]
    if param.low is None:
        return [f"{where}: must be {'<' if param.high_open else '<='} {param.high}, got {value!r}"]
    left, right = "(" if param.low_open else "[", ")" if param.high_open else "]"
    return [f"{where}: must be in {left}{param.low}, {param.high}{right}, got {value!r}"]


def check_params(params: tuple[Param, ...], spec: dict, path: str, label: str,
                 allowed_extra: tuple[str, ...], skip: tuple[str, ...] = ()) -> list[str]:
    """Unknown keys (with a suggestion among the parameters and ``allowed_extra``), missing
    required parameters, and each value. Keys in ``allowed_extra`` or ``skip`` are not checked."""
    known = {p.name: p for p in params}
    problems = []
    for key, value in spec.items():
        if key in allowed_extra or key in skip:
            continue
        if key not in known:
            problems.append(with_valid(f"{path}.{key}: unknown parameter for {label}", key,
                                       [*known, *allowed_extra]))
            continue
        problems += check_param(known[key], value, path)
    for p in params:
        if p.required and spec.get(p.name) is None:
            problems.append(f"{path}.{p.name}: required parameter of {label} is missing")
    return problems


def validate_reward_spec(spec: Any, path: str = "REWARD") -> list[str]:
    """All problems of a reward spec, as messages naming their path; empty when valid.

    Checks types, parameters (unknown, type, range, choices), components and weights,
    post-processors and the root-only ``on_error``/``fallback`` keys. Loads no model."""
    problems = _check_node(spec, path, in_components=False)
    if isinstance(spec, dict):
        problems += _check_on_error(spec, path)
    return problems


def _check_on_error(spec: dict, path: str) -> list[str]:
    problems = []
    mode = spec.get("on_error", "raise")
    if mode not in ON_ERROR_MODES:
        problems.append(f"{path}.on_error: {mode!r} is not one of 'raise', 'fallback'"
                        f"{suggest(str(mode), ON_ERROR_MODES)}")
    if "fallback" in spec:
        value = spec["fallback"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.append(f"{path}.fallback: must be a finite number, got {value!r}")
        elif mode != "fallback":
            problems.append(f"{path}.fallback: only used with on_error 'fallback' (on_error is {mode!r})")
    return problems


def _check_node(spec: Any, path: str, in_components: bool) -> list[str]:
    if not isinstance(spec, dict):
        return [f"{path}: a reward spec must be a JSON object (dict), got {_json_name(spec)} {spec!r}"]
    name = spec.get("type")
    if name is None:
        return [f"{path}.type: missing; valid types: {', '.join(valid_type_names())}"]
    if not isinstance(name, str):
        return [f"{path}.type: must be a string, got {_json_name(name)} {name!r}"]
    if name not in REWARD_TYPES and name not in ALIASES:
        return [with_valid(f"{path}.type: unknown reward type {name!r}", name, valid_type_names())]
    rtype = REWARD_TYPES[ALIASES.get(name, name)]
    extra = ("type", "postprocess") + (("weight",) if in_components else ("on_error", "fallback"))
    problems = check_params(rtype.params, spec, path, f"{name!r}", extra, skip=STRUCTURAL_KEYS)
    for key in ("weight", "on_error", "fallback"):
        if key in spec and key not in extra:
            where = "inside weighted_sum components" if key == "weight" else "on the root spec"
            problems.append(f"{path}.{key}: only allowed {where}")
    if rtype.check is not None:
        problems += rtype.check(spec, path)
    if rtype.name == "self_play" and isinstance(spec.get("judge"), dict):
        problems += _check_judge(spec["judge"], f"{path}.judge")
    if rtype.name == "weighted_sum" and isinstance(spec.get("components"), list):
        problems += _check_components(spec["components"], f"{path}.components")
        problems += _check_learn_weights(spec, path)
    if in_components and "weight" in spec:
        problems += check_param(Param("weight", "number", 1.0, low=0), spec["weight"], path)
    if "postprocess" in spec:
        problems += _check_postprocess(spec["postprocess"], f"{path}.postprocess")
    return problems


def _check_judge(judge: dict, path: str) -> list[str]:
    """A ``self_play`` node's judge: a reward spec of its own, without root-only keys or self-play inside."""
    problems = _check_node(judge, path, in_components=False)
    problems += [f"{path}.{key}: only allowed on the root spec" for key in ("on_error", "fallback") if key in judge]
    problems += [f"{where}: a self_play judge cannot itself hold a self_play node"
                 for where, _ in self_play_specs(judge, path)]
    return problems


def _check_components(components: list, path: str) -> list[str]:
    if not components:
        return [f"{path}: must contain at least one component"]
    problems = []
    for i, comp in enumerate(components):
        problems += _check_node(comp, f"{path}[{i}]", in_components=True)
    weights = [c.get("weight", 1.0) for c in components if isinstance(c, dict)]
    if all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights) \
            and all(w >= 0 for w in weights) and sum(weights) == 0:
        problems.append(f"{path}: weights sum to zero; give at least one component a positive weight")
    return problems


def _check_learn_weights(spec: dict, path: str) -> list[str]:
    """The sub-keys of a weighted_sum's ``learn_weights``: one finite target per component, positive
    initial weights (the multiplicative update keeps a zero weight at zero), a feasible floor."""
    learn = spec.get("learn_weights")
    if not isinstance(learn, dict):
        return []
    where = f"{path}.learn_weights"
    problems = check_params(LEARN_WEIGHTS_PARAMS, learn, where, "learn_weights", ("targets",))
    comps = [c for c in spec["components"] if isinstance(c, dict)]
    targets = learn.get("targets")
    if not isinstance(targets, list) or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in targets):
        problems.append(f"{where}.targets: must be a list of finite numbers, one per component, got {targets!r}")
    elif len(targets) != len(spec["components"]):
        problems.append(f"{where}.targets: {len(targets)} targets for {len(spec['components'])} components")
    weights = [c.get("weight", 1.0) for c in comps]
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        return problems
    if any(w <= 0 for w in weights):
        problems.append(f"{path}.components: every weight must be > 0 with learn_weights (a zero weight stays zero)")
    floor = learn.get("min_weight", 0.0)
    if isinstance(floor, (int, float)) and floor * len(weights) > sum(weights):
        problems.append(f"{where}.min_weight: {floor} x {len(weights)} components exceeds the weights' sum "
                        f"{sum(weights)}")
    return problems


def _check_postprocess(steps: Any, path: str) -> list[str]:
    if not isinstance(steps, list):
        return [f"{path}: must be a list of post-processors, got {_json_name(steps)} {steps!r}"]
    problems = []
    for i, step in enumerate(steps):
        where = f"{path}[{i}]"
        if not isinstance(step, dict):
            problems.append(f"{where}: a post-processor must be a JSON object, got {_json_name(step)} {step!r}")
            continue
        name = step.get("type")
        if not isinstance(name, str) or name not in POSTPROCESS_TYPES:
            problems.append(with_valid(f"{where}.type: unknown post-processor {name!r}", str(name),
                                       POSTPROCESS_TYPES))
            continue
        ptype = POSTPROCESS_TYPES[name]
        problems += check_params(ptype.params, step, where, f"post-processor {name!r}", ("type",))
        if ptype.check is not None:
            problems += ptype.check(step, where)
    return problems
