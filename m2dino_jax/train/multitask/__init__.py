"""M2DINO multi-task trainer: `trainer` (paradigms, the run of one model), `steps` (one compiled program per
task type), `eval` (official metrics in original pixels)."""

from m2dino_jax.train.multitask.trainer import (  # noqa: F401
    PARADIGMS,
    _Run,
    _total_steps,
    moe_enabled,
    parse_groups,
    plan_models,
    print_table,
    resolve_config,
    train_and_evaluate,
)
