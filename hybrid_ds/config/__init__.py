"""The run's typed configuration: the schema (one dataclass field per key), reading JSON and
``KEY=VALUE`` overrides, validation of the config on its own, batch arithmetic, the docs generator.

Loading *and* every cross-layer check (optimizer, rewards, placement, resume) is
:func:`hybrid_ds.run.preflight.load_config`.
"""

from hybrid_ds.config.checks import batch_problems, file_problems, model_problem, validate  # noqa: F401
from hybrid_ds.config.load import build_config, parse_override, read_config_file, resolve_ds_config  # noqa: F401
from hybrid_ds.config.reference import config_reference_markdown  # noqa: F401
from hybrid_ds.config.schema import (  # noqa: F401
    ALIASES,
    REWARD_KEY,
    SECTIONS,
    Config,
    ConfigError,
    DataConfig,
    GenConfig,
    HybridConfig,
    OptimConfig,
    PPOConfig,
    RunConfig,
    SchedConfig,
    SFTConfig,
    key_table,
)
