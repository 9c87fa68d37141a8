"""Where the frozen reference model runs, and the bridge that connects it to the policy.

``REF_PLACEMENT: "colocated"`` (the default) keeps a reference copy on every policy rank.
``REF_PLACEMENT: "separate"`` with ``REF_RANKS: R`` splits a launch of N processes by rank:

    world rank   0 .. P-1   policy    (P = N - R): the data-parallel group DeepSpeed shards over
    world rank   P .. N-1   reference (R ranks): a whole frozen model each, no DeepSpeed
    policy rank p is served by reference index p % R, i.e. world rank P + p % R

DeepSpeed ZeRO-3 issues barriers and broadcasts on the *world* group during init and its first
forward, so the reference ranks must not be in that world (docs/ppo.md §17). :func:`setup_placement`
runs before Accelerate/DeepSpeed create their default process group and does two things:

1. it connects every reference rank with its clients through a small gloo group of its own (the
   *bridge*), built directly from a store and ``ProcessGroupGloo``, without any default group;
2. it rewrites the launcher's environment so that the default group created afterwards (by
   ``init_dist``) holds the policy ranks only: on policy ranks ``WORLD_SIZE`` becomes P (and the
   local/node sizes shrink to match); on reference ranks ``MASTER_ADDR``/``MASTER_PORT`` are
   removed, so an accidental ``init_process_group`` there fails at once instead of joining
   (and corrupting) the policy group.

Policy ranks keep their ``RANK`` and ``LOCAL_RANK`` (they are the first P ranks), so devices and
data shards are unchanged. The bridge store: under ``torchrun`` / ``accelerate launch`` the
elastic agent's store (which ``MASTER_ADDR:MASTER_PORT`` points at); under the ``deepspeed``
launcher or a hand-set environment, world rank 0 hosts a multi-tenant ``TCPStore`` on
``MASTER_PORT`` that the policy's default group reuses later in the same process: no extra port.

Nothing here imports torch at module level, so config validation can use the pure helpers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

PLACEMENTS = ("colocated", "separate")
ROLE_ENV = "HYBRID_DS_ROLE"  # "policy" | "reference", set by setup_placement
LAUNCH_WORLD_ENV = "HYBRID_DS_LAUNCH_WORLD_SIZE"  # N, the launcher's WORLD_SIZE before the rewrite

# Bridge tags: requests and replies use separate tags for headers and payloads, so a header
# receive posted early can never match a payload.
TAG_HEADER, TAG_PAYLOAD = 1, 2


# --------------------------------------------------------------------------------------
# pure helpers (no torch): config validation and batch arithmetic use these


def launch_world_size(environ: Mapping[str, str] = os.environ) -> int:
    """N, the processes the launcher started, also after :func:`setup_placement` rewrote WORLD_SIZE."""
    return max(1, int(environ.get(LAUNCH_WORLD_ENV) or environ.get("WORLD_SIZE") or 1))


def policy_world_size(ref_placement: str, ref_ranks: int, world: int) -> int:
    """The policy's data-parallel world: ``world - ref_ranks`` when separate, else ``world``."""
    return world - ref_ranks if ref_placement == "separate" else world


def placement_problems(ref_placement: str, ref_ranks: int, world: int) -> list[str]:
    """What is wrong with REF_PLACEMENT/REF_RANKS for a launch of ``world`` processes (empty if fine)."""
    if ref_placement not in PLACEMENTS:
        return [f"REF_PLACEMENT: {ref_placement!r} is not one of {', '.join(PLACEMENTS)}."]
    if ref_placement == "colocated":
        return []
    if ref_ranks < 1:
        return [f"REF_RANKS: {ref_ranks}; separate placement needs at least 1 reference rank."]
    if ref_ranks >= world:
        return [f"REF_RANKS ({ref_ranks}) must be smaller than the {world} launched processes: "
                f"REF_PLACEMENT=separate keeps at least one policy rank (launch more processes, "
                f"e.g. {ref_ranks + 1} or more)."]
    return []


# --------------------------------------------------------------------------------------
# the placement of this process


@dataclass(frozen=True)
class Placement:
    """Which role this process plays in the launch, and who it talks to."""

    mode: str  # "colocated" | "separate"
    world: int  # N: processes the launcher started
    rank: int  # this process's rank among the N
    local_rank: int  # LOCAL_RANK (device index on GPU); unchanged for both roles
    ref_ranks: int  # R; 0 when colocated
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    local_world: Optional[int] = None  # processes on this node, when the launcher says

    @classmethod
    def from_env(cls, ref_placement: str, ref_ranks: int, environ: Mapping[str, str] = os.environ) -> "Placement":
        """The placement of this process from the launcher's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*."""
        if environ.get(ROLE_ENV):
            raise RuntimeError(f"{ROLE_ENV}={environ[ROLE_ENV]} is already set: setup_placement ran in this "
                               f"process already (it rewrites WORLD_SIZE, so it must run once, before init_dist).")
        world = int(environ.get("WORLD_SIZE") or 1)
        problems = placement_problems(ref_placement, ref_ranks, world)
        if problems:
            raise ValueError(" ".join(problems))
        lws = environ.get("LOCAL_WORLD_SIZE") or environ.get("LOCAL_SIZE")
        return cls(mode=ref_placement, world=world, rank=int(environ.get("RANK") or 0),
                   local_rank=int(environ.get("LOCAL_RANK") or 0),
                   ref_ranks=ref_ranks if ref_placement == "separate" else 0,
                   master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
                   master_port=int(environ.get("MASTER_PORT") or 0),
                   local_world=int(lws) if lws else None)

    @property
    def separate(self) -> bool:
        return self.mode == "separate"

    @property
    def policy_world(self) -> int:
        """P = N - R, the world Accelerate and DeepSpeed see on policy ranks."""
        return self.world - self.ref_ranks

    @property
    def role(self) -> str:
        return "policy" if self.rank < self.policy_world else "reference"

    @property
    def role_rank(self) -> int:
        """This process's index within its role (policy rank p, or reference index r)."""
        return self.rank if self.role == "policy" else self.rank - self.policy_world

    def reference_of(self, policy_rank: int) -> int:
        """World rank of the reference that serves ``policy_rank``."""
        return self.policy_world + policy_rank % self.ref_ranks

    def clients_of(self, ref_index: int) -> list[int]:
        """Policy ranks (= their world ranks) served by reference index ``ref_index``, in order."""
        return list(range(ref_index, self.policy_world, self.ref_ranks))

    @property
    def bridge_members(self) -> list[int]:
        """World ranks of this process's bridge group: its reference first, then that reference's clients."""
        ref = self.reference_of(self.rank) if self.role == "policy" else self.rank
        return [ref] + self.clients_of(ref - self.policy_world)

    def describe(self, world_rank: int) -> str:
        """'policy rank 1' / 'reference rank 2' (world rank), for messages."""
        if world_rank < self.policy_world:
            return f"policy rank {world_rank}"
        return f"reference rank {world_rank}"

    def __str__(self) -> str:
        if not self.separate:
            return f"colocated reference, {self.world} policy rank(s)"
        return (f"{self.describe(self.rank)} of {self.world}: {self.policy_world} policy + {self.ref_ranks} "
                f"reference rank(s); bridge group {self.bridge_members}")

    # -- environment --------------------------------------------------------------------
    def role_env(self, environ: Mapping[str, str]) -> dict[str, Optional[str]]:
        """The environment changes for this role (None = remove the variable)."""
        out: dict[str, Optional[str]] = {ROLE_ENV: self.role, LAUNCH_WORLD_ENV: str(self.world)}
        if self.role == "reference":
            out.update(MASTER_ADDR=None, MASTER_PORT=None)
            return out
        P = self.policy_world
        out["WORLD_SIZE"] = str(P)
        if "ROLE_WORLD_SIZE" in environ:  # torchrun
            out["ROLE_WORLD_SIZE"] = str(P)
        if self.local_world:
            node_start = self.rank - self.local_rank  # launchers number ranks node by node
            local_p = max(1, min(self.local_world, P - node_start))
            for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):  # torchrun / deepspeed launcher
                if key in environ:
                    out[key] = str(local_p)
            nodes = -(-P // self.local_world)
            for key in ("GROUP_WORLD_SIZE", "CROSS_SIZE"):
                if key in environ:
                    out[key] = str(nodes)
        return out


def apply_env(changes: Mapping[str, Optional[str]], environ=os.environ) -> None:
    for k, v in changes.items():
        if v is None:
            environ.pop(k, None)
        else:
            environ[k] = v


# --------------------------------------------------------------------------------------
# the bridge


class BridgeError(RuntimeError):
    """A peer on the bridge failed, died or did not answer in time; ``peer`` is its world rank."""

    def __init__(self, message: str, peer: int):
        super().__init__(message)
        self.peer = peer


class Bridge:
    """This process's bridge group: one reference rank and the policy ranks it serves.

    Point-to-point only, on CPU tensors, over gloo (also on GPU machines: the payload is token ids
    and ``(B, T)`` floats, and gloo gives bounded waits and notices a dead peer at once because its
    TCP connection closes). Every wait goes through :meth:`wait`, which turns gloo's errors into a
    :class:`BridgeError` naming the peer.
    """

    def __init__(self, placement: Placement, group: Any, store: Any, timeout_s: float):
        self.placement, self.group, self.timeout_s = placement, group, float(timeout_s)
        self._store = store  # world rank 0 hosts the store; keep it alive for the default group
        self.members = placement.bridge_members

    @property
    def reference(self) -> int:
        """World rank of this group's reference."""
        return self.members[0]

    @property
    def clients(self) -> list[int]:
        """World ranks of this group's policy ranks."""
        return self.members[1:]

    def describe(self, world_rank: int) -> str:
        return self.placement.describe(world_rank)

    def isend(self, tensor, peer: int, tag: int):
        try:  # gloo can fail at once when the peer's connection is already gone
            return self.group.send([tensor], self.members.index(peer), tag)
        except RuntimeError as e:
            raise BridgeError(self.peer_failure(peer, "sending", self.timeout_s, e), peer) from e

    def irecv(self, tensor, peer: int, tag: int):
        try:
            return self.group.recv([tensor], self.members.index(peer), tag)
        except RuntimeError as e:
            raise BridgeError(self.peer_failure(peer, "receiving", self.timeout_s, e), peer) from e

    def wait(self, work, peer: int, what: str, timeout_s: Optional[float] = None) -> None:
        """Wait for ``work`` with ``peer`` at most ``timeout_s`` (default: the bridge timeout)."""
        from datetime import timedelta

        t = self.timeout_s if timeout_s is None else timeout_s
        try:
            work.wait(timedelta(seconds=t))
        except RuntimeError as e:
            raise BridgeError(self.peer_failure(peer, what, t, e), peer) from e

    def peer_failure(self, peer: int, what: str, timeout_s: float, err: BaseException) -> str:
        name, text = self.describe(peer), str(err).strip()
        if "Timed out" in text or "timed out" in text:
            return f"{name} did not answer within {timeout_s:g} s (dead or hung) while {what}: {text}"
        if "closed" in text.lower() or "reset by peer" in text.lower():
            return f"{name} closed its connection (its process died or exited) while {what}: {text}"
        return f"{name} failed on the bridge while {what}: {text}"


def _bridge_store(p: Placement, timeout_s: float):
    """The store the bridge groups rendezvous on (see the module docstring)."""
    from datetime import timedelta

    import torch.distributed as td

    if not p.master_port:
        raise RuntimeError("REF_PLACEMENT=separate needs a launcher (MASTER_ADDR/MASTER_PORT are not set): use "
                           "accelerate launch, torchrun or deepspeed with WORLD_SIZE = policy + reference ranks.")
    timeout = timedelta(seconds=max(timeout_s, 60.0))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        base = td.TCPStore(p.master_addr, p.master_port, None, False, timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return td.PrefixStore(f"hybrid_ds/bridge/attempt_{attempt}/", base)
    base = td.TCPStore(p.master_addr, p.master_port, None, p.rank == 0, timeout, wait_for_workers=False,
                       multi_tenant=True)
    return td.PrefixStore("hybrid_ds/bridge/", base)


def connect_bridge(placement: Placement, store: Any, timeout_s: float) -> Bridge:
    """Build this process's bridge group on ``store``; every member of the group must call it.

    Touches neither the environment nor any default process group (tests call it from threads).
    """
    from datetime import timedelta

    import torch.distributed as td
    from torch.distributed import ProcessGroupGloo

    members = placement.bridge_members
    prefix = td.PrefixStore(f"group_{members[0]}/", store)
    try:
        group = ProcessGroupGloo(prefix, members.index(placement.rank), len(members),
                                 timedelta(seconds=timeout_s))
    except RuntimeError as e:
        raise RuntimeError(f"{placement.describe(placement.rank)}: could not connect the bridge group "
                           f"{members} within {timeout_s:g} s (did every rank start with the same "
                           f"REF_PLACEMENT/REF_RANKS?): {e}") from e
    return Bridge(placement, group, store, timeout_s)


def setup_placement(placement: Placement, timeout_s: float = 600.0) -> Optional[Bridge]:
    """Connect the bridge and leave an environment in which ``init_dist`` sees only policy ranks.

    Call once per process, before ``init_dist`` (before anything creates a default process group).
    Returns None for colocated placement (nothing changes), else this process's :class:`Bridge`.
    Every process of the launch must call it: the bridge groups rendezvous here.
    """
    if not placement.separate:
        return None
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        raise RuntimeError("setup_placement must run before any default process group exists "
                           "(call it before init_dist / Accelerator / deepspeed.init_distributed).")
    bridge = connect_bridge(placement, _bridge_store(placement, timeout_s), timeout_s)
    apply_env(placement.role_env(os.environ))
    return bridge
