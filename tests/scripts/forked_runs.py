"""Run several trainings through ``hybrid_ds.run.cli.main`` (what ``python -m hybrid_ds.train`` runs), each
on its own ranks, forked from this process after the heavy imports (torch, transformers, DeepSpeed,
Accelerate) so that each run costs its own work rather than one interpreter start per rank.

    python tests/scripts/forked_runs.py JOBS.json

``JOBS.json``: a list of ``{"name": str, "nproc": int, "config": path}``. The jobs run one after the
other; a job's ``nproc`` ranks are forked together and rendezvous as ``torchrun`` ranks would
(``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``LOCAL_RANK``/``WORLD_SIZE``, a fresh port per job), so every run
gets a fresh process group and fresh Accelerate and DeepSpeed state; the config's ZERO_STAGE selects
DeepSpeed. Prints ``JOB <name> <exit code> <seconds>`` per job; exits 1 if any job failed.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from launch_utils import free_port  # noqa: E402


def run_job(job: dict) -> int:
    port, pids = free_port(), []
    for rank in range(job["nproc"]):
        pid = os.fork()
        if pid == 0:  # a rank: the entry point's main, then straight out (the parent's atexit is not ours)
            code = 1
            try:
                if job["nproc"] > 1:
                    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                                      LOCAL_RANK=str(rank), WORLD_SIZE=str(job["nproc"]),
                                      LOCAL_WORLD_SIZE=str(job["nproc"]))
                from hybrid_ds.run.cli import main

                code = main([job["config"]])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - a rank's traceback goes to the log, its code to the parent
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    return max(codes, key=abs)


def preload(configs) -> None:
    """Import, once and before any fork, what every run would import lazily on its own: torch's
    compiler stack (the optimizers' constructors import it), DeepSpeed's ZeRO stages (imported as a run
    imports them, without mlflow: engine.dist.import_deepspeed), transformers' schedules and each
    config's model class. The parent builds no model and starts no thread."""
    import importlib

    from hybrid_ds.engine.dist import import_deepspeed

    import_deepspeed()
    import accelerate  # noqa: F401
    import deepspeed.runtime.zero.stage3  # noqa: F401
    import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401
    import torch._dynamo  # noqa: F401
    import transformers.optimization  # noqa: F401
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from hybrid_ds.assets import resolve_model

    for module in ("hybrid_ds.run.cli", "hybrid_ds.run.setup", "hybrid_ds.run.preflight", "hybrid_ds.run.loop",
                   "hybrid_ds.run.checkpoint", "hybrid_ds.engine.dist", "hybrid_ds.algorithms.ppo",
                   "hybrid_ds.algorithms.sft", "hybrid_ds.rollout.sampler", "hybrid_ds.rewards"):
        importlib.import_module(module)
    for path in configs:
        with open(path) as f:
            model = json.load(f)["MODEL"]
        MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(resolve_model(model)))]


def main() -> int:
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    preload([job["config"] for job in jobs])

    failed = 0
    for job in jobs:
        t0 = time.perf_counter()
        code = run_job(job)
        print(f"JOB {job['name']} {code} {time.perf_counter() - t0:.1f}", flush=True)
        failed |= code != 0
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
