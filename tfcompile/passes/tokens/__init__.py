"""Token passes: drop (``prune_tokens``, Zero-TPrune) or merge (``merge_tokens``, ToMe) tokens after chosen layers.

``cut`` plans the cuts both passes make and ``cut_rewrite`` makes them;
``importance`` ranks tokens for pruning and ``merging`` carries the token sizes
when tokens merge. Importing this package registers both passes.
"""

from tfcompile.passes.tokens import merge, prune  # noqa: F401  (registration)
