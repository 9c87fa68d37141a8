"""Building a reward tree from a validated spec: ``make_reward``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .base import FaultPolicy, Leaf, Reward, RewardSpecError
from .compose import Clip, EmaNormalize, LearnedWeightedSum, Postprocessed, Scale, WeightedSum, numbered
from .registry import LEARN_WEIGHTS_PARAMS, ON_ERROR_MODES, POSTPROCESS_TYPES, lookup, resolve_params
from .self_play import SelfPlay
from .validate import validate_reward_spec


@dataclass
class BuildContext:
    """What every builder may use: the default device, the cross-rank sum, the fault policy."""

    device: str | None
    all_reduce_sum: Callable | None
    faults: FaultPolicy


def make_reward(spec: dict, *, device: str | None = None, all_reduce_sum: Callable | None = None,
                on_error: str | None = None, fallback: float | None = None) -> Reward:
    """Build a reward from a JSON spec (see docs/rewards.md).

    Args:
        spec: the reward spec; validated first, all problems raised at once (``RewardSpecError``).
        device: default device of model-backed rewards (a leaf's ``device`` wins; default: cuda
            if available, else cpu).
        all_reduce_sum: ``(torch.Tensor) -> torch.Tensor`` summing a small CPU float64 tensor
            across data-parallel ranks (may reduce in place and return None); used by
            ``ema_normalize`` so every rank normalises identically.
        on_error, fallback: override the spec's root ``on_error`` ("raise" | "fallback") and
            ``fallback`` value (default 0.0).
    Model-backed leaves load their model here, once."""
    problems = validate_reward_spec(spec)
    if on_error is not None and on_error not in ON_ERROR_MODES:
        problems.append(f"make_reward(on_error={on_error!r}): must be 'raise' or 'fallback'")
    if problems:
        raise RewardSpecError(problems)
    mode = on_error or spec.get("on_error", "raise")
    value = fallback if fallback is not None else spec.get("fallback", 0.0)
    ctx = BuildContext(device, all_reduce_sum, FaultPolicy(mode, value))
    return build_node(spec, ctx)


def build_node(spec: dict, ctx: BuildContext) -> Reward:
    """Build one (validated) node and its post-processors."""
    rtype = lookup(spec["type"])
    if rtype.name == "weighted_sum":
        parts = [(float(c.get("weight", 1.0)), build_node(c, ctx)) for c in spec["components"]]
        learn = spec.get("learn_weights")
        node: Reward = WeightedSum(parts, ctx.faults, component_names(spec["components"])) if learn is None else \
            build_learned_sum(parts, spec["components"], learn, ctx)
    elif rtype.name == "self_play":
        p = resolve_params(rtype, spec)
        node = SelfPlay(build_node(spec["judge"], ctx), p["opponent"], p["snapshot_every"], p["score"], ctx.faults)
    else:
        node = Leaf(rtype.name, rtype.build(resolve_params(rtype, spec), ctx), ctx.faults)
    steps = [build_postprocess(step, ctx) for step in spec.get("postprocess", [])]
    return Postprocessed(node, steps, ctx.faults) if steps else node


def build_postprocess(step: dict, ctx: BuildContext) -> Any:
    """One post-processor from its (validated) spec."""
    params = resolve_params(POSTPROCESS_TYPES[step["type"]], step)
    if step["type"] == "clip":
        return Clip(params["min"], params["max"])
    if step["type"] == "scale":
        return Scale(params["mul"], params["add"])
    return EmaNormalize(params["decay"], params["eps"], ctx.all_reduce_sum)


def component_names(components: list[dict]) -> list[str]:
    """Each component's name in metrics: its type, numbered from 1 when the type repeats."""
    return numbered([lookup(c["type"]).name for c in components])


def build_learned_sum(parts: list, components: list[dict], learn: dict, ctx: BuildContext) -> Reward:
    """A ``weighted_sum`` with (validated) ``learn_weights``."""
    p = {q.name: learn.get(q.name, q.default) for q in LEARN_WEIGHTS_PARAMS}
    return LearnedWeightedSum(parts, component_names(components), ctx.faults, learn["targets"], p["lr"],
                              p["decay"], p["min_weight"], ctx.all_reduce_sum)
