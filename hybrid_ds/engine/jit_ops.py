"""DeepSpeed's JIT-compiled C++ ops: where torch builds them, whether they are built for this install,
a build lock that a killed build left behind, and building them ahead of a run.

DeepSpeed compiles two ops on first use on a CPU: its shared-memory all-reduce (``deepspeed_shm_comm``,
loaded when its comm backend starts) and CPU Adam (``cpu_adam``, for an optimizer offloaded to the
CPU). torch builds each with ninja in ``<extensions root>/<op>/`` under a lock file, ``lock``, created
with O_EXCL and held open until the build ends. Every later load of the op takes that lock too, even
with nothing to rebuild, and waits for it with no limit. A build killed half-way (Ctrl-C, a job's
time limit, a test's timeout) leaves the lock behind, and every later DeepSpeed start on the machine
then hangs silently at "Loading extension module". Preflight names such a lock instead
(:func:`build_lock_problems`).

``python -m hybrid_ds.engine.jit_ops`` builds the ops ahead (before a cluster job, or once before
parallel test workers that would otherwise race to build them inside their time limits).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
import time

from hybrid_ds.engine.procfs import paths_in_use

# The ops a CPU run may compile, with their DeepSpeed op builders.
OPS = {"deepspeed_shm_comm": "ShareMemCommBuilder", "cpu_adam": "CPUAdamBuilder"}
# A build takes one to three minutes here; a lock nobody on this machine holds that is older than
# this was left by a killed build. (Younger ones may belong to a build on another node of a cluster
# that shares the home directory, which this machine's /proc cannot see.)
ABANDONED_AFTER_S = 600.0


def extensions_root() -> str:
    """The folder holding one build folder per op, as torch chooses it: TORCH_EXTENSIONS_DIR as given,
    else the user's cache folder plus ``py<version>_<accelerator>`` (torch.utils.cpp_extension)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return root
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    accelerator = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
                   f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
    version = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return os.path.join(get_default_build_root(), f"{version}_{accelerator}")


def op_built(name: str) -> bool:
    """Whether loading op ``name`` finds it built from this DeepSpeed install: its library is there and
    its ninja file names this install's sources. (A virtual environment elsewhere that shares the
    cache folder builds it again: ninja sees other source paths.)"""
    build = os.path.join(extensions_root(), name)
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations or not glob.glob(os.path.join(build, f"{name}*.so")):
        return False
    try:
        with open(os.path.join(build, "build.ninja")) as f:
            return os.path.join(spec.submodule_search_locations[0], "ops") in f.read()
    except OSError:
        return False


def shm_op_unbuilt() -> bool:
    """Whether starting DeepSpeed's comm backend on this CPU machine compiles its all-reduce op first."""
    import torch

    return not torch.cuda.is_available() and not op_built("deepspeed_shm_comm")


def abandoned_build_locks(min_age_s: float = ABANDONED_AFTER_S) -> list[tuple[str, float]]:
    """Build locks (path, age in seconds) under the extensions root that no live process of this machine
    holds open and that are older than ``min_age_s``: each makes every later load of its op wait forever."""
    root = extensions_root()
    locks = glob.glob(os.path.join(root, "*", "lock"))
    if not locks:
        return []
    held, now, out = paths_in_use(os.path.realpath(root) + os.sep, mapped=False), time.time(), []
    for lock in locks:
        try:
            age = now - os.stat(lock).st_mtime
        except OSError:  # released meanwhile
            continue
        if age > min_age_s and os.path.realpath(lock) not in held:
            out.append((lock, age))
    return out


def build_lock_problems() -> list[str]:
    """Preflight's sentence for each abandoned build lock: the run would hang loading that op."""
    return [f"torch's build lock {lock} was left by a build of DeepSpeed's {os.path.basename(os.path.dirname(lock))} "
            f"op that was killed ({age / 60:.0f} min ago; no process holds it): every DeepSpeed start waits on it "
            f"forever. Remove it (rm {lock}) and start again; the op is then rebuilt or loaded as usual."
            for lock, age in abandoned_build_locks()]


def build_ops(names=tuple(OPS)) -> list[str]:
    """Build (or load) the ops in ``names`` that are not built for this install, one after another, in
    this process. Returns those it built. An op the accelerator has no builder for is skipped."""
    todo, built = [n for n in names if not op_built(n)], []
    if todo:
        from deepspeed.accelerator import get_accelerator

        for name in todo:
            builder = get_accelerator().create_op_builder(OPS[name])
            if builder is not None:
                builder.load(verbose=False)
                built.append(name)
    return built


def main() -> int:
    problems = build_lock_problems()
    if problems:
        print("\n".join(f"hybrid_ds: {p}" for p in problems), file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    built = build_ops()
    print(f"[hybrid_ds] DeepSpeed ops: built {', '.join(built)} in {time.perf_counter() - t0:.0f} s" if built else
          f"[hybrid_ds] DeepSpeed ops: nothing to build in {extensions_root()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
