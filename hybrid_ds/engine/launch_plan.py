"""What a launch asks for, decided before any process group exists: the DeepSpeed stage and mixed
precision (from the config, `accelerate launch`'s environment, or the `deepspeed` launcher), and the
DeepSpeed config with its "auto" values filled from the run config. `dist.init_dist` builds on it;
`run/preflight.py` checks a launch with it before anything starts.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from hybrid_ds.config import Config, resolve_ds_config

_LAUNCHED_BY_DEEPSPEED = "DS_LAUNCHER" in os.environ or "DEEPSPEED_LAUNCHER" in os.environ


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


# --------------------------------------------------------------------------------------
# launch settings


@dataclass
class LaunchPlan:
    """What the launcher and config ask for, decided before any process group exists."""

    zero_stage: int  # 0 = no DeepSpeed
    mixed_precision: str  # "no" | "bf16" | "fp16"
    ds_template: Optional[dict]  # DeepSpeed config before our values are filled in
    source: str  # where the DeepSpeed decision came from, for the log

    @property
    def offloads(self) -> bool:
        """Whether ZeRO moves optimizer states or parameters off the compute device (CPU or NVMe)."""
        zero = (self.ds_template or {}).get("zero_optimization", {})
        return any(str((zero.get(f"offload_{k}") or {}).get("device", "none")) != "none"
                   for k in ("optimizer", "param"))

    def single_process_note(self, world: int) -> str:
        """For a run on one process under ZeRO without offload, which partitions nothing: that plain
        ``python -m hybrid_ds.train`` (no DeepSpeed) trains the same model faster; else empty."""
        if world != 1 or self.zero_stage == 0 or self.offloads:
            return ""
        return (f"note: ZeRO stage {self.zero_stage} on one process partitions nothing and costs a DeepSpeed step; "
                f"`python -m hybrid_ds.train CONFIG` runs without DeepSpeed (1.0-1.3x faster in bench/README.md's CPU matrix)")


def plan_launch(cfg: Config) -> LaunchPlan:
    """Combine the config with what ``accelerate launch`` / ``deepspeed`` exported in the environment."""
    template, source = None, "config"
    path = cfg.run.ds_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if path and path != "none":
        # launch/*.yaml name ds_configs/*.json relative to the repository: found from any directory
        path = resolve_ds_config(path) or path
        with open(path) as f:
            template = json.load(f)
        source = path
    stage = cfg.run.zero_stage
    if stage < 0:
        if template is not None:
            stage = int(template.get("zero_optimization", {}).get("stage", 0))
        elif _env_flag("ACCELERATE_USE_DEEPSPEED"):
            stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
            source = "accelerate config"
        elif _LAUNCHED_BY_DEEPSPEED or "LOCAL_RANK" in os.environ and _deepspeed_launcher_args():
            stage, source = 2, "deepspeed launcher"
        else:
            stage, source = 0, "no DeepSpeed (plain torch)"
    precision = "bf16" if cfg.run.bf16 else "fp16" if cfg.run.fp16 else "no"
    if precision == "no":
        if template is not None:
            for p in ("bf16", "fp16"):
                if template.get(p, {}).get("enabled") is True:
                    precision = p
        env = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if precision == "no" and env in ("bf16", "fp16"):
            precision = env
    if stage > 0 and template is None:
        template = default_ds_config(stage)
        if _env_flag("ACCELERATE_USE_DEEPSPEED"):
            for kind in ("optimizer", "param"):
                dev = os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{kind.upper()}_DEVICE", "none")
                if dev != "none":
                    template["zero_optimization"][f"offload_{kind}"] = {"device": dev}
    return LaunchPlan(stage, precision, template, source)


def _deepspeed_launcher_args() -> bool:
    import sys
    return any(a.startswith("--local_rank") for a in sys.argv)


def default_ds_config(stage: int) -> dict:
    """A DeepSpeed config for ``stage`` whose batch/precision values are filled by :func:`fill_ds_config`."""
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
                            "reduce_bucket_size": "auto"}
    if stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": True, "stage3_param_persistence_threshold": 0,
                     "stage3_prefetch_bucket_size": "auto"})
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": zero,
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "steps_per_print": 10**9,
            "wall_clock_breakdown": False}


def fill_ds_config(template: dict, *, stage: int, micro: int, accum: int, world: int, clip: float,
                   precision: str, hidden_size: Optional[int] = None) -> dict:
    """Replace "auto" (and set what hybrid_ds owns) in a DeepSpeed config.

    Bucket sizes follow the model as transformers' DeepSpeed integration sizes them (hidden^2 for
    the gradient-reduce bucket, 0.9 hidden^2 for the ZeRO-3 prefetch): DeepSpeed's own default,
    5e8 elements, reserves a 2 GB fp32 buffer per rank whatever the model (larger gradients
    bypass the bucket). The reduce bucket holds at least 5e6 elements (20 MB in fp32): below that
    a small model's step pays a flatten and a collective per handful of tensors (measured on the
    benchmark work unit's 4.3 M-parameter model, bench/README.md). Without ``hidden_size`` an "auto" falls back to DeepSpeed's default."""
    ds = {k: v for k, v in copy.deepcopy(template).items() if not k.startswith("_")}  # drop _comment
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = micro * accum * world
    ds["gradient_clipping"] = clip
    ds.setdefault("zero_optimization", {})["stage"] = stage
    if stage == 3:
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    fp16 = {k: v for k, v in ds.get("fp16", {}).items() if v != "auto"}
    ds["fp16"] = {"initial_scale_power": 16, **fp16, "enabled": precision == "fp16"}
    ds.pop("optimizer", None)  # hybrid_ds builds the optimizer (hybrid_ds/optim/) and owns the lr schedule
    ds.pop("scheduler", None)
    ds.setdefault("steps_per_print", 10**9)
    sized = {"reduce_bucket_size": (1.0, 5_000_000), "stage3_prefetch_bucket_size": (0.9, 0)}
    for k, v in list(ds.get("zero_optimization", {}).items()):
        if v == "auto":
            if k in sized and hidden_size:
                scale, floor = sized[k]
                ds["zero_optimization"][k] = max(int(scale * hidden_size * hidden_size), floor)
            else:
                ds["zero_optimization"].pop(k)
    return ds


def hidden_size_of(model: str) -> Optional[int]:
    """The model's hidden size from its config (sizes DeepSpeed's buckets), None if unreadable."""
    try:
        from transformers import AutoConfig

        from hybrid_ds.assets import resolve_model

        return int(AutoConfig.from_pretrained(resolve_model(model)).hidden_size)
    except Exception:  # a bucket size is an optimisation: DeepSpeed's default still works
        return None
