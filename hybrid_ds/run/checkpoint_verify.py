"""Verifying a checkpoint before anything is changed: every file present, intact, and loadable
with ``weights_only=True`` (a checkpoint cannot run code). DeepSpeed unpickles its own files itself
(with ``weights_only=False``), so those are first checked to name only its plain data classes."""

from __future__ import annotations

import json
import os
import re
import zipfile

from hybrid_ds.run.checkpoint_dir import (
    ENGINE_TAG,
    STATE_FILE,
    ResumeError,
    ResumePoint,
    checkpoint_order,
    list_complete,
)

# Globals that DeepSpeed's own checkpoint files may name (besides torch's weights_only allowlist);
# DeepSpeed unpickles them with weights_only=False, so verify_checkpoint refuses any other.
DEEPSPEED_SAFE_GLOBALS = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler", "deepspeed.utils.tensor_fragment.fragment_address"})


# torch's own plain-data globals, for torch without get_unsafe_globals_in_checkpoint (before 2.5)
_TORCH_DATA_GLOBAL = re.compile(r"^(torch\._utils\._rebuild_\w+|torch\._tensor\._rebuild_\w+|torch\.\w*Storage|"
                                r"torch\.Size|torch\.device|torch\.(b?float|half|u?int|bool|complex)\d*|"
                                r"torch\.Tensor|collections\.OrderedDict|_codecs\.encode)$")


def verify_checkpoint(point: ResumePoint, how: str = "") -> None:
    """Every file of checkpoint ``point`` present, intact and loadable without running code from it
    (torch files with weights_only=True; DeepSpeed's own files naming only DEEPSPEED_SAFE_GLOBALS).
    Raises ResumeError naming the file and the way on. Reads every file once; changes nothing."""
    problem = checkpoint_problem(point)
    if not problem:
        return
    root = os.path.dirname(point.path)
    older = [p for p in list_complete(root) if checkpoint_order(os.path.basename(p)) < checkpoint_order(os.path.basename(point.path))]
    msg = f"checkpoint {point.path} cannot be resumed: {problem}. Nothing was changed."
    if older:
        msg += (f" To continue from the previous complete checkpoint, run again with RESUME={older[-1]}: this one "
                f"and any newer stay on disk until that run has written its own first checkpoint, then move to "
                f"{os.path.join(root, 'superseded-<time>')}/.")
    else:
        msg += " No earlier complete checkpoint exists here."
    raise ResumeError(msg + " RESUME=fresh starts over (moving this run aside).")


def checkpoint_problem(point: ResumePoint) -> str:
    """What is wrong with checkpoint ``point``'s files ("" when nothing is)."""
    st, path = point.state, point.path
    try:
        world, deepspeed = int(st["world"]), st["engine"] == "deepspeed"
        counters = st["counters"]
    except (KeyError, TypeError, ValueError) as e:
        return f"{os.path.join(path, STATE_FILE)} lacks {e}"
    files = [("schedules.pt", "torch"), (os.path.join("hf", "config.json"), "json")]
    files += [(os.path.join("rng", f"rank-{r:05d}.pt"), "torch") for r in range(world)]
    if counters.get("ref_snapshot"):
        files.append(("reference.pt", "torch"))
    if os.path.isfile(os.path.join(path, "self_play.pt")):  # a self_play REWARD's snapshot opponent
        files.append(("self_play.pt", "torch"))
    if deepspeed:
        engine = os.path.join(path, ENGINE_TAG)
        names = sorted(os.listdir(engine)) if os.path.isdir(engine) else []
        for r in range(world):
            if not any(re.search(rf"zero_pp_rank_{r}_mp_rank_\d+_optim_states\.pt$", n) for n in names):
                return f"{engine} has no optimizer shard of rank {r} (zero_pp_rank_{r}_..._optim_states.pt)"
        if not any(n.endswith("model_states.pt") for n in names):
            return f"{engine} has no model states (*model_states.pt)"
        files += [(os.path.join(ENGINE_TAG, n), "deepspeed") for n in names if n.endswith(".pt")]
    else:
        files += [("model.pt", "torch"), ("optimizer.pt", "torch")]
        if os.path.isfile(os.path.join(path, "scaler.pt")):  # fp16 without DeepSpeed: the loss scale
            files.append(("scaler.pt", "torch"))
    for name, kind in files:
        problem = _file_problem(os.path.join(path, name), kind)
        if problem:
            return problem
    return ""


def _file_problem(path: str, kind: str) -> str:

    if not os.path.isfile(path):
        return f"{path} is missing"
    try:
        if kind == "json":
            with open(path) as f:
                json.load(f)
            return ""
        with zipfile.ZipFile(path) as z:  # torch.save writes a zip with a CRC per entry
            bad = z.testzip()
        if bad:
            return f"{path} is damaged (entry {bad} fails its checksum)"
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        return f"{path} is damaged or truncated ({e})"
    import torch

    if kind == "deepspeed":  # DeepSpeed unpickles these itself, with weights_only=False
        unsafe = set(_unsafe_globals(path)) - DEEPSPEED_SAFE_GLOBALS
        return (f"{path} names {', '.join(sorted(unsafe))}: loading it would run code from the file, and "
                f"DeepSpeed's checkpoints never need that") if unsafe else ""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to load means the file cannot be resumed from
        return _load_problem(path, e)
    return ""


def _unsafe_globals(path: str) -> list[str]:
    """The globals the pickle in torch archive ``path`` names beyond torch's plain data (nothing runs)."""
    import torch

    if hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    import pickletools

    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    names, strings = [], []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            names.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(f"{strings[-2]}.{strings[-1]}")
        elif isinstance(arg, str):
            strings.append(arg)
    return [n for n in names if not _TORCH_DATA_GLOBAL.match(n)]


def _load_problem(path: str, e: Exception) -> str:
    import pickle

    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, pickle.UnpicklingError):
        return (f"{path} holds pickled objects that loading would run as code ({first}); hybrid_ds loads "
                f"checkpoint files with weights_only=True only (a checkpoint written by an older hybrid_ds "
                f"stored its RNG states this way and cannot be resumed)")
    return f"{path} cannot be loaded ({first})"


def load_verified(path: str, map_location="cpu"):
    """A checkpoint file, loaded with weights_only=True: a file cannot run code (ResumeError if it tries)."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means the file cannot be resumed from
        raise ResumeError(f"cannot resume: {_load_problem(path, e)}.") from None
