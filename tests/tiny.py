"""Tiny versions of the zoo architectures, for fast tests.

Each keeps its architecture (GPT-2's fused c_attn and Conv1D, BERT's Post-LN,
ViT's patch embedding, Llama's RMSNorm/RoPE/GQA/SwiGLU) at a size that traces
and exports in seconds. minilm is loaded at its real size: it is the real
trained model and is small (22M parameters).
"""

from __future__ import annotations

import torch

from tfcompile.frontend import LoadOptions, load_model, zoo
from tfcompile.graph import ModelGraph, export_module

# The zoo's architectures at test size (``zoo.TINY_CONFIGS``); minilm is loaded at its real size.
TINY_OVERRIDES = {**zoo.TINY_CONFIGS, "minilm": None}

ARCHITECTURES = list(TINY_OVERRIDES)


def load_tiny(name: str, *, batch: int = 2, seq: int = 16, seed: int = 0) -> ModelGraph:
    return load_model(name, LoadOptions(batch=batch, seq=seq, seed=seed, config_overrides=TINY_OVERRIDES[name]))


def tiny_module(name: str, seed: int = 0) -> torch.nn.Module:
    return zoo.build(name, seed=seed, config_overrides=TINY_OVERRIDES[name])


class _LlamaWithMask(torch.nn.Module):
    """Tiny Llama with its attention mask as an input: causal attention, RoPE and grouped-query heads."""

    def __init__(self):
        super().__init__()
        self.model = tiny_module("llama-tiny").model

    def forward(self, input_ids, attention_mask):
        return (self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits,)


def llama_with_mask(batch: int, seq: int) -> ModelGraph:
    ids = torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(0))
    return export_module(_LlamaWithMask(), (ids, torch.ones_like(ids)), name="llama-mask",
                         input_names=["input_ids", "attention_mask"])


# Factories for `tfcompile optimize tests.tiny:NAME` in CLI tests.
def gpt2():
    return tiny_module("gpt2-small"), (torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0)),)


def bert():
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    return tiny_module("bert-base"), (ids, torch.ones_like(ids))


class LowRankFfnBlock(torch.nn.Module):
    """A residual FFN block trained structured: both projections are low-rank pairs."""

    input_names = ["x"]

    def __init__(self, d: int = 256, hidden: int = 1024, rank: int = 64):
        super().__init__()
        self.up = torch.nn.Sequential(torch.nn.Linear(d, rank, bias=False), torch.nn.Linear(rank, hidden))
        self.down = torch.nn.Sequential(torch.nn.Linear(hidden, rank, bias=False), torch.nn.Linear(rank, d))

    def forward(self, x):
        return (x + self.down(torch.nn.functional.gelu(self.up(x))),)


def lowrank_ffn():
    """Factory for `tfcompile optimize tests.tiny:lowrank_ffn --input-shape x=BxTxD:float32`."""
    torch.manual_seed(0)
    return LowRankFfnBlock()


class MeanPooledBert(torch.nn.Module):
    """Tiny BERT with masked mean pooling: a sentence encoder shaped like minilm, at test size."""

    input_names = ["input_ids", "attention_mask"]

    def __init__(self):
        super().__init__()
        self.model = tiny_module("bert-base").model  # `model.config` gives the loader the vocabulary size

    def forward(self, input_ids, attention_mask):
        states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).float()
        return ((states * weights).sum(1) / weights.sum(1),)


def mean_pooled_bert():
    """Factory for `tfcompile optimize tests.tiny:mean_pooled_bert --batch B --seq T` (inputs from the options)."""
    return MeanPooledBert()
