"""The micro-benchmarks' models: each a tiny torch module with the kernel mix of one part of a transformer.

``calibrate.default_suite`` (ORT and TVM on a CPU) and ``calibrate_device.device_suite`` (the torch device
backend) build them at their shapes, trace them and time them on the backend being calibrated.
"""

from __future__ import annotations

import torch


def seeded_randn(*shape: int) -> torch.Tensor:
    """A micro-benchmark's input: the same values on every build and every host."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


class Linear(torch.nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.fc = torch.nn.Linear(k, n)

    def forward(self, x):
        return self.fc(x)


class Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


class CausalAttention(torch.nn.Module):
    """Attention under an additive causal mask held as a constant [1, 1, S, S], as the zoo's decoders pass
    it to SDPA once cleanup has folded its construction (``is_causal`` would be lowered by the exporter
    into ops that the traced graph, and so the cost model, never sees)."""

    def __init__(self, seq: int):
        super().__init__()
        hidden = ~torch.ones(seq, seq, dtype=torch.bool).tril()
        self.register_buffer("mask", torch.zeros(seq, seq).masked_fill(hidden, float("-inf"))[None, None])

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


class BooleanMaskAttention(torch.nn.Module):
    """Attention under a boolean causal mask [1, 1, S, S], as Hugging Face's Llama passes it to SDPA: ORT runs
    it with an Add, an IsNaN and a Where over the scores besides the softmax (``op_costs.unfused_score_bytes``)."""

    def __init__(self, seq: int):
        super().__init__()
        self.register_buffer("mask", torch.ones(seq, seq, dtype=torch.bool).tril()[None, None])

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


class BandMaskAttention(torch.nn.Module):
    """Attention under a boolean band |i - j| <= ``half_window``, as a local-attention variant at short length
    passes it: most scores hidden."""

    def __init__(self, seq: int, half_window: int):
        super().__init__()
        positions = torch.arange(seq)
        self.register_buffer("mask", ((positions[:, None] - positions[None, :]).abs() <= half_window)[None, None])

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


class OpenMaskAttention(torch.nn.Module):
    """Attention under an additive mask of zeros: the mask's Add, no score hidden."""

    def __init__(self, seq: int):
        super().__init__()
        self.register_buffer("mask", torch.zeros(1, 1, seq, seq))

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


class LayerNorm(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x)


class ResidualLayerNorm(torch.nn.Module):
    """A residual add read only by a LayerNorm: ORT's SkipLayerNormalization, as in a post-norm layer."""

    def __init__(self, d: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, x, residual):
        return self.norm(x + residual)


class MergeScatter(torch.nn.Module):
    """Token merging's group sums: ``values`` rows added into ``keep`` slots, one index per element."""

    def __init__(self, keep: int, width: int):
        super().__init__()
        self.keep = keep
        self.register_buffer("columns", torch.arange(width).unsqueeze(0))

    def forward(self, values, slot):
        summed = values.new_zeros(self.keep, values.shape[1])
        return summed.index_put([slot.view(-1, 1), self.columns], values, accumulate=True)


class ScoreImportance(torch.nn.Module):
    """Attention written out, with the probabilities summed over heads and queries (token merging's)."""

    def forward(self, q, k, v):
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
        return torch.matmul(probs, v), probs.sum(dim=(1, 2))


class Softmax(torch.nn.Module):
    def forward(self, x):
        return torch.softmax(x, dim=-1)


class Gelu(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.gelu(x)


class AddChain(torch.nn.Module):
    """``length`` dependent mul-add-relu steps: on a tiny tensor, per-kernel overhead; on a medium one
    (a layer's activations), elementwise memory traffic."""

    def __init__(self, length):
        super().__init__()
        self.length = length

    def forward(self, x, y):
        for _ in range(self.length):
            x = x * y + y  # a mul and an add per step; backends may fuse them
            x = torch.relu(x)
        return x


class _Block(torch.nn.Module):
    """A generic Pre-LN encoder block: the kernel mix of a transformer layer at a given width."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)
        self.norm2 = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, 4 * width)
        self.down = torch.nn.Linear(4 * width, width)

    def forward(self, x):
        batch, seq, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, seq, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, seq, width))
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))


class Stack(torch.nn.Module):
    def __init__(self, width: int, heads: int, depth: int):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(_Block(width, heads) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class Norm(torch.nn.Module):
    def __init__(self, width: int, rms: bool):
        super().__init__()
        self.norm = torch.nn.RMSNorm(width) if rms else torch.nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(x)


class Add(torch.nn.Module):
    def forward(self, x, y):
        return x + y


class TinyChain(torch.nn.Module):
    """``length`` dependent mul/add/relu steps on 16 numbers: the per-kernel launch floor (halving keeps
    rounding errors from growing along the chain, so bf16 passes the output check)."""

    def __init__(self, length: int):
        super().__init__()
        self.length = length

    def forward(self, x, y):
        for _ in range(self.length):
            x = torch.relu(x * 0.5 + y)
        return x


class ViewChain(torch.nn.Module):
    """``length`` unsqueeze/transpose/squeeze steps, then one add: eager torch dispatches every view
    (``fusion.group_kernels`` counts them as ``view`` kernels), which these isolate from launches."""

    def __init__(self, length: int):
        super().__init__()
        self.length = length

    def forward(self, x, y):
        for _ in range(self.length):
            x = x.unsqueeze(0).transpose(1, 2).squeeze(0)
        return x + y
