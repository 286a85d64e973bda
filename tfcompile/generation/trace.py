"""Prefill and decode-step graphs of a Hugging Face causal LM, with the KV cache as explicit tensors.

torch.export cannot return a transformers ``DynamicCache`` (it is not a
pytree; see the architecture's pitfalls), so two wrapper modules take and
return plain tensors and build a cache object from them inside ``forward``:

- **prefill** ``(input_ids [B, P], attention_mask [B, P])`` ->
  ``(logits [B, V], present_key_0, present_value_0, ..., present_key_{L-1}, present_value_{L-1})``:
  the logits of the last prompt position and the cache, one key and one value
  tensor per layer, each ``[B, H_kv, max_len, D]`` with positions ``>= P`` zero.
- **decode step** ``(input_ids [B, 1], position_ids [B, 1], write_index [1],
  attention_mask [B, max_len], past_key_0, past_value_0, ...)`` ->
  ``(logits [B, V], present_key_0, present_value_0, ...)``: the new token's key
  and value are written at cache slot ``write_index`` (out of place, one
  ``scatter`` per cache tensor), and the token attends to every slot whose mask is 1.

**Static cache** (fixed ``max_len``, pre-allocated, written by index): every
input and output of both graphs has a fixed shape, so the decode graph is
exported once, ONNX Runtime buffers can be bound once and swapped between
steps (ping-pong), and TVM/ORT see no symbolic dimension. The price: each step
attends over all ``max_len`` slots (the unused ones masked), so choose
``max_len = prompt + new tokens`` and not a model's whole context. Per-layer
tensors rather than one stacked tensor, because a stacked cache would be
re-concatenated (a full copy) every step, and per-layer inputs/outputs are the
layout ONNX decoders use (``past_key_values.N.key``).

The mask is the runner's: ``attention_mask`` is 1 for every slot that holds a
real token (left padding stays 0), and the runner sets the slot being written
to 1 before the step. Position ids are the runner's too (count of real tokens
before this one), which is what Hugging Face ``generate`` uses with left padding.
In the prefill a padded query row attends to itself only, so no row is all
masked (an all-masked SDPA row is NaN, and a NaN key in the cache would poison
later steps even where masked).
"""

from __future__ import annotations

import dataclasses

import torch

from tfcompile.errors import ShapeError
from tfcompile.frontend.limits import check_fits_in_memory
from tfcompile.graph import ModelGraph, export_module


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """The static cache's shape: ``layers`` key and value tensors of ``[batch, kv_heads, max_len, head_dim]``."""

    layers: int
    batch: int
    kv_heads: int
    max_len: int
    head_dim: int
    dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.kv_heads, self.max_len, self.head_dim)

    def zeros(self) -> list[torch.Tensor]:
        return [torch.zeros(self.shape, dtype=self.dtype) for _ in range(2 * self.layers)]

    @property
    def bytes(self) -> int:
        """Bytes of the whole cache (keys and values of every layer)."""
        return 2 * self.layers * self.batch * self.kv_heads * self.max_len * self.head_dim * \
            torch.empty((), dtype=self.dtype).element_size()

    def names(self, prefix: str) -> list[str]:
        return [f"{prefix}_{kind}_{i}" for i in range(self.layers) for kind in ("key", "value")]


@dataclasses.dataclass
class GenerationGraphs:
    prefill: ModelGraph
    decode: ModelGraph
    cache: CacheSpec
    prompt_len: int


def cache_spec(model: torch.nn.Module, *, batch: int, max_len: int) -> CacheSpec:
    """The static cache of a transformers causal LM at ``batch`` and ``max_len``."""
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is not None and max_len > positions:
        raise ShapeError(f"a cache of {max_len} positions (prompt + new tokens - 1) exceeds the model's {positions} "
                         "positions; lower --prompt-len or --new-tokens")
    dtype = next(model.parameters()).dtype
    spec = CacheSpec(layers, batch, kv_heads, max_len, head_dim, dtype)
    # The prefill writes one cache, and a decode step reads one and writes another: three before anything runs.
    check_fits_in_memory(3 * spec.bytes, f"a KV cache of {layers} layers x batch {batch} x {max_len} positions",
                         "lower --batch, --prompt-len or --new-tokens")
    return spec


def _cache_class():
    from transformers.cache_utils import Cache, CacheLayerMixin

    class TensorCacheLayer(CacheLayerMixin):
        """One layer's cache over given tensors; ``update`` is out-of-place, so the graph stays functional."""

        is_compileable = True
        is_sliding = False

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, write_index: torch.Tensor | None):
            super().__init__()
            self.keys, self.values, self.write_index = keys, values, write_index
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:  # tensors are given, never lazy
            return None

        def update(self, key_states, value_states, *args, **kwargs):
            if self.write_index is None:  # prefill: slots [0, P) take the prompt; attend over the prompt only
                self.keys = _pad_to(key_states, self.keys.shape[2])
                self.values = _pad_to(value_states, self.values.shape[2])
                return key_states, value_states
            self.keys = self.keys.scatter(2, _slot_index(self.write_index, key_states), key_states)
            self.values = self.values.scatter(2, _slot_index(self.write_index, value_states), value_states)
            return self.keys, self.values

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.keys.shape[2], 0

        def get_seq_length(self) -> int:
            return 0  # position ids are always given, so this is never used to make positions

        def get_max_length(self) -> int:
            return self.keys.shape[2]

    def build(tensors, write_index):
        layers = [TensorCacheLayer(tensors[2 * i], tensors[2 * i + 1], write_index)
                  for i in range(len(tensors) // 2)]
        return Cache(layers=layers)

    return build


def _slot_index(write_index: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """Scatter indices that put ``states`` ``[B, H, 1, D]`` at cache slot ``write_index`` along the slot axis.

    The step writes its key and value with ``scatter`` (ONNX ScatterElements:
    a copy of the cache, then the new row written in place). ``index_copy``
    exports as Transpose, ScatterND, Transpose (three copies of the cache per
    tensor) and ``where(slot, new, cache)`` as a broadcasting Where; on ORT
    CPU, 24 gpt2-small cache updates took 1.4 ms as ScatterElements against
    6.5 ms as index_copy and 7.0 ms as Where (measured in one process)."""
    return write_index.reshape(1, 1, 1, 1).expand(states.shape)


def _pad_to(states: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(states, (0, 0, 0, length - states.shape[2]))


def cache_tensors(cache) -> tuple[torch.Tensor, ...]:
    """Key and value of every layer of a transformers ``Cache``: ``key_0, value_0, key_1, ...``."""
    return tuple(t for layer in cache.layers for t in (layer.keys, layer.values))


class PrefillStep(torch.nn.Module):
    """``(input_ids, attention_mask) -> (last logits, present_key_0, present_value_0, ...)``."""

    def __init__(self, model: torch.nn.Module, spec: CacheSpec):
        super().__init__()
        self.model, self.spec = model, spec
        self._cache = _cache_class()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        batch, length = input_ids.shape
        valid = attention_mask.bool()
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        index = torch.arange(length, device=input_ids.device)
        causal = index[None, :] <= index[:, None]  # [query, key]
        allowed = (causal[None] & valid[:, None, :]) | torch.eye(length, dtype=torch.bool)[None]
        zeros = torch.zeros((batch, self.spec.kv_heads, self.spec.max_len, self.spec.head_dim),
                            dtype=self.spec.dtype)
        cache = self._cache([zeros] * (2 * self.spec.layers), None)
        out = self.model(input_ids=input_ids, attention_mask=allowed[:, None], position_ids=position_ids,
                         cache=cache, use_cache=True, logits_to_keep=1)
        return (out.logits[:, -1, :], *cache_tensors(cache))


class DecodeStep(torch.nn.Module):
    """``(input_ids [B,1], position_ids [B,1], write_index [1], attention_mask [B,max_len], *past)
    -> (logits [B,V], *present)``."""

    def __init__(self, model: torch.nn.Module, spec: CacheSpec):
        super().__init__()
        self.model, self.spec = model, spec
        self._cache = _cache_class()

    def forward(self, input_ids, position_ids, write_index, attention_mask, *past):
        cache = self._cache(list(past), write_index)
        mask = attention_mask.bool()[:, None, None, :]
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                         use_cache=True, logits_to_keep=1)
        return (out.logits[:, -1, :], *cache_tensors(cache))


def example_prompt(vocab: int, batch: int, prompt_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids)


def decode_inputs(spec: CacheSpec, prompt_len: int) -> tuple[torch.Tensor, ...]:
    """Example decode-step inputs: the first step after a prompt of ``prompt_len`` (zero cache)."""
    mask = torch.zeros((spec.batch, spec.max_len), dtype=torch.int64)
    mask[:, : prompt_len + 1] = 1
    return (torch.zeros((spec.batch, 1), dtype=torch.int64),
            torch.full((spec.batch, 1), prompt_len, dtype=torch.int64),
            torch.tensor([prompt_len], dtype=torch.int64), mask, *spec.zeros())


def trace_generation(model: torch.nn.Module, *, batch: int, prompt_len: int, max_len: int,
                     name: str = "model", seed: int = 0) -> GenerationGraphs:
    """Export ``model``'s prefill at ``[batch, prompt_len]`` and its decode step over a ``max_len`` cache.

    ``model``: a transformers causal LM (``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...) in eval mode
    with the SDPA attention implementation."""
    if max_len <= prompt_len:
        raise ValueError(f"max_len {max_len} leaves no room to decode after a prompt of {prompt_len}")
    model = model.eval()
    spec = cache_spec(model, batch=batch, max_len=max_len)
    vocab = model.config.vocab_size
    info = {"phase": "", "prompt_len": prompt_len, "max_len": max_len, "batch": batch,
            "cache_layers": spec.layers, "cache_form": "static, one key and one value tensor per layer"}
    prefill = export_module(PrefillStep(model, spec), example_prompt(vocab, batch, prompt_len, seed),
                            name=f"{name}-prefill", input_names=["input_ids", "attention_mask"],
                            output_names=["logits", *spec.names("present")],
                            info={**info, "phase": "prefill"})
    decode = export_module(DecodeStep(model, spec), decode_inputs(spec, prompt_len), name=f"{name}-decode",
                           input_names=["input_ids", "position_ids", "write_index", "attention_mask",
                                        *spec.names("past")],
                           output_names=["logits", *spec.names("present")], info={**info, "phase": "decode"})
    return GenerationGraphs(prefill, decode, spec, prompt_len)
