"""Rewrite passes. Importing this package registers every pass family."""

from tfcompile.passes import attention_sparsity, cleanup, ffn, norm, padding, qkv_merge, token_pruning  # noqa: F401  (registration)
from tfcompile.passes.base import (  # noqa: F401
    Exactness,
    Pass,
    PassOutcome,
    PassResult,
    all_passes,
    apply_pass,
    get_pass,
    register_pass,
)
