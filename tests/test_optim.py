"""hybrid_ds.optim: every optimizer steps on CPU with the configured hyper-parameters, every
schedule follows its closed form, schedules resume exactly, and bad settings are explained
at validation time."""

import io
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from hybrid_ds import optim
from hybrid_ds.optim import optimizers as ho
from hybrid_ds.config import build_config

ROOT = Path(__file__).resolve().parents[1]
LR = 1e-2


def make_cfg(**keys):
    cfg, problems = build_config(keys)
    assert not problems, problems
    return cfg


# --------------------------------------------------------------------------------------
# optimizers


def tiny_groups(weight_decay):
    """A tiny model and groups shaped like the trainer's: decayed matrices, undecayed biases/norm
    weights, a value group. The 64x64 weight has 4096 elements, enough for 8-bit state."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 4))
    groups = [
        {"params": [model[0].weight, model[2].weight], "role": "policy", "weight_decay": weight_decay},
        {"params": [model[0].bias, model[1].weight, model[1].bias], "role": "policy", "weight_decay": 0.0},
        {"params": [model[2].bias], "role": "value", "weight_decay": 0.0},
    ]
    return model, groups


HP = dict(BETA1=0.8, BETA2=0.95, EPS=1e-6, WEIGHT_DECAY=0.05, ALPHA=0.9, MOMENTUM=0.5)
EXTRA = {  # settings each optimizer accepts beyond HP (bitsandbytes' Adagrad needs the zeros)
    "adagrad": dict(INITIAL_ACCUMULATOR_VALUE=0.1, LR_DECAY=0.01),
    "rmsprop": dict(CENTERED=True),
    "sgd": dict(DAMPENING=0.1),
}


def expected_group(name):
    """What each group must hold, written from the libraries' documented arguments."""
    if "ademamix" in name:
        return {"betas": (0.8, 0.95, 0.9999), "eps": 1e-6, "alpha": 5.0}
    if name.startswith(("adam", "paged_adam")):
        return {"betas": (0.8, 0.95), "eps": 1e-6}
    if "lion" in name:
        return {"betas": (0.8, 0.95)}
    if name == "adagrad":
        return {"eps": 1e-6, "lr_decay": 0.01, "initial_accumulator_value": 0.1}
    if name.startswith("adagrad_"):
        return {"eps": 1e-6}
    if name == "rmsprop":
        return {"alpha": 0.9, "eps": 1e-6, "momentum": 0.5, "centered": True}
    if name == "sgd":
        return {"momentum": 0.5, "dampening": 0.1, "nesterov": False}
    if name == "sgd_8bit":
        return {"betas": (0.5, 0.0)}  # bitsandbytes keeps (momentum, dampening) as betas
    if name == "adafactor":
        return {"relative_step": False, "scale_parameter": False, "warmup_init": False, "beta1": None}
    raise AssertionError(name)


def test_every_spec_name_is_in_the_table():
    spec_names = ("adamw adamw_8bit adamw_32bit paged_adamw_8bit paged_adamw_32bit adam_8bit adam_32bit "
                  "paged_adam_8bit paged_adam_32bit adagrad adagrad_8bit adagrad_32bit rmsprop ademamix_8bit "
                  "ademamix_32bit paged_ademamix_8bit paged_ademamix_32bit sgd sgd_8bit lion_8bit lion_32bit "
                  "paged_lion_8bit paged_lion_32bit adafactor").split()
    assert ho.optimizer_names() == spec_names


@pytest.mark.parametrize("name", ho.optimizer_names())
def test_optimizer_builds_steps_and_receives_hyperparameters(name):
    extra = EXTRA.get(name, {})
    cfg = make_cfg(OPTIMIZER=name.upper(), **HP, **extra)  # names are case-insensitive
    assert ho.validate_optim_config(cfg) == []
    model, groups = tiny_groups(cfg.optim.weight_decay)
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = ho.build_optimizer(groups, cfg, LR)
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(8, 64)).pow(2).mean().backward()
            opt.step()
    # 1. the step moved every parameter, and nothing blew up
    for b, p in zip(before, model.parameters()):
        assert not torch.equal(b, p.detach()), f"{name} did not update a {tuple(p.shape)} parameter"
        assert torch.isfinite(p).all()
    # 2. the groups kept their keys; decay only where the trainer asked for it
    assert [g["role"] for g in opt.param_groups] == ["policy", "policy", "value"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0, 0.0]
    assert all(g["lr"] == LR for g in opt.param_groups)
    # 3. the configured hyper-parameters reached the optimizer
    for key, value in expected_group(name).items():
        for g in opt.param_groups:
            got = tuple(g[key]) if isinstance(g[key], (list, tuple)) else g[key]
            assert got == (pytest.approx(value) if value is not None else None), (name, key, got)
    # 4. bitsandbytes keeps 8-bit state for big tensors when asked, 32-bit otherwise
    if ho.OPTIMIZERS[name].source == "bitsandbytes":
        state = opt.state[model[0].weight]["state1"]
        assert state.dtype == (torch.uint8 if name.endswith("8bit") else torch.float32)
        if "ademamix" in name:  # fast and slow EMAs: two buffers (bitsandbytes' AdEMAMix32bit has one)
            assert state.shape == (2, 64, 64)
    # 5. paged optimizers fall back to ordinary tensors on CPU, with bitsandbytes' warning
    if name.startswith("paged_"):
        assert any("Paged optimizers are not supported on CPU" in str(w.message) for w in caught)


def test_sgd_nesterov_reaches_torch():
    cfg = make_cfg(OPTIMIZER="sgd", MOMENTUM=0.9, NESTEROV=True)
    _, groups = tiny_groups(0.01)
    opt = ho.build_optimizer(groups, cfg, LR)
    assert opt.param_groups[0]["nesterov"] is True and opt.param_groups[0]["momentum"] == 0.9


def test_group_without_weight_decay_gets_the_config_default_and_caller_dicts_stay_untouched():
    cfg = make_cfg(OPTIMIZER="adamw", WEIGHT_DECAY=0.2)
    p = nn.Parameter(torch.zeros(3))
    groups = [{"params": [p], "role": "policy"}]
    opt = ho.build_optimizer(groups, cfg, LR)
    assert opt.param_groups[0]["weight_decay"] == 0.2
    assert groups == [{"params": [p], "role": "policy"}]


def problems_of(**keys):
    return ho.validate_optim_config(make_cfg(**keys))


def test_unknown_optimizer_lists_the_valid_names_and_suggests_one():
    (msg,) = problems_of(OPTIMIZER="adamw8bit")
    assert "OPTIMIZER" in msg and "Did you mean 'adamw_8bit'?" in msg
    assert all(n in msg for n in ho.optimizer_names())
    _, groups = tiny_groups(0.0)
    with pytest.raises(ValueError, match="Valid: adamw, adamw_8bit"):
        ho.build_optimizer(groups, make_cfg(OPTIMIZER="adamw8bit"), LR)


def test_sgd_8bit_without_momentum_is_reported_not_crashed():
    (msg,) = problems_of(OPTIMIZER="sgd_8bit")
    assert "OPTIMIZER=sgd_8bit" in msg and "MOMENTUM > 0" in msg and "OPTIMIZER=sgd" in msg
    _, groups = tiny_groups(0.0)
    with pytest.raises(ValueError, match="MOMENTUM > 0"):
        ho.build_optimizer(groups, make_cfg(OPTIMIZER="sgd_8bit"), LR)
    (msg,) = problems_of(OPTIMIZER="sgd_8bit", MOMENTUM=0.9, NESTEROV=True)
    assert "NESTEROV" in msg


@pytest.mark.parametrize("name", ["adagrad_8bit", "adagrad_32bit"])
def test_bnb_adagrad_limits_are_reported(name):
    (msg,) = problems_of(OPTIMIZER=name, LR_DECAY=0.01)
    assert f"OPTIMIZER={name}" in msg and "LR_DECAY" in msg and "OPTIMIZER=adagrad" in msg


def test_torch_rules_are_reported_early():
    assert any("NESTEROV needs MOMENTUM > 0" in p for p in problems_of(OPTIMIZER="sgd", NESTEROV=True))
    assert any("below 1" in p for p in problems_of(OPTIMIZER="adamw", BETA2=1.0))
    assert any("no momentum or beta1" in p
               for p in problems_of(OPTIMIZER="adagrad", SCHEDULER="onecycle", CYCLE_MOMENTUM=True))
    assert any("momentum buffer" in p
               for p in problems_of(OPTIMIZER="rmsprop", SCHEDULER="cyclic", CYCLE_MOMENTUM=True))


def test_bitsandbytes_missing_or_too_old_for_cpu_is_reported(monkeypatch):
    real_find_spec = ho.importlib.util.find_spec
    monkeypatch.setattr(ho.importlib.util, "find_spec",
                        lambda n, *a: None if n == "bitsandbytes" else real_find_spec(n, *a))
    (msg,) = problems_of(OPTIMIZER="lion_8bit")
    assert "OPTIMIZER=lion_8bit needs bitsandbytes" in msg and "pip install bitsandbytes" in msg
    assert problems_of(OPTIMIZER="adamw") == []
    monkeypatch.setattr(ho.importlib.util, "find_spec", real_find_spec)
    monkeypatch.setattr(ho, "_bnb_version", lambda: (0, 45))
    monkeypatch.setattr(ho, "_cuda_known_absent", lambda: True)
    (msg,) = problems_of(OPTIMIZER="paged_adamw_8bit")
    assert "no CUDA" in msg and "bitsandbytes>=0.50" in msg
    monkeypatch.setattr(ho, "_cuda_known_absent", lambda: False)
    assert problems_of(OPTIMIZER="paged_adamw_8bit") == []


OFFLOAD = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}


def test_offload_rules(tmp_path):
    assert ho.offload_device(OFFLOAD) == "cpu" and ho.offload_device({"zero_optimization": {"stage": 2}}) is None
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(OFFLOAD))
    (msg,) = problems_of(OPTIMIZER="rmsprop", DS_CONFIG=str(path))
    assert "zero_force_ds_cpu_optimizer" in msg and "OPTIMIZER=rmsprop" in msg
    assert problems_of(OPTIMIZER="adamw_8bit", DS_CONFIG=str(path)) == []
    assert any("DeepSpeedCPUAdagrad" in p
               for p in problems_of(OPTIMIZER="adagrad", LR_DECAY=0.1, DS_CONFIG=str(path)))
    _, groups = tiny_groups(0.0)
    with pytest.raises(ValueError, match="zero_force_ds_cpu_optimizer"):
        ho.build_optimizer(groups, make_cfg(OPTIMIZER="sgd"), LR, ds_config=OFFLOAD)
    allowed = dict(OFFLOAD, zero_force_ds_cpu_optimizer=False)
    assert isinstance(ho.build_optimizer(groups, make_cfg(OPTIMIZER="sgd"), LR, ds_config=allowed), torch.optim.SGD)


def test_deepspeed_settings_flag_untested_optimizers():
    assert ho.deepspeed_optimizer_settings("adamw") == {}
    assert ho.deepspeed_optimizer_settings("ADAGRAD") == {}
    assert ho.deepspeed_optimizer_settings("adamw_8bit") == {"zero_allow_untested_optimizer": True}
    assert ho.deepspeed_optimizer_settings("adamw_8bit", OFFLOAD) == {}  # becomes DeepSpeedCPUAdam
    assert ho.deepspeed_optimizer_settings("sgd") == {"zero_allow_untested_optimizer": True}


@pytest.mark.slow
def test_offload_builds_deepspeed_cpu_adam():
    """Loads DeepSpeed's cpu_adam op (tests/conftest.py builds it before the tests start)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    tested = {f"{c.__module__.split('.')[0]}.{c.__name__}" for c in ZERO_SUPPORTED_OPTIMIZERS}
    assert {"torch.AdamW", "torch.Adagrad", "deepspeed.DeepSpeedCPUAdam", "deepspeed.DeepSpeedCPULion",
            "deepspeed.DeepSpeedCPUAdagrad"} <= tested
    cfg = make_cfg(OPTIMIZER="paged_adamw_8bit", **HP)
    model, groups = tiny_groups(cfg.optim.weight_decay)
    opt = ho.build_optimizer(groups, cfg, LR, ds_config=OFFLOAD)
    assert type(opt) is DeepSpeedCPUAdam and opt.adam_w_mode
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0, 0.0]
    assert [g["role"] for g in opt.param_groups] == ["policy", "policy", "value"]
    assert all(tuple(g["betas"]) == (0.8, 0.95) and g["eps"] == 1e-6 for g in opt.param_groups)
    before = model[0].weight.detach().clone()
    model(torch.randn(8, 64)).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(before, model[0].weight.detach())


def test_validation_does_not_import_torch():
    code = ("import sys; from hybrid_ds.config import build_config; from hybrid_ds.optim import "
            "validate_optim_config; cfg, _ = build_config({'OPTIMIZER': 'paged_lion_8bit', 'SCHEDULER': 'cyclic'}); "
            "validate_optim_config(cfg); assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'bitsandbytes' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_a_runs_start_imports_neither_peft_nor_mlflow():
    """Start-up cost of every process: the default (linear) schedule is built without transformers.
    optimization (which imports peft and bitsandbytes), and engine.dist.import_deepspeed imports
    DeepSpeed without its autotuner's mlflow, which stays importable for REPORT_TO=mlflow (no entry of
    it, not even the None that hid it, is left in sys.modules)."""
    code = ("import sys; from hybrid_ds import optim; from hybrid_ds.config import build_config; "
            "from hybrid_ds.engine.dist import import_deepspeed; cfg, _ = build_config({}); "
            "optim.PhaseSchedule(cfg, 1e-3, 10); import_deepspeed(); assert 'deepspeed' in sys.modules; "
            "late = [m for m in ('peft', 'bitsandbytes', 'mlflow') if m in sys.modules]; assert not late, late")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# --------------------------------------------------------------------------------------
# schedules


def curve(n, base=1.0, total=10, metrics=None, **keys):
    """lr used at steps 0..n (index t = after t optimizer steps)."""
    sched = optim.PhaseSchedule(make_cfg(**keys), base, total)
    lrs = [sched.lr]
    for t in range(n):
        sched.step(None if metrics is None else metrics[t])
        lrs.append(sched.lr)
    return lrs


def approx(x):
    return pytest.approx(x, rel=1e-6, abs=1e-12)


def test_linear_with_warmup_and_hold_after_the_end():
    lrs = curve(12, SCHEDULER="linear", NUM_WARMUP_STEPS=2)
    assert lrs[0] == 0.0 and lrs[1] == approx(0.5) and lrs[2] == approx(1.0)
    assert lrs[6] == approx((10 - 6) / (10 - 2))
    assert lrs[10] == 0.0 and lrs[12] == 0.0


@pytest.mark.parametrize("warmup,total", [(0, 1), (0, 7), (3, 10), (10, 10)])
def test_linear_and_constant_are_the_transformers_schedules(warmup, total):
    """Built without importing transformers.optimization (schedulers._build_scheduler): the same lr at
    every step, past the end included, as transformers' own builders."""
    from transformers import optimization as tfo

    theirs = {"linear": tfo.get_linear_schedule_with_warmup, "constant": tfo.get_constant_schedule}
    for name, build in theirs.items():
        shadow = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        ref = build(shadow, warmup, total) if name == "linear" else build(shadow)
        want = [shadow.param_groups[0]["lr"]]
        for _ in range(total + 2):
            shadow.step()
            ref.step()
            want.append(shadow.param_groups[0]["lr"])
        keys = dict(NUM_WARMUP_STEPS=warmup) if name == "linear" else {}  # constant refuses a warm-up
        assert curve(total + 2, SCHEDULER=name, total=total, **keys) == want, name


def test_warmup_ratio_rounds_up():
    sched = optim.PhaseSchedule(make_cfg(SCHEDULER="linear", WARMUP_RATIO=0.25), 1.0, 10)
    assert sched.warmup_steps == 3  # ceil(2.5)


def test_cosine():
    lrs = curve(10, SCHEDULER="cosine", NUM_WARMUP_STEPS=2)
    for t in (2, 4, 6, 8, 10):
        assert lrs[t] == approx(0.5 * (1 + math.cos(math.pi * (t - 2) / 8)))
    assert lrs[6] == approx(0.5) and lrs[10] == approx(0.0)


def test_cosine_with_restarts():
    lrs = curve(10, SCHEDULER="cosine_with_restarts", NUM_WARMUP_STEPS=2, NUM_CYCLES=2)
    assert lrs[4] == approx(0.5)  # p = 1/4: half-way down the first cycle
    assert lrs[6] == approx(1.0)  # p = 1/2: restart
    assert lrs[8] == approx(0.5) and lrs[10] == 0.0


def test_polynomial_power_two_with_floor():
    lrs = curve(10, SCHEDULER="poly", NUM_WARMUP_STEPS=2, POLY_POWER=2.0, LR_FLOOR=0.1)
    for t in (2, 6, 8, 10):
        assert lrs[t] == approx((1 - 0.1) * (1 - (t - 2) / 8) ** 2 + 0.1)
    assert lrs[6] == approx(0.325) and lrs[10] == approx(0.1)


def test_constant_variants_and_none():
    assert curve(10, SCHEDULER="constant") == [1.0] * 11
    assert curve(10, SCHEDULER="none") == [1.0] * 11
    assert curve(4, SCHEDULER="constant_with_warmup", NUM_WARMUP_STEPS=4) == approx([0, 0.25, 0.5, 0.75, 1.0])


def test_inverse_sqrt():
    lrs = curve(10, SCHEDULER="inverse_sqrt", NUM_WARMUP_STEPS=2)
    assert lrs[1] == approx(0.5) and lrs[2] == approx(1.0)
    assert lrs[8] == approx(math.sqrt(2 / 8)) and lrs[10] == approx(math.sqrt(2 / 10))


def test_step_multistep_exponential():
    assert curve(9, SCHEDULER="step", STEP_SIZE=3, GAMMA=0.5) == approx([0.5 ** (t // 3) for t in range(10)])
    assert curve(6, SCHEDULER="multistep", MILESTONES=[2, 5], GAMMA=0.1) == approx(
        [1, 1, 0.1, 0.1, 0.1, 0.01, 0.01])
    assert curve(10, SCHEDULER="exponential", GAMMA=0.9) == approx([0.9 ** t for t in range(11)])


def test_cosineannealing_defaults_t_max_to_total():
    lrs = curve(10, SCHEDULER="cosineannealing", ETA_MIN=0.1)  # the spec's alias of MIN_LR
    assert lrs == approx([0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / 10)) for t in range(11)])


def test_cosineannealing_warm_restarts():
    lrs = curve(12, total=20, SCHEDULER="cosineannealing_warm_restarts", T0=4, T_MULT=2)
    assert lrs[2] == approx(0.5)  # half of the first 4-step period
    assert lrs[4] == approx(1.0)  # restart; the next period lasts 8
    assert lrs[8] == approx(0.5) and lrs[12] == approx(1.0)


def test_onecycle_start_peak_end_and_momentum():
    sched = optim.PhaseSchedule(make_cfg(SCHEDULER="onecycle", CYCLE_MOMENTUM=True), 1.0, 10)
    lrs, moms = [sched.lr], [sched.momentum]
    for _ in range(11):
        sched.step()
        lrs.append(sched.lr)
        moms.append(sched.momentum)
    initial, final = 1.0 / 25, 1.0 / 25 / 1e4
    assert lrs[0] == approx(initial) and lrs[2] == approx(1.0)  # peak at pct_start*T - 1
    assert lrs[9] == approx(final)  # OneCycleLR's last step is T - 1 ...
    assert lrs[10] == lrs[11] == lrs[9]  # ... and it is held after that
    t = 5  # cosine anneal from the peak (step 2) to the end (step 9)
    assert lrs[t] == approx(final + (1.0 - final) * 0.5 * (1 + math.cos(math.pi * (t - 2) / 7)))
    assert moms[0] == approx(0.95) and moms[2] == approx(0.85) and moms[9] == approx(0.95)
    linear = curve(1, SCHEDULER="onecycle", ANNEAL_STRATEGY="linear")
    assert linear[1] == approx(initial + (1 - initial) / 2)
    assert curve(0, base=0.5, SCHEDULER="onecycle", MAX_LR=2.0)[0] == approx(2.0 / 25)


def test_cyclic_triangle_triangular2_exp_range_and_momentum():
    lrs = curve(8, SCHEDULER="cyclic", BASE_LR=0.1, STEP_SIZE_UP=2, STEP_SIZE_DOWN=3)
    assert lrs[:8] == approx([0.1, 0.55, 1.0, 0.7, 0.4, 0.1, 0.55, 1.0])
    assert curve(0, SCHEDULER="cyclic")[0] == approx(0.1)  # BASE_LR 0 = MAX_LR / 10
    tri2 = curve(7, SCHEDULER="cyclic", BASE_LR=0.1, STEP_SIZE_UP=2, STEP_SIZE_DOWN=3, CYCLIC_MODE="triangular2")
    assert tri2[2] == approx(1.0) and tri2[7] == approx(0.1 + 0.9 / 2)
    exp = curve(2, SCHEDULER="cyclic", BASE_LR=0.1, STEP_SIZE_UP=2, CYCLIC_MODE="exp_range", GAMMA=0.99)
    assert exp[2] == approx(0.1 + 0.9 * 0.99 ** 2)
    sched = optim.PhaseSchedule(make_cfg(SCHEDULER="cyclic", STEP_SIZE_UP=2, CYCLE_MOMENTUM=True), 1.0, 10)
    assert sched.momentum == approx(0.95)
    sched.step(), sched.step()
    assert sched.momentum == approx(0.85) and sched.lr == approx(1.0)


def test_reduce_on_plateau_after_patience_bad_metrics():
    keys = dict(SCHEDULER="reduce_on_plateau", PATIENCE=2, FACTOR=0.5, THRESHOLD=0.0, MIN_LR=0.2)
    lrs = curve(10, metrics=[1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], **keys)
    # step 1 sets the best; bad steps 2, 3, 4: the third bad one (> PATIENCE) halves the lr
    assert lrs[:5] == [1.0, 1.0, 1.0, 1.0, 0.5]
    assert lrs[5:8] == [0.5, 0.5, 0.5]  # 0.5 is an improvement; two bad steps follow
    assert lrs[8] == approx(0.25) and lrs[10] == approx(0.25)  # (MIN_LR 0.2 stops the next one at 0.2)
    assert curve(12, metrics=[1.0] * 12, **keys)[-1] == approx(0.2)
    maxed = curve(4, metrics=[1.0, 0.5, 0.5, 0.5], SCHEDULER="reduce_on_plateau", PLATEAU_MODE="max",
                  PATIENCE=1, FACTOR=0.5, THRESHOLD=0.0)
    assert maxed == [1.0, 1.0, 1.0, 0.5, 0.5]
    sched = optim.PhaseSchedule(make_cfg(**keys), 1.0, 10)
    with pytest.raises(ValueError, match="metric"):
        sched.step()


def test_lambda_linear_to_floor():
    lrs = curve(12, SCHEDULER="lambda", LR_FLOOR=0.1)
    assert lrs[:11] == approx([1.0 + (0.1 - 1.0) * t / 10 for t in range(11)])
    assert lrs[5] == approx(0.55) and lrs[12] == approx(0.1)


def test_scheduler_ignores_metric_and_base_lr_scales_the_curve():
    assert curve(4, base=0.5, metrics=[3.0] * 4, SCHEDULER="linear") == approx([0.5 * (10 - t) / 10 for t in range(5)])


def test_total_steps_resolution():
    assert optim.resolve_total_steps(make_cfg(NUM_TRAINING_STEPS=7, STEPS_PER_EPOCH=3), 100) == 7
    assert optim.resolve_total_steps(make_cfg(STEPS_PER_EPOCH=3, EPOCHS=2), 100) == 6
    assert optim.resolve_total_steps(make_cfg(), 100) == 100
    with pytest.raises(ValueError, match="NUM_TRAINING_STEPS"):
        optim.resolve_total_steps(make_cfg(), 0)


def test_make_phase_schedules_uses_each_phase_lr():
    cfg = make_cfg(LR_SFT=1e-4, LR_PPO=2e-5, SCHEDULER="constant")
    both = optim.make_phase_schedules(cfg, sft_steps=10, ppo_steps=5)
    assert both["sft"].lr == 1e-4 and both["ppo"].lr == 2e-5 and both["ppo"].total_steps == 5
    assert list(optim.make_phase_schedules(cfg, sft_steps=10, ppo_steps=0)) == ["sft"]


def test_apply_writes_lr_and_cycled_momentum_into_the_groups():
    cfg = make_cfg(SCHEDULER="onecycle", CYCLE_MOMENTUM=True)
    sched = optim.PhaseSchedule(cfg, 1e-3, 10)
    _, groups = tiny_groups(0.01)
    adam = ho.build_optimizer(groups, make_cfg(OPTIMIZER="adamw"), 1.0)
    assert sched.apply(adam.param_groups) == sched.lr
    assert all(g["lr"] == sched.lr and g["betas"] == (0.95, 0.999) for g in adam.param_groups)
    sgd = ho.build_optimizer(tiny_groups(0.01)[1], make_cfg(OPTIMIZER="sgd", MOMENTUM=0.9), 1.0)
    sched.apply(sgd.param_groups)
    assert all(g["momentum"] == 0.95 for g in sgd.param_groups)
    plain = optim.PhaseSchedule(make_cfg(SCHEDULER="onecycle", CYCLE_MOMENTUM=False), 1e-3, 10)
    assert plain.momentum is None
    plain.apply(sgd.param_groups)
    assert all(g["momentum"] == 0.95 for g in sgd.param_groups)  # untouched without CYCLE_MOMENTUM


# Settings that make each schedule do something over 10 steps.
RESUME = {
    "linear": dict(NUM_WARMUP_STEPS=2), "cosine": dict(WARMUP_RATIO=0.2),
    "cosine_with_restarts": dict(NUM_CYCLES=2, NUM_WARMUP_STEPS=1), "polynomial": dict(POLY_POWER=2.0, LR_FLOOR=0.1),
    "constant": {}, "constant_with_warmup": dict(NUM_WARMUP_STEPS=3), "inverse_sqrt": dict(NUM_WARMUP_STEPS=2),
    "step": dict(STEP_SIZE=2, GAMMA=0.5), "multistep": dict(MILESTONES=[3, 6]), "exponential": dict(GAMMA=0.8),
    "cosineannealing": dict(MIN_LR=0.01), "cosineannealing_warm_restarts": dict(T0=3, T_MULT=2),
    "onecycle": dict(CYCLE_MOMENTUM=True, THREE_PHASE=True), "cyclic": dict(STEP_SIZE_UP=2, CYCLE_MOMENTUM=True,
                                                                           CYCLIC_MODE="triangular2"),
    "reduce_on_plateau": dict(PATIENCE=1, FACTOR=0.5, COOLDOWN=1), "lambda": dict(LR_FLOOR=0.2), "none": {},
}
METRICS = [1.0, 0.9, 0.9, 0.9, 0.95, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]


def test_resume_settings_cover_every_scheduler():
    assert sorted(RESUME) == sorted(optim.scheduler_names())


@pytest.mark.parametrize("name", sorted(RESUME))
def test_state_dict_round_trip_continues_identically(name):
    cfg = make_cfg(SCHEDULER=name, **RESUME[name])

    def trace(sched, steps):
        out = []
        for t in steps:
            sched.step(METRICS[t])
            out.append((sched.lr, sched.momentum))
        return out

    whole = optim.PhaseSchedule(cfg, 1.0, 10)
    reference = trace(whole, range(13))
    first = optim.PhaseSchedule(cfg, 1.0, 10)
    head = trace(first, range(5))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = optim.PhaseSchedule(cfg, 1.0, 10)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.steps_done == 5
    assert head + trace(resumed, range(5, 13)) == reference
    assert len(set(reference)) > 1 or name in ("constant", "none")


def test_load_state_dict_refuses_a_different_schedule():
    saved = optim.PhaseSchedule(make_cfg(SCHEDULER="linear"), 1e-4, 10).state_dict()
    with pytest.raises(ValueError, match="base_lr"):
        optim.PhaseSchedule(make_cfg(SCHEDULER="linear"), 2e-4, 10).load_state_dict(saved)
    with pytest.raises(ValueError, match="name"):
        optim.PhaseSchedule(make_cfg(SCHEDULER="cosine"), 1e-4, 10).load_state_dict(saved)


def test_unknown_scheduler_lists_the_valid_names():
    (msg,) = problems_of(SCHEDULER="cosine_annealing")
    assert "SCHEDULER" in msg and "Did you mean 'cosineannealing'?" in msg
    assert all(n in msg for n in optim.scheduler_names())
    with pytest.raises(ValueError, match="Valid: linear, cosine"):
        optim.PhaseSchedule(make_cfg(), 1e-4, 10, name_override="warmup_linear")


@pytest.mark.parametrize("keys, fragment", [
    (dict(SCHEDULER="multistep"), "needs MILESTONES"),
    (dict(SCHEDULER="multistep", MILESTONES=[20], NUM_TRAINING_STEPS=10), "beyond the 10 steps"),
    (dict(SCHEDULER="cosine_with_restarts"), "whole number"),
    (dict(SCHEDULER="step", NUM_WARMUP_STEPS=10), "has no warm-up"),
    (dict(SCHEDULER="constant", WARMUP_RATIO=0.1), "constant_with_warmup"),
    (dict(SCHEDULER="linear", NUM_WARMUP_STEPS=5, WARMUP_RATIO=0.1), "set one of them"),
    (dict(SCHEDULER="linear", NUM_WARMUP_STEPS=50, NUM_TRAINING_STEPS=10), "exceed"),
    (dict(SCHEDULER="exponential", GAMMA=0.0), "GAMMA=0.0"),
    (dict(SCHEDULER="polynomial", LR_FLOOR=1e-3), "LR_FLOOR"),
    (dict(SCHEDULER="reduce_on_plateau", MIN_LR=1.0), "never be reduced"),
    (dict(SCHEDULER="cosineannealing", MIN_LR=1.0), "would rise"),
    (dict(SCHEDULER="onecycle", PCT_START=0.1, NUM_TRAINING_STEPS=10), "zero steps"),
    (dict(SCHEDULER="onecycle", CYCLE_MOMENTUM=True, BASE_MOMENTUM=0.99), "exceeds MAX_MOMENTUM"),
    (dict(SCHEDULER="cyclic", BASE_LR=1.0, MAX_LR=0.5), "must be below the peak"),
    (dict(SCHEDULER="cyclic", BASE_LR=1e-3), "must be below the peak"),  # BASE_LR above LR_SFT/LR_PPO
    (dict(SCHEDULER="cyclic", CYCLIC_MODE="exp_range", GAMMA=0.5), "close to 1"),
])
def test_scheduler_settings_that_make_no_sense_are_reported(keys, fragment):
    problems = problems_of(**keys)
    assert any(fragment in p for p in problems), problems


def test_default_config_and_every_scheduler_default_validate_cleanly():
    assert problems_of() == []
    for name, keys in RESUME.items():  # (LR_FLOOR/MIN_LR there are set for a base lr of 1.0)
        assert problems_of(SCHEDULER=name, LR_SFT=1.0, LR_PPO=1.0, **keys) == [], name


def test_schedule_construction_checks_the_derived_total():
    with pytest.raises(ValueError, match="warm-up steps exceed"):
        optim.PhaseSchedule(make_cfg(SCHEDULER="linear", NUM_WARMUP_STEPS=20), 1.0, 10)
    with pytest.raises(ValueError, match="zero steps"):
        optim.PhaseSchedule(make_cfg(SCHEDULER="onecycle", PCT_START=0.5), 1.0, 2)
    with pytest.raises(ValueError, match="whole number"):  # the key checks run here too
        optim.PhaseSchedule(make_cfg(), 1.0, 10, name_override="cosine_with_restarts")


# --------------------------------------------------------------------------------------
# docs


def test_committed_docs_match_the_tables():
    assert (ROOT / "docs" / "optim.md").read_text() == optim.optim_reference_markdown()


def test_a_schedule_that_cannot_be_built_names_its_phase_and_exits_2(tmp_path, capsys):
    """More warm-up steps than the SFT phase has: exit 2, one problem naming the phase and its steps."""
    from hybrid_ds.train import main

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"MODE": "sft", "MODEL": "builtin:tiny-gpt2", "TRAIN_FILE": "builtin:demo-tasks",
                               "OUTPUT_DIR": str(tmp_path / "o"), "MAX_STEPS": 3, "MAXSEQ": 128,
                               "SCHEDULER": "constant_with_warmup", "NUM_WARMUP_STEPS": 20}))
    with pytest.raises(SystemExit) as e:
        main([str(cfg), "--dry-run"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    assert "SFT phase (3 optimizer steps): cannot build the constant_with_warmup schedule" in err, err
