"""Config: every shipped config validates; bad configs give their specific message and exit code 2."""

import glob
import json
import os
import subprocess

import pytest

from conftest import PYTHON, REPO, write_json
from hybrid_ds.config import ConfigError, config_reference_markdown
from hybrid_ds.run.preflight import load_config
from hybrid_ds.train import main

LOCAL = ["MODEL=builtin:tiny-gpt2", "TRAIN_FILE=builtin:demo-tasks"]


def _local_overrides(tmp_path):
    return LOCAL + [f"OUTPUT_DIR={tmp_path}/out"]


SEED_CONFIGS = sorted(glob.glob(os.path.join(REPO, "examples", "seed", "*.json")))
EXAMPLES = sorted(glob.glob(os.path.join(REPO, "examples", "*.json")))
EXAMPLE_MODULES = sorted(glob.glob(os.path.join(REPO, "examples", "*.py")))  # imported by the EXAMPLES naming them
DS_CONFIGS = sorted(glob.glob(os.path.join(REPO, "ds_configs", "*.json")))
LAUNCH_CONFIGS = sorted(glob.glob(os.path.join(REPO, "launch", "*.yaml")))
HOSTFILE, SBATCH = os.path.join(REPO, "launch", "hostfile"), os.path.join(REPO, "launch", "slurm.sbatch")


def test_every_shipped_config_file_is_tested():
    """Each file under examples/, launch/ and ds_configs/ is in one of the lists the tests below run."""
    tested = set(SEED_CONFIGS + EXAMPLES + EXAMPLE_MODULES + DS_CONFIGS + LAUNCH_CONFIGS + [HOSTFILE, SBATCH])
    shipped = {os.path.join(d, n) for top in ("examples", "launch", "ds_configs")
               for d, _, names in os.walk(os.path.join(REPO, top)) for n in names}
    assert shipped and shipped <= tested, sorted(shipped - tested)
    assert len(SEED_CONFIGS) == 3 and EXAMPLES and DS_CONFIGS and LAUNCH_CONFIGS


@pytest.mark.parametrize("path", SEED_CONFIGS, ids=os.path.basename)
def test_seed_configs_validate_with_local_model_and_data(path, tmp_path):
    cfg = load_config(path, _local_overrides(tmp_path))
    with open(path) as f:
        raw = json.load(f)
    assert cfg.run.mode == raw["MODE"]
    if "REWARD" in raw:
        assert cfg.reward == raw["REWARD"]


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_examples_validate(path, tmp_path):
    overrides = [f"OUTPUT_DIR={tmp_path}/out"]
    with open(path) as f:
        if not json.load(f)["MODEL"].startswith("builtin:"):
            overrides.append("MODEL=builtin:tiny-gpt2")  # examples chained on an earlier run's output
    load_config(path, overrides)


@pytest.mark.parametrize("path", DS_CONFIGS, ids=os.path.basename)
def test_ds_configs_load_and_fill(path, tmp_path, base_cfg):
    from hybrid_ds.engine.launch_plan import fill_ds_config

    base_cfg["DS_CONFIG"] = path
    cfg = load_config(write_json(tmp_path / "c.json", base_cfg))
    with open(path) as f:
        template = json.load(f)
    stage = template["zero_optimization"]["stage"]
    ds = fill_ds_config(template, stage=stage, micro=2, accum=2, world=2, clip=1.0, precision="bf16")
    assert ds["train_batch_size"] == 8 and ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(ds), "every auto value must be filled"
    assert cfg.run.ds_config == path


@pytest.mark.parametrize("path", DS_CONFIGS, ids=os.path.basename)
def test_one_process_under_zero_without_offload_is_pointed_to_the_plain_engine(path):
    from hybrid_ds.engine.launch_plan import LaunchPlan

    with open(path) as f:
        template = json.load(f)
    plan = LaunchPlan(template["zero_optimization"]["stage"], "no", template, path)
    offload = "offload" in os.path.basename(path)
    assert plan.offloads is offload
    note = plan.single_process_note(1)
    assert bool(note) is not offload, note  # offloading saves memory even on one process
    assert not offload and "python -m hybrid_ds.train" in note or offload
    assert plan.single_process_note(2) == "" and LaunchPlan(0, "no", None, "x").single_process_note(1) == ""


@pytest.mark.parametrize("path", LAUNCH_CONFIGS, ids=os.path.basename)
def test_launch_configs_parse_and_point_at_ds_configs(path):
    import yaml

    with open(path) as f:
        text = f.read()
    assert text.startswith("# accelerate launch --config_file launch/"), "header must say how to launch"
    conf = yaml.safe_load(text)
    assert conf["distributed_type"] == "DEEPSPEED"
    assert os.path.isfile(os.path.join(REPO, conf["deepspeed_config"]["deepspeed_config_file"]))


def test_hostfile_parses_as_deepspeed_reads_it():
    from deepspeed.launcher.runner import fetch_hostfile

    with open(HOSTFILE) as f:
        assert f.readline().startswith("# deepspeed --hostfile launch/hostfile "), "header must say how to launch"
    assert dict(fetch_hostfile(HOSTFILE)) == {"node1": 8, "node2": 8}


def test_slurm_script_starts_one_accelerate_launch_per_node(tmp_path):
    """launch/slurm.sbatch under a stand-in SLURM (srun runs the task once per node with its
    SLURM_NODEID; accelerate prints its arguments): each node's accelerate launch resolves, through
    Accelerate's parser and launch/multinode.yaml, to the whole job, its own machine rank and
    machine 0's host, with the config and overrides passed through."""
    from hybrid_ds.engine.launcher import request_from_args

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {"scontrol": 'printf "gpu-a\\ngpu-b\\n"',
             "srun": 'while [ "${1#-}" != "$1" ]; do shift; done\n'
                     'for n in 0 1; do SLURM_NODEID=$n "$@"; done',
             "accelerate": 'printf "%s\\0" "$@" > "$ARGS_DIR/node$SLURM_NODEID"'}
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", ARGS_DIR=str(tmp_path),
               SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_NNODES="2")
    p = subprocess.run(["bash", SBATCH, "cfg.json", "LR_SFT=1e-4"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    for rank in (0, 1):
        argv = (tmp_path / f"node{rank}").read_text().split("\0")[:-1]
        assert argv[0] == "launch" and argv[-4:] == ["-m", "hybrid_ds.train", "cfg.json", "LR_SFT=1e-4"], argv
        req = request_from_args(argv[1:], REPO)
        assert (req.processes, req.machines, req.multinode_launcher) == (16, 2, "standard"), argv
        assert argv[argv.index("--machine_rank") + 1] == str(rank)
        assert argv[argv.index("--main_process_ip") + 1] == "gpu-a"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles_copy_what_exists_and_install_through_setup_sh(name):
    """No docker here to build them (README, Docker): what can be checked without it is that every
    COPY source exists, the one install script runs in its --system mode and the entrypoint trains;
    .ci/run checks that mode's install itself (setup.sh --system --check)."""
    with open(os.path.join(REPO, "docker", name)) as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    copies = [ln.split()[1:-1] for ln in lines if ln.startswith("COPY ")]
    assert copies and all(os.path.exists(os.path.join(REPO, src)) for srcs in copies for src in srcs), copies
    text = "\n".join(lines)
    assert "bash scripts/setup.sh --system" in text and text.count("pip install") == 0
    assert lines[0].startswith("ARG BASE=") and ":" in lines[0] and "latest" not in lines[0]  # pinned by tag
    assert lines[-1] == 'ENTRYPOINT ["python", "-m", "hybrid_ds.train"]'


def test_overrides_parse_json_values(tmp_path, base_cfg):
    cfg = load_config(write_json(tmp_path / "c.json", base_cfg),
                      ["LR_SFT=1e-4", "SHUFFLE=no", 'REWARD={"type": "bleu"}', "MODE=hybrid"])
    assert cfg.sft.lr == 1e-4 and cfg.data.shuffle is False and cfg.reward == {"type": "bleu"}
    assert cfg.run.mode == "hybrid"


def test_docs_reference_is_generated_and_current():
    with open(os.path.join(REPO, "docs", "config.md")) as f:
        assert f.read() == config_reference_markdown(), "regenerate: python -m hybrid_ds.config --docs > docs/config.md"


# (overrides or raw changes, expected fragment of the message)
BAD = [
    ({"LR_SFTT": 1e-4}, "LR_SFTT: unknown key. Did you mean LR_SFT?"),
    ({"lr_sft": 1e-4}, "lr_sft: keys are UPPER_CASE; write LR_SFT."),
    ({"SFT_BATCH": "eight"}, "SFT_BATCH: expected an integer, got str 'eight'."),
    ({"LR_SFT": -1.0}, "LR_SFT: -1.0 is out of range; it must be > 0.0."),
    ({"PERCENT": 150}, "PERCENT: 150.0 is out of range; it must be <= 100.0."),
    ({"MODE": "hybird"}, "MODE: 'hybird' is not one of sft, ppo, hybrid, dpo, rm. Did you mean 'hybrid'?"),
    ({"SHUFFLE": "./shuffle.sh data.json"}, "hybrid_ds never runs config strings"),
    ({"SFT_BATCH": 6, "GRAD_ACCUM": 4}, "SFT_BATCH (6) must be divisible by processes x GRAD_ACCUM = 1 x 4 = 4"),
    ({"MODE": "ppo", "PPO_BATCH": 8, "PPO_MINI": 3}, "PPO_MINI (3) must divide PPO_BATCH (8)."),
    ({"TRAIN_FILE": "/nonexistent/train.json"}, "TRAIN_FILE: '/nonexistent/train.json' does not exist"),
    ({"MODEL": "./no/such/model"}, "MODEL: './no/such/model' does not exist"),
    ({"MODEL": "gpt2-not-cached-anywhere"}, "is not in the Hugging Face cache, and the hub is offline"),
    ({"BF16": True, "FP16": True}, "BF16 and FP16: choose one mixed-precision mode, not both."),
    ({"MAX_NEW_TOKENS": 4, "MIN_NEW_TOKENS": 8}, "MIN_NEW_TOKENS (8) exceeds MAX_NEW_TOKENS (4)."),
    ({"MODE": "hybrid", "CYCLE_SFT_STEPS": 0, "CYCLE_PPO_UPDATES": 0}, "a hybrid cycle would do nothing"),
    ({"OUTPUT_DIR": None}, "OUTPUT_DIR: expected a string, got NoneType None."),
    ({"MODEL": "builtin:huge"}, "MODEL: unknown builtin model 'builtin:huge'"),
    ({"MILESTONES": [3, "x"]}, "MILESTONES: expected a list of positive integers"),
    ({"MODE": "ppo", "REWARD": {"type": "blue"}}, "REWARD.type"),
    ({"OPTIMIZER": "adamm"}, "OPTIMIZER"),
    ({"SCHEDULER": "cosinus"}, "SCHEDULER"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_config_exits_2_with_specific_message(change, message, tmp_path, base_cfg, capsys):
    raw = {**base_cfg, **change}
    if "lr_sft" in change:
        raw = {**base_cfg, "lr_sft": 1e-4}
    with pytest.raises(SystemExit) as e:
        main([write_json(tmp_path / "bad.json", raw)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


def test_output_dir_with_a_finished_run_is_refused(tmp_path, base_cfg, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit) as e:
        main([write_json(tmp_path / "c.json", {**base_cfg, "OUTPUT_DIR": str(out)})])
    assert e.value.code == 2 and "already holds a run" in capsys.readouterr().err


def test_all_problems_reported_at_once(tmp_path, base_cfg):
    raw = {**base_cfg, "LR_SFTT": 1, "SFT_BATCH": -3, "MODE": "sfft"}
    with pytest.raises(ConfigError) as e:
        load_config(write_json(tmp_path / "c.json", raw))
    assert len(e.value.problems) == 3, e.value.problems


def test_cli_exit_code_and_no_traceback_in_a_real_process(tmp_path, base_cfg):
    bad = write_json(tmp_path / "bad.json", {**base_cfg, "EPOCHSS": 2})
    p = subprocess.run([PYTHON, "-m", "hybrid_ds.train", bad], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2
    assert "EPOCHSS: unknown key. Did you mean EPOCHS?" in p.stderr and "Traceback" not in p.stderr


def test_not_json_and_missing_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{MODE: sft")
    with pytest.raises(SystemExit) as e:
        main([str(bad)])
    assert e.value.code == 2 and "not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "missing.json")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_dry_run_prints_plan(tmp_path, base_cfg, capsys):
    cfg = write_json(tmp_path / "c.json", {**base_cfg, "SFT_BATCH": 8, "GRAD_ACCUM": 2, "EPOCHS": 1,
                                                 "MAXSEQ": 512})
    assert main([cfg, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "SFT batch: 8 = 1 processes x 2 accumulation x 4 micro-batch" in out
    assert "steps: 50 SFT steps" in out  # 400 demo items / 8
    assert not os.path.exists(tmp_path / "out"), "dry run must not write outputs"


def test_import_is_light():
    code = "import sys, hybrid_ds, hybrid_ds.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([PYTHON, "-c", code], check=True, cwd=REPO)


# -- finite floats, duplicate keys, argument order, scheduler defaults and spellings

@pytest.mark.parametrize("text,key", [('{"LR_SFT": NaN}', "LR_SFT"), ('{"MAX_GRAD_NORM": Infinity}', "MAX_GRAD_NORM"),
                                      ('{"TARGET_KL": -Infinity}', "TARGET_KL")])
def test_non_finite_json_literals_are_refused(text, key, tmp_path, base_cfg):
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(path), [f"{k}={json.dumps(v)}" for k, v in base_cfg.items()])
    assert any(p.startswith(f"{key}:") and "not a finite number" in p for p in e.value.problems), e.value.problems


@pytest.mark.parametrize("override", ["LR_SFT=NaN", "LR_SFT=nan", "LR_SFT=inf", "LR_PPO=-Infinity", "GAMMA=Infinity"])
def test_non_finite_overrides_are_refused(override, tmp_path, base_cfg):
    with pytest.raises(ConfigError) as e:
        load_config(write_json(tmp_path / "c.json", base_cfg), [override])
    key = override.split("=")[0]
    assert [p for p in e.value.problems if p.startswith(f"{key}:") and "finite" in p], e.value.problems


def test_duplicate_key_is_refused_naming_it(tmp_path, base_cfg):
    text = json.dumps(base_cfg)[:-1] + ', "LR_SFT": 1e-4, "LR_SFT": 2e-4}'
    (tmp_path / "c.json").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path / "c.json"))
    assert "'LR_SFT' is written more than once" in str(e.value)


def test_options_and_overrides_in_any_order():
    from hybrid_ds.run.cli import parse_args

    for argv in (["c.json", "--dry-run", "LR_SFT=1e-4", "SEED=3"], ["--dry-run", "c.json", "LR_SFT=1e-4", "SEED=3"],
                 ["c.json", "LR_SFT=1e-4", "--dry-run", "SEED=3"]):
        a = parse_args(argv)
        assert (a.config, a.overrides, a.dry_run) == ("c.json", ["LR_SFT=1e-4", "SEED=3"], True), argv


def test_scheduler_defaults_are_the_original_ones():
    from hybrid_ds.config import SchedConfig

    s = SchedConfig()
    assert (s.gamma, s.step_size, s.t_mult, s.cycle_momentum, s.last_epoch) == (0.95, 1000, 2, True, -1)


def test_scheduler_spellings_of_the_original(tmp_path, base_cfg):
    from hybrid_ds.optim import PhaseSchedule

    cfg = load_config(write_json(tmp_path / "c.json", {**base_cfg, "SCHEDULER": "cosineannealing_warm_restarts",
                                                       "T_0": 7, "LAST_EPOCH": 2}))
    assert cfg.sched.t0 == 7 and cfg.sched.last_epoch == 2
    started = PhaseSchedule(cfg, 1.0, 100)
    assert started.steps_done == 3  # LAST_EPOCH=2: three steps already done
    fresh = PhaseSchedule(load_config(write_json(tmp_path / "d.json", {**base_cfg, "SCHEDULER":
                                                                       "cosineannealing_warm_restarts", "T_0": 7})),
                          1.0, 100)
    for _ in range(3):
        fresh.step()
    assert started.lr == fresh.lr < 1.0
    for none in (None, "", "no", "NONE"):
        cfg = load_config(write_json(tmp_path / "n.json", {**base_cfg, "SCHEDULER": none}))
        assert PhaseSchedule(cfg, 1e-3, 10).name == "none"


def test_collapsing_schedule_is_warned_with_numbers(tmp_path, base_cfg):
    from hybrid_ds.optim import schedule_warnings

    cfg = load_config(write_json(tmp_path / "c.json", {**base_cfg, "SCHEDULER": "step", "STEP_SIZE": 1, "GAMMA": 0.1}))
    (w,) = schedule_warnings(cfg, {"LR_SFT": 20})
    assert "SCHEDULER=step with GAMMA=0.1 every 1 steps" in w and "after 2 of the schedule's 20" in w
    cfg = load_config(write_json(tmp_path / "d.json", {**base_cfg, "SCHEDULER": "exponential"}))
    assert schedule_warnings(cfg, {"LR_SFT": 50}) == []  # 0.95^50 = 0.077: still above 1%
    assert "after 90 of the schedule's 100" in schedule_warnings(cfg, {"LR_SFT": 100})[0]  # 0.95^90 < 0.01
