"""Rewrite passes. Importing this package registers every pass family."""

from tfcompile.passes import (  # noqa: F401  (registration)
    attention_sparsity, cleanup, ffn, norm, padding, qkv_merge, tome, token_pruning,
)
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
