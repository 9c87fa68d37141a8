"""REFS: the PPO phase's KL measured against several references, each with a weight (docs/ppo.md,
"Several references").

An entry is ``{"model": M, "weight": w}``. ``M = "policy"`` is the run's own reference, the one the
run has without REFS: the starting policy (REF_INIT), the one REF_SYNC_EVERY moves, with LoRA the
base with its adapters off. Any other ``M`` (a local directory, a hub name, a builtin) is a frozen
model loaded from its files, at the start and again at resume; nothing moves it. The KL per token is
``sum_k w_k KL_k`` with each ``KL_k`` the estimator the run uses without REFS. ``[]`` (the default)
is the one reference of a run without REFS.

Only the config's own problems are found here; the files are checked by ``checks.file_problems`` and
each model's vocabulary against the policy's by the preflight (``models/references.py``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

from hybrid_ds.config.schema import Config

POLICY = "policy"  # REFS' name of the run's own reference (a local directory so named is ./policy)
_SHAPE = '{"model": a model path, hub name or builtin, or "policy"; "weight": a number > 0}'


@dataclass(frozen=True)
class RefEntry:
    """One REFS entry, checked."""

    model: Optional[str]  # the frozen model's name, ~ expanded; None: the run's own reference ("policy")
    weight: float


def ref_entries(cfg: Config) -> list[RefEntry]:
    """REFS in order (a request's reference index is the position here); [] without REFS."""
    return [RefEntry(None if e["model"] == POLICY else os.path.expanduser(e["model"]), float(e["weight"]))
            for e in cfg.ppo.refs]


def ref_weights(cfg: Config) -> Optional[list[float]]:
    """REFS' weights in order, or None without REFS (one reference, unweighted: the KL as it always was)."""
    return [float(e["weight"]) for e in cfg.ppo.refs] or None


def follows_policy(refs) -> bool:
    """Whether REFS (its raw value) includes the run's own reference, which REF_INIT and REF_SYNC_EVERY
    move; [] does (it is that reference alone)."""
    return not refs or isinstance(refs, list) and any(isinstance(e, dict) and e.get("model") == POLICY
                                                      for e in refs)


def ref_model_keys(cfg: Config) -> list[tuple[str, str]]:
    """``(REFS[i].model, name)`` of each well-formed entry that names a frozen model (not "policy")."""
    refs = cfg.ppo.refs if isinstance(cfg.ppo.refs, list) else []
    return [(f"REFS[{i}].model", e["model"]) for i, e in enumerate(refs)
            if isinstance(e, dict) and isinstance(e.get("model"), str) and e["model"].strip() and e["model"] != POLICY]


def refs_problems(cfg: Config) -> list[str]:
    """REFS on its own and against MODE, REF_INIT and REF_SYNC_EVERY; each problem names its entry."""
    refs = cfg.ppo.refs
    if not refs:
        return []
    if not isinstance(refs, list):
        return [f"REFS: expected a list of {_SHAPE}, got {refs!r}."]
    problems = []
    for i, e in enumerate(refs):
        key = f"REFS[{i}]"
        if not isinstance(e, dict):
            problems.append(f"{key}: expected {_SHAPE}, got {e!r}.")
            continue
        problems += [f"{key}.{k}: unknown key; an entry has model and weight." for k in e
                     if k not in ("model", "weight")]
        m, w = e.get("model"), e.get("weight")
        if not (isinstance(m, str) and m.strip()):
            problems.append(f"{key}.model: required, a model path, hub name or builtin, or \"policy\" (the run's own "
                            f"reference); got {m!r}.")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            problems.append(f"{key}.weight: required, a finite number > 0; got {w!r}.")
    n_policy = sum(isinstance(e, dict) and e.get("model") == POLICY for e in refs)
    if n_policy > 1:
        problems.append(f"REFS: \"policy\" is listed {n_policy} times; list the run's own reference once.")
    generates = cfg.run.mode == "ppo" or (cfg.run.mode == "hybrid" and cfg.pref.hybrid_rl == "ppo")
    if not generates:
        what = "HYBRID_RL=dpo" if cfg.run.mode == "hybrid" else f"MODE={cfg.run.mode}"
        problems.append(f"REFS weighs the PPO phase's KL to its references; {what} has no PPO phase (DPO keeps its "
                        f"one reference). Remove REFS.")
    if not follows_policy(refs):
        if cfg.hybrid.ref_init != "start":
            problems.append(f"REF_INIT={cfg.hybrid.ref_init} sets the run's own reference, which REFS does not list: "
                            f"add {{\"model\": \"policy\", \"weight\": w}} to REFS, or use REF_INIT=start.")
        if cfg.hybrid.ref_sync_every > 0:
            problems.append(f"REF_SYNC_EVERY ({cfg.hybrid.ref_sync_every}) moves the run's own reference, which REFS "
                            f"does not list (its frozen models never move): add {{\"model\": \"policy\", \"weight\": "
                            f"w}} to REFS, or set REF_SYNC_EVERY=0.")
    return problems
