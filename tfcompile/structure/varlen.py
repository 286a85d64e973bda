"""Variable-length attention over packed tokens, as one torch op a graph can hold.

``tfcompile::varlen_attention(q, k, v, offsets, max_len, causal, scale)``
attends each sequence of a packed batch to its own keys only. ``q``, ``k``,
``v`` are ``[T, heads, dim]`` (the T valid tokens of B sequences, in order);
``offsets`` is ``[B + 1]`` int64, sequence b's tokens being
``offsets[b]:offsets[b + 1]``; ``max_len`` bounds every sequence's length;
``causal`` keeps each query to keys no later than itself in its own sequence.

Why an op of its own: the alternatives a graph can hold are a loop of one
attention per sequence (or per run of equal lengths), which on a GPU pays a
kernel launch per sequence (8.4 µs eager on an H100, devices.md §3) and leaves
the GPU idle on short sequences, or one attention over all T tokens with a
block-diagonal mask, which computes T² scores where the sequences need Σ l².
Variable-length kernels do neither: one launch, Σ l² work.

- On CUDA: FlashAttention's varlen form (``aten._flash_attention_forward``
  with cumulative sequence lengths) for fp16/bf16, the memory-efficient
  kernel's varlen form (``aten._efficient_attention_forward``) for fp32; the
  kernels torch's jagged nested tensors call, without the nested tensor
  (which refuses ``is_causal``). Neither reads ``offsets`` on the host, so the
  op can be captured in a CUDA graph.
- Elsewhere: one SDPA per sequence, a reference for tests and CPU runs.

``backends.onnx_translations`` writes the op as attention over the T tokens
with the block-diagonal mask rebuilt from ``offsets``: the same arithmetic,
which every ONNX runtime can run.
"""

from __future__ import annotations

import torch

OP_NAME = "tfcompile::varlen_attention"
FLASH_DTYPES = (torch.float16, torch.bfloat16)
# Node meta key: the Σ l² a varlen_attention node is priced at (its shapes show only T = Σ l).
SUM_SQ_LENGTHS = "sum_sq_lengths"


@torch.library.custom_op(OP_NAME, mutates_args=())
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, max_len: int,
                     causal: bool, scale: float) -> torch.Tensor:
    if q.is_cuda:  # pragma: no cover - needs a GPU (benchmarks/gpu_check.py)
        return _cuda_varlen(q, k, v, offsets, max_len, causal, scale)
    pieces = []
    bounds = offsets.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        heads = [t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]  # [1, H, l, D]
        out = torch.nn.functional.scaled_dot_product_attention(*heads, is_causal=causal, scale=scale)
        pieces.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(pieces).contiguous() if pieces else torch.empty_like(q)


@varlen_attention.register_fake
def _(q, k, v, offsets, max_len, causal, scale):
    return torch.empty_like(q)


VARLEN_ATTENTION = torch.ops.tfcompile.varlen_attention.default


def _cuda_varlen(q, k, v, offsets, max_len, causal, scale):  # pragma: no cover - needs a GPU
    offsets = offsets.to(torch.int32)
    q, k, v = (t.contiguous() for t in (q, k, v))  # the kernels read the head dimension with stride 1
    if q.dtype in FLASH_DTYPES and q.shape[-1] <= 256:
        return torch.ops.aten._flash_attention_forward(q, k, v, offsets, offsets, max_len, max_len, 0.0, causal,
                                                       False, scale=scale)[0]
    # The memory-efficient kernel takes [1, T, heads, dim]; mask type 1 is causal from the top left.
    out = torch.ops.aten._efficient_attention_forward(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), None,
                                                      offsets, offsets, max_len, max_len, 0.0, int(causal),
                                                      False, scale=scale)[0]
    return out.squeeze(0)

