"""Rewrite passes. Importing this package registers every pass family."""

from tfcompile.passes import (  # noqa: F401  (registration)
    attention_sparsity, cleanup, ffn, norm, padding, qkv_merge, tome, token_pruning,
)
from tfcompile.passes.base import (  # noqa: F401
    Exactness,
    Pass,
    PassOutcome,
    PassRefused,
    PassResult,
    Stage,
    all_passes,
    apply_pass,
    check_pipeline,
    get_pass,
    pass_order,
    register_pass,
)
from tfcompile.passes.context import PassContext, Workload, default_context  # noqa: F401
