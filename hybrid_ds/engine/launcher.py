"""What the launch asked for, against what was started: a job that asked for N processes must not
train on fewer.

``accelerate launch`` with a DeepSpeed config and ``--num_machines`` > 1 hands the machines to
DeepSpeed's own multi-node launcher (``pdsh`` unless ``deepspeed_multinode_launcher`` says
otherwise) with ``--hostfile <deepspeed_hostfile>``. Without a hostfile DeepSpeed warns "Unable to
find hostfile" and starts the processes of this machine alone: each machine then runs its own
1-machine job, WORLD_SIZE says so, and nothing in the environment remembers the N that was asked
for (Accelerate exports neither num_processes nor num_machines). The request survives only in
the command line of the ``accelerate launch`` process above this one, so :func:`accelerate_request`
reads it there (``/proc/<pid>/cmdline``, Linux) through Accelerate's own argument parser and
config loader, and :func:`world_problem` compares it with the launched world before any process
group exists, so every machine's processes stop (exit 2) instead of one training alone.

Other launchers cannot shrink a job silently: ``torchrun``'s rendezvous waits for every node
(``--nnodes``) and the ``deepspeed`` runner refuses ``--num_nodes`` beyond its hostfile.

Nothing here imports torch; Accelerate's parser is imported only when an ``accelerate launch``
process is found above this one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

# Accelerate's multi-node DeepSpeed launcher that starts one torchrun per machine (no pdsh, no
# hostfile): launch/multinode.yaml sets it.
STANDARD = "standard"


@dataclass(frozen=True)
class LaunchRequest:
    """An ``accelerate launch`` command line as Accelerate resolves it (command line over config file)."""

    processes: Optional[int]  # num_processes: all machines together; None when neither names it
    machines: int  # num_machines
    deepspeed: bool  # distributed_type DEEPSPEED or --use_deepspeed
    multinode_launcher: str  # deepspeed_multinode_launcher ("pdsh" when unset, as in Accelerate)
    hostfile: Optional[str]  # deepspeed_hostfile
    pid: int  # the accelerate launch process


def launched_world_problem(world: int) -> Optional[str]:
    """:func:`world_problem` for this process: its launched ``world`` against the ``accelerate launch``
    above it. Only where a launcher announced a world (WORLD_SIZE): an MPI launch sets its own
    variables, which Accelerate reads later, and is not judged here."""
    if "WORLD_SIZE" not in os.environ:
        return None
    return world_problem(world, accelerate_request())


def accelerate_request(pid: Optional[int] = None) -> Optional[LaunchRequest]:
    """The request of the nearest ``accelerate launch`` process above ``pid`` (default: this
    process), or None when there is none or its command line cannot be read."""
    for ancestor in _ancestors(os.getpid() if pid is None else pid):
        argv = _cmdline(ancestor)
        rest = _accelerate_launch_args(argv) if argv else None
        if rest is not None:
            try:
                cwd = os.readlink(f"/proc/{ancestor}/cwd")
            except OSError:
                cwd = None
            return request_from_args(rest, cwd, ancestor)
    return None


def request_from_args(args: list[str], cwd: Optional[str], pid: int = 0) -> Optional[LaunchRequest]:
    """Resolve ``accelerate launch``'s arguments ``args`` (started in ``cwd``) as Accelerate does:
    a value on the command line wins, the config file (``--config_file`` or Accelerate's default
    one) fills the rest. None when they cannot be parsed or the config file cannot be read."""
    from accelerate.commands.config.config_args import default_config_file, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    try:
        ns = launch_command_parser().parse_args(args)
    except SystemExit:  # not arguments Accelerate accepts: not a launch this check can judge
        return None
    path = ns.config_file
    if path and cwd and not os.path.isabs(path):
        path = os.path.join(cwd, path)
    conf = None
    if path or os.path.isfile(default_config_file):
        try:
            conf = load_config_from_file(path)
        except (OSError, ValueError, TypeError):
            return None
    ds = dict(getattr(conf, "deepspeed_config", None) or {})

    def pick(name, ds_key=None):
        value = getattr(ns, name, None)
        if value is not None:
            return value
        return ds.get(ds_key) if ds_key else getattr(conf, name, None)

    hostfile = pick("deepspeed_hostfile", "deepspeed_hostfile")
    if hostfile and cwd and not os.path.isabs(hostfile):
        hostfile = os.path.join(cwd, hostfile)
    deepspeed = bool(ns.use_deepspeed) or str(getattr(conf, "distributed_type", "")).endswith("DEEPSPEED")
    return LaunchRequest(processes=pick("num_processes"), machines=int(pick("num_machines") or 1),
                         deepspeed=deepspeed,
                         multinode_launcher=pick("deepspeed_multinode_launcher", "deepspeed_multinode_launcher")
                         or "pdsh", hostfile=hostfile, pid=pid)


def world_problem(world: int, request: Optional[LaunchRequest]) -> Optional[str]:
    """Why a launch of ``world`` processes must not train for ``request`` (None when it may)."""
    if request is None or request.processes is None or world >= request.processes:
        return None
    text = (f"the launch asked for {request.processes} processes (accelerate launch, pid {request.pid}: "
            f"num_processes {request.processes} over num_machines {request.machines}) but this run's world "
            f"has {world} (WORLD_SIZE={world}); training on fewer processes than asked is refused.")
    hostfile = request.hostfile
    if request.deepspeed and request.machines > 1 and request.multinode_launcher != STANDARD and not (
            hostfile and os.path.isfile(hostfile)):
        text += (f" DeepSpeed's {request.multinode_launcher!r} multi-node launcher got no hostfile "
                 f"(deepspeed_hostfile {hostfile!r}) and started this machine's processes on their own. "
                 f"Run `accelerate launch --config_file launch/multinode.yaml --machine_rank R ...` on every "
                 f"machine (deepspeed_multinode_launcher: standard), or give --deepspeed_hostfile "
                 f"(README, Multi-node).")
    else:
        text += (" num_processes counts the processes of all machines together; check it against "
                 "num_machines x processes per machine.")
    return text


# --------------------------------------------------------------------------------------
# the process tree (Linux /proc; elsewhere nothing is found and nothing is checked)


def _ancestors(pid: int) -> list[int]:
    """The parent of ``pid``, its parent, ... up to (not including) init."""
    out, seen = [], {pid}
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            return out
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        if pid <= 1 or pid in seen:
            return out
        seen.add(pid)
        out.append(pid)


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _accelerate_launch_args(argv: list[str]) -> Optional[list[str]]:
    """The arguments after ``launch`` when ``argv`` is an ``accelerate launch`` command (the
    ``accelerate`` or ``accelerate-launch`` script, run directly or by an interpreter, or
    ``python -m accelerate.commands.launch``), else None. Only the program and, after an
    interpreter, its options are looked at: the training script's own arguments may say anything."""
    for i, word in enumerate(argv[:4]):
        if i > 0 and not (os.path.basename(argv[0]).startswith("python")
                          and all(a.startswith("-") for a in argv[1:i])):
            break
        name = os.path.basename(word)
        if name == "accelerate" and argv[i + 1:i + 2] == ["launch"]:
            return argv[i + 2:]
        if name == "accelerate-launch":
            return argv[i + 1:]
        if word == "-m" and argv[i + 1:i + 2] == ["accelerate.commands.launch"]:
            return argv[i + 2:]
        if word == "-m" and argv[i + 1:i + 2] in (["accelerate"], ["accelerate.commands.accelerate_cli"]) \
                and argv[i + 2:i + 3] == ["launch"]:
            return argv[i + 3:]
    return None
