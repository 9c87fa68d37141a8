"""Optimizers and learning-rate schedules: every OPTIMIZER and SCHEDULER name (docs/optim.md),
their validation, and the factories the run builds from them."""

from hybrid_ds.optim.hparams import set_optimizer_hparams  # noqa: F401
from hybrid_ds.optim.optimizers import (  # noqa: F401
    OptimSpec,
    build_optimizer,
    deepspeed_optimizer_settings,
    offload_device,
    optimizer_names,
    optimizer_problems,
    optimizer_spec,
    validate_optim_config,
)
from hybrid_ds.optim.reference import optim_reference_markdown  # noqa: F401
from hybrid_ds.optim.schedulers import (  # noqa: F401
    SCHEDULER_ALIASES,
    PhaseSchedule,
    SchedSpec,
    make_phase_schedules,
    resolve_total_steps,
    schedule_warnings,
    scheduler_names,
    scheduler_problems,
    scheduler_spec,
)
