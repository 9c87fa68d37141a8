"""Run ``python -m hybrid_ds.train ARGS`` command lines, each in a child forked from this process after
the imports a run makes (:func:`preload`), so that a command costs its own work rather than an
interpreter start and those imports. What a child does not get afresh is what those modules did at
import: a value one of them read from the environment then is this process's (run a command whose
point is its environment in a fresh interpreter).

    python tests/scripts/forked_cli.py JOBS.json

``JOBS.json``: a list of ``{"name", "args": [...], "env": {...}, "cwd", "stdout": path, "stderr": path,
"timeout": seconds}``. A child is the command's process from ``-m`` on: its environment is ``env``
(nothing of this process's), its working directory ``cwd`` (also ``sys.path[0]``, as ``-m`` sets it),
``sys.argv`` ``[train.py, *args]``, file descriptors 1 and 2 on the two files; it runs
``hybrid_ds.train`` as ``__main__`` through :mod:`runpy` (what ``-m`` does) and then ends as the
interpreter ends: a ``SystemExit``'s code (a non-int code printed, exit 1), an uncaught exception's
traceback on stderr and exit 1, non-daemon threads joined, ``atexit`` handlers run. SIGALRM kills a
child still running after ``timeout``. The jobs run one after the other; prints ``JOB <name> <exit
code> <seconds>`` per job (a negative code: killed by that signal).
"""

import json
import os
import sys
import time


def preload() -> None:
    """What ``python -m hybrid_ds.train --dry-run`` imports (a training run imports all of it and more):
    the command line, config and preflight modules, torch, transformers' auto classes and
    schedules, Accelerate and PEFT. Nothing is run; no thread is started."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers.optimization  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import hybrid_ds.run.cli
    import hybrid_ds.run.preflight  # noqa: F401


def child(job: dict) -> int:
    """The command's life after the interpreter started; returns its exit code."""
    import atexit
    import runpy
    import signal
    import threading
    import traceback

    signal.alarm(int(job["timeout"]))
    os.environ.clear()
    os.environ.update(job["env"])
    os.chdir(job["cwd"])
    sys.path[0] = os.getcwd()
    for fd, name in ((1, "stdout"), (2, "stderr")):
        f = os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = [None, *job["args"]]  # runpy puts the module's file in argv[0]
    code = 0
    try:
        runpy.run_module("hybrid_ds.train", run_name="__main__", alter_sys=True)
    except SystemExit as e:  # as the interpreter reads it
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - an uncaught exception: its traceback, exit 1
        traceback.print_exc()
        code = 1
    threading._shutdown()  # the interpreter's exit: wait for non-daemon threads, then atexit
    atexit._run_exitfuncs()
    return code


def run_job(job: dict) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = child(job)
        except BaseException:  # noqa: BLE001 - the child's own setup failed: its traceback, exit 1
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def main() -> int:
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    preload()
    for job in jobs:
        t0 = time.perf_counter()
        code = run_job(job)
        print(f"JOB {job['name']} {code} {time.perf_counter() - t0:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
