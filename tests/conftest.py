"""Shared fixtures. Tests run offline on CPU with tiny models built locally."""

import json
import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
PYTHON = sys.executable


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


# Under pytest-xdist (.ci/run: `-n 2 --dist loadgroup`) each test module runs whole on one worker, so
# its module-scoped fixtures (a trained model, a launched run) are built once; modules that share a
# session fixture form one group, so that fixture too is built once.
SHARED_SESSION_RUN = {"test_multinode.py": "test_ppo_runs.py"}  # both read hybrid_zero2_bf16_run


def pytest_configure(config):
    """Build DeepSpeed's CPU ops (the shared-memory all-reduce, CPU Adam) once, before any test runs.

    Otherwise the first DeepSpeed run of each op compiles it (one to three minutes) inside that test's
    time limit, while the other xdist worker compiles the other op on the same two cores; a test that
    then kills its run on timeout kills the build, whose lock file stays, and every later DeepSpeed
    start waits on it forever (hybrid_ds/engine/jit_ops.py). Done by the controller alone (xdist
    workers carry ``workerinput``), in a subprocess that sees no GPU, like the CPU-tier runs."""
    if hasattr(config, "workerinput"):
        return
    from hybrid_ds.engine.jit_ops import OPS, op_built

    if all(op_built(name) for name in OPS):
        return
    import subprocess

    p = subprocess.run([PYTHON, "-m", "hybrid_ds.engine.jit_ops"], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    done = [line for line in p.stdout.splitlines() if line.startswith("[hybrid_ds]")]
    print("\n".join(done) if p.returncode == 0 else
          f"building DeepSpeed's ops failed (exit {p.returncode}); the tests that load them will:\n{p.stderr[-3000:]}",
          file=sys.stderr, flush=True)


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = os.path.basename(item.fspath)
        item.add_marker(pytest.mark.xdist_group(SHARED_SESSION_RUN.get(module, module)))


@pytest.fixture(autouse=True)
def _cpu_tier_stays_on_cpu(request, monkeypatch):
    """Every test outside the GPU tier (`-m gpu`) launches its runs on the CPU, also on a machine with
    GPUs: what the CPU tier proves (gloo, several processes on one box) is the same everywhere, and its
    multi-process launches never contend for one GPU. GPU-tier tests see the GPUs and skip a launch
    that needs more of them than there are."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture
def demo_items():
    from hybrid_ds.assets import DEMO_TASKS

    with open(DEMO_TASKS) as f:
        return json.load(f)


@pytest.fixture
def base_cfg(tmp_path):
    """A minimal valid config dict on the builtin model and data."""
    return {"MODE": "sft", "MODEL": "builtin:tiny-gpt2", "TRAIN_FILE": "builtin:demo-tasks",
            "OUTPUT_DIR": str(tmp_path / "out"), "SEED": 0}


@pytest.fixture(scope="session")
def hybrid_zero2_bf16_run(tmp_path_factory):
    """The 2-process ZeRO-2 bf16 hybrid run (test_ppo_runs.rl_cfg through ``accelerate launch
    --config_file launch/zero2.yaml``), launched once per session: tests/test_ppo_runs.py checks its
    outputs and tests/test_multinode.py compares the same config launched as two machines with it.
    Returns ``(config dict, its OUTPUT_DIR)``."""
    from launch_utils import launch
    from test_ppo_runs import rl_cfg

    tmp = tmp_path_factory.mktemp("hybrid_zero2_bf16")
    cfg = rl_cfg(tmp, "hybrid", BF16=True)
    launch(cfg, tmp, nproc=2, zero=2)
    return cfg, cfg["OUTPUT_DIR"]
