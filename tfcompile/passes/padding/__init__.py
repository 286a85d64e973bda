"""Padding removal (ByteTransformer) and prepacking (Prepacking) for right-padded batches.

Two passes specialise a model that runs a right-padded [B, L] batch to the
batch's lengths (``context.workload.lengths``, else the example attention
mask; ``with_lengths`` builds padded example inputs for given lengths):
``remove_padding`` computes only the valid tokens on one packed [T] axis,
``prepack`` bin-packs the sequences into dense [rows, capacity] rows.
``remove_padding_runtime`` reads the valid tokens from the attention mask at
run time instead, so one graph serves any right-padded [B, L] batch
(``runtime``; the lengths only price it); ``remove_padding_varlen`` is that
form with one variable-length attention kernel per layer where the runtime
has one (``varlen``: torch on a GPU).

- ``geometry``: where each valid token goes (the lengths are baked in: static
  shapes, valid only for inputs with exactly those lengths);
- ``batch``: the lengths and each attention's pattern within a sequence;
- ``layout``, ``token_rules``: the plan, one token-wise rule per op, or a
  refusal naming the op that would mix tokens;
- ``packer``: the rewrite that follows the plan;
- ``remove``, ``prepack``, ``runtime``, ``varlen``: the four passes (registered on import).

Shared preconditions (each refusal names the node and the reason): an integer
[B, L] token input; masks, if any, of shape [B, L], 0/1, right padded (ones
then zeros) and equal to the lengths; no op other than attention mixes tokens;
every attention is self-attention whose mask lets each valid query see
exactly the valid keys of its own sequence, all of them or those up to itself.
Empty rows (length 0) and lengths above L are user errors (``ShapeError``).
The attention mask input stays in the signature but is no longer read by
attention.
"""

from tfcompile.passes.padding.geometry import Geometry, with_lengths
from tfcompile.passes.padding.prepack import Prepacked, prepack
from tfcompile.passes.padding.remove import RemovedPadding, remove_padding
from tfcompile.passes.padding.runtime import RuntimePadding, remove_padding_runtime
from tfcompile.passes.padding.varlen import VarlenPadding, remove_padding_varlen

__all__ = ["Geometry", "Prepacked", "RemovedPadding", "RuntimePadding", "prepack", "remove_padding",
           "remove_padding_runtime", "remove_padding_varlen", "VarlenPadding", "with_lengths"]
