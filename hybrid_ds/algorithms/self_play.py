"""Self-play in the PPO phase: the opponent of a ``self_play`` REWARD answers the rollout's prompts.

The reward node (hybrid_ds/rewards/self_play.py) judges the policy's responses against an opponent's;
this module gives it those responses. Each PPO update, right after the policy's rollout:

1. the opponent model: the colocated reference (``run.ref``), with LoRA the policy with its adapters
   off (``engine.adapters_disabled``), or for ``"opponent": "snapshot"`` a frozen copy of the policy
   loaded and prepared like a colocated reference and overwritten with the policy's weights
   (``dist.copy_weights``, as REF_SYNC_EVERY moves the reference) at PPO updates 0, N, 2N, ...
   (N = ``snapshot_every``), before that update's rollout;
2. ``ppo.generate`` (passed in by the PPO phase, which imports this module) samples the opponent's
   responses to the same prompts (NUM_GENERATIONS each, row for row) with the same settings and
   sampler, from a seed of its own (``seed_for("self_play", update)``):
   the same seed as the policy would make a policy equal to its opponent (the first update against
   the reference or a fresh snapshot) answer exactly as it does, a reward of zero everywhere. The
   opponent's rollout is handed to the node and dropped: it is not trained on;
3. the node's judge scores both sides when ``ppo.score`` runs.

Exact resume: the snapshot is the policy at update ``snapshot_update``, which a checkpoint taken
later cannot rebuild, so every checkpoint carries it (``self_play.pt``: the weights and that update;
``save_snapshot`` / ``load_snapshot``, called by hybrid_ds/run/checkpoint.py). The opponent's samples
draw from a seed of (SEED, rank, update) only, so a resumed run samples the same opponent tokens.

Not supported, refused at config time (``self_play_problems``): ENV (the opponent would need dialogues
of its own with the environment), ZeRO-3 (a second partitioned model gathered for every rollout), the
reference on its own ranks as opponent (they serve log-probs only, hybrid_ds/reference/protocol.py;
the snapshot opponent works there), and a snapshot under LoRA (use the reference: the adapters-off base).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

from hybrid_ds.algorithms.context import PhaseContext
from hybrid_ds.config import Config
from hybrid_ds.config.refs import follows_policy
from hybrid_ds.data import Example
from hybrid_ds.models.policy_value import load_dtype, load_lm
from hybrid_ds.rewards.self_play import SelfPlay, find_self_play, self_play_specs

SNAPSHOT_FILE = "self_play.pt"  # in a checkpoint: the snapshot opponent's weights and the update it was taken at


def self_play_problems(cfg: Config, reward_key: str) -> list[str]:
    """What a run cannot do with the ``self_play`` nodes of REWARD (``reward_key``), each naming the key."""
    nodes = self_play_specs(cfg.reward, reward_key)
    runs_ppo = cfg.run.mode == "ppo" or (cfg.run.mode == "hybrid" and cfg.pref.hybrid_rl == "ppo")  # registry.MODES
    if not nodes or not runs_ppo:
        return []
    problems = []
    if len(nodes) > 1:
        problems.append(f"{reward_key}: {len(nodes)} self_play nodes ({', '.join(p for p, _ in nodes)}); a reward "
                        f"holds at most one (each would sample an opponent every update)")
    try:
        from hybrid_ds.engine.launch_plan import plan_launch

        stage = plan_launch(cfg).zero_stage
    except (OSError, ValueError):  # an unreadable DS_CONFIG: file_problems names it
        stage = 0
    for path, spec in nodes:
        opponent = spec.get("opponent", "reference")
        if cfg.ppo.env:
            problems.append(f"{path}: self-play with ENV is not supported: the opponent would need dialogues of its "
                            f"own with the environment; use self_play without ENV, or ENV with another reward")
        if stage == 3:
            problems.append(f"{path}.opponent: self-play under ZeRO stage 3 is not supported (the opponent would be a "
                            f"second partitioned model to gather for every rollout); use ZeRO-2 (ZERO_STAGE=2) or "
                            f"no DeepSpeed")
        if opponent == "reference" and cfg.run.ref_placement == "separate":
            problems.append(f"{path}.opponent: 'reference' with REF_PLACEMENT=separate: the reference ranks serve "
                            f"log-probs only and do not generate; use \"opponent\": \"snapshot\" (kept on the policy's "
                            f"ranks) or REF_PLACEMENT=colocated")
        if spec.get("weight") == 0:
            problems.append(f"{path}.weight: 0 would sample the opponent every update for a score the sum never "
                            f"reads; remove the component or give it a weight > 0")
        if opponent == "reference" and not follows_policy(cfg.ppo.refs):
            problems.append(f"{path}.opponent: 'reference' is the run's own reference, which REFS does not list (its "
                            f"models only give log-probs); add {{\"model\": \"policy\", \"weight\": w}} to REFS or use "
                            f"\"opponent\": \"snapshot\"")
        if opponent == "snapshot" and cfg.lora.r:
            problems.append(f"{path}.opponent: 'snapshot' with LORA_R > 0 is not supported (a copy of the quantised "
                            f"or frozen base per snapshot); use \"opponent\": \"reference\" (the adapters-off base) "
                            f"or LORA_R=0")
    return problems


def self_play_node(run: PhaseContext) -> Optional[SelfPlay]:
    """The run's ``self_play`` reward node, or None."""
    nodes = find_self_play(run.reward)
    return nodes[0] if nodes else None


def opponent_model(run: PhaseContext, node: SelfPlay):
    """A context giving the opponent's causal LM for ``ppo.generate`` (step 1 of the module docstring)."""
    if node.opponent == "snapshot":
        update = run.counters.ppo_update
        if node.snapshot is None and update % node.snapshot_every and run.dist.is_main:
            print(f"[hybrid_ds] warning: self_play: no snapshot opponent to resume with at PPO update {update} (the "
                  f"checkpoint has no {SNAPSHOT_FILE}); taking one from the policy now", flush=True)
        if node.snapshot is None or (update % node.snapshot_every == 0 and node.snapshot_update != update):
            take_snapshot(run, node)
        return contextlib.nullcontext(node.snapshot)
    if run.ref is not None:
        return contextlib.nullcontext(run.ref)
    if run.ref_client is not None:  # self_play_problems refuses this at config time
        raise RuntimeError("self_play: the reference runs on its own ranks and cannot generate; use opponent "
                           "'snapshot' or REF_PLACEMENT=colocated")
    return lora_base(run)


@contextlib.contextmanager
def lora_base(run: PhaseContext):
    """LoRA's reference for generation: the policy's own model with its adapters off."""
    with run.engine.adapters_disabled(), run.dist.generation_model(run.engine) as lm:
        yield lm


def new_snapshot_model(run: PhaseContext):
    """A frozen causal LM of the policy's architecture, loaded and prepared as the colocated reference is
    (hybrid_ds/run/setup.py); its weights are overwritten before use."""
    cfg, dist = run.cfg, run.dist
    dtype = load_dtype(cfg.model.torch_dtype, dist.plan.mixed_precision, dist.uses_deepspeed)
    lm = load_lm(cfg.run.model, run.tokenizer, dtype=dtype, attn_implementation=cfg.model.attn_implementation)
    return dist.prepare_frozen(lm)


def take_snapshot(run: PhaseContext, node: SelfPlay) -> None:
    """The policy's current weights into the snapshot opponent (built on first use)."""
    if node.snapshot is None:
        node.snapshot = new_snapshot_model(run)
    run.dist.copy_weights(run.engine.module.lm, node.snapshot)
    node.snapshot_update = run.counters.ppo_update


def opponent_step(run: PhaseContext, examples: list[Example], generate: Callable) -> bool:
    """The PPO update's self-play step: with a ``self_play`` REWARD, the opponent's responses to
    ``examples``' prompts, sampled by ``generate`` (``ppo.generate``) and handed to the node (True);
    without one, nothing (False)."""
    node = self_play_node(run)
    if node is None:
        return False
    opponent = generate(run, examples, model=opponent_model(run, node), seed_tag="self_play")
    node.set_opponents(opponent.texts)
    return True


def judge_metrics(run: PhaseContext) -> dict[str, float]:
    """``time/self_play_judge_s``: the seconds the judge spent on both sides of this update's batch, and
    ``self_play/snapshot_update``: the PPO update of the snapshot opponent played against."""
    node = self_play_node(run)
    if node is None:
        return {}
    out = {"time/self_play_judge_s": node.pop_judge_seconds()}
    if node.opponent == "snapshot":
        out["self_play/snapshot_update"] = float(node.snapshot_update)
    return out


# --------------------------------------------------------------------------------------
# checkpoints (hybrid_ds/run/checkpoint.py)


def snapshot_state(run) -> Optional[dict]:
    """The snapshot opponent's weights (on CPU) and the update it was taken at, or None without one."""
    node = self_play_node(run)
    if node is None or node.snapshot is None:
        return None
    return {"update": node.snapshot_update, "weights": run.dist.frozen_state_dict(node.snapshot)}


def load_snapshot(run, state: dict) -> None:
    """Restore the snapshot opponent from :func:`snapshot_state`'s dict (every rank)."""
    node = self_play_node(run)
    if node is None or node.opponent != "snapshot":
        return  # the resumed run plays against no snapshot
    if node.snapshot is None:
        node.snapshot = new_snapshot_model(run)
    run.dist.load_frozen_state_dict(node.snapshot, state["weights"])
    node.snapshot_update = int(state["update"])
