"""Optimizer and learning-rate schedule factories (every name in docs/optim.md)."""

from hybrid_ds.optim.core import (  # noqa: F401
    OptimSpec,
    optimizer_names,
    optimizer_spec,
    offload_device,
    deepspeed_optimizer_settings,
    optimizer_problems,
    validate_optim_config,
    SchedSpec,
    SCHEDULER_ALIASES,
    scheduler_names,
    scheduler_spec,
    scheduler_problems,
    build_optimizer,
    resolve_total_steps,
    set_optimizer_hparams,
    PhaseSchedule,
    make_phase_schedules,
    optim_reference_markdown,
)
