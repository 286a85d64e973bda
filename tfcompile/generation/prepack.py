"""Prepacking (Zhao et al. 2024): the prefill of prompts of different lengths, bin-packed into few rows.

A batch of ``B`` prompts padded to the longest, ``P``, costs ``B x P`` tokens of
prefill however short most prompts are. Prepacking puts the prompts back to
back into ``R`` rows of ``capacity`` tokens (first-fit decreasing, ``capacity``
= the longest prompt by default), so the prefill runs over ``R x capacity``
tokens instead. Inside a row a token attends only to the earlier tokens of its
own prompt (a block-diagonal causal mask built in the graph from a segment id
per token) and its position id restarts at 0 with each prompt.

The packed prefill graph (``PackedPrefill``), with ``R`` and ``capacity``
static like every shape of ``generation.trace``:

  ``(input_ids [R, C], position_ids [R, C], segment_ids [R, C], last_index [B],
  cache_index [B, P])`` -> ``(logits [B, V], present_key_0, present_value_0, ...)``

``segment_ids`` is the prompt's number for each token, -1 for the empty tail
of a row; ``last_index`` is each prompt's last token as a flat index into the
``R x C`` tokens (its logits give the first new token; the LM head runs on
those ``B`` tokens only); ``cache_index[b, s]`` is the flat index of the token
whose key and value go to cache slot ``s`` of prompt ``b``, -1 for no token.

**The cache is unpacked inside the graph**, not by the runner: a gather per
layer puts prompt ``b``'s keys and values right-aligned at slots ``[P - len_b,
P)`` of the batched static cache ``[B, H_kv, max_len, D]``, zero elsewhere --
the layout the left-padded prefill of ``generation.trace`` leaves. So the
outputs have the padded prefill's names and shapes: the unchanged decode step
and ``greedy.DecodeState`` (one ``write_index`` for the whole batch, a
left-padded mask over the slots, position ids = real tokens so far) continue
from it, and under ONNX Runtime IO binding the gather writes straight into the
decode step's bound cache buffers (one pass over the cache, on ORT's threads,
inside the timed prefill) where a runner would copy the packed cache out of
the session and into those buffers.

**Why it is exact** (up to FP rounding): a prompt's token sees the same keys
as when the prompt runs alone -- its own prompt's earlier tokens, computed
from the same token ids at the same position ids -- and a masked key adds
exp(-inf) = 0 to the softmax. Everything else in the layer is per token. The
logits at the last token and the keys and values are therefore those of the
prompt alone, which are those of the left-padded prefill at its real tokens;
the decode steps then see the same cache at the same slots under the same
mask. Rounding differs only in the order of the reductions over keys.

**Preconditions** (``check_prepackable`` refuses otherwise, with the reason):
a transformers causal LM (a base model and an output embedding that produces
the logits from the last hidden state) whose ``forward`` takes explicit
``position_ids`` and honours a 4-D boolean attention mask (the ``sdpa`` or
``eager`` attention; flash and flex kernels take their own mask forms), and
in which tokens meet only in attention (no batch norm over tokens, no
convolution along the sequence, no ALiBi without positions, no logit
post-processing). The last two cannot be read from a config, so a probe runs
two prompts packed in one row against each prompt alone and compares the
logits and the cache.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Sequence

import torch

from tfcompile.generation.trace import CacheSpec, cache_spec, cache_tensors
from tfcompile.graph import ModelGraph, export_module

MASKED_ATTENTION = ("sdpa", "eager")  # implementations that take a 4-D boolean mask as given
PROBE_TOLERANCE = 1e-4  # relative to the largest |logit|; packing changes only the order of sums


class PrepackError(ValueError):
    """The model cannot be prefilled packed exactly; the message says why."""


@dataclasses.dataclass(frozen=True)
class PackingPlan:
    """Which prompts share each packed row, in their order inside it.

    ``rows[r]`` lists prompt numbers; a prompt starts where the previous one in
    its row ends."""

    lengths: tuple[int, ...]
    capacity: int
    rows: tuple[tuple[int, ...], ...]

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def prompt_len(self) -> int:
        """``P``: the longest prompt, the length the left-padded batch and the decode cache use."""
        return max(self.lengths)

    def placements(self) -> list[tuple[int, int]]:
        """``(row, offset)`` of every prompt, by prompt number."""
        placed: dict[int, tuple[int, int]] = {}
        for row, members in enumerate(self.rows):
            offset = 0
            for prompt in members:
                placed[prompt] = (row, offset)
                offset += self.lengths[prompt]
        return [placed[i] for i in range(self.batch)]

    def token_counts(self) -> dict[str, float]:
        """Real tokens, padded prefill tokens ``B x P``, packed tokens ``R x C`` and their ratios."""
        real, padded, packed = sum(self.lengths), self.batch * self.prompt_len, len(self.rows) * self.capacity
        return {"real_tokens": real, "padded_tokens": padded, "packed_tokens": packed, "rows": len(self.rows),
                "padding_fraction": 1 - real / padded, "packed_fill": real / packed,
                "token_ratio_padded_over_packed": padded / packed}


def first_fit_decreasing(lengths: Sequence[int], capacity: int | None = None) -> PackingPlan:
    """Pack prompts of ``lengths`` into rows of ``capacity`` tokens (default: the longest prompt).

    Longest first (ties by prompt number, so the plan is deterministic); each
    prompt goes into the first row it fits in, or opens a new row. First-fit
    decreasing uses at most 11/9 of the optimal rows + 6/9, which is what the
    Prepacking paper's greedy packer does too; the plan is made once per batch
    on the host, in microseconds for a batch of prompts."""
    lengths = tuple(int(n) for n in lengths)
    if not lengths:
        raise ValueError("no prompts to pack")
    if min(lengths) < 1:
        raise ValueError(f"every prompt needs at least one token (lengths {list(lengths)})")
    capacity = max(lengths) if capacity is None else int(capacity)
    if max(lengths) > capacity:
        raise ValueError(f"a prompt of {max(lengths)} tokens does not fit rows of {capacity}")
    rows: list[list[int]] = []
    free: list[int] = []
    for prompt in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((r for r, room in enumerate(free) if room >= lengths[prompt]), None)
        if row is None:
            rows.append([])
            free.append(capacity)
            row = len(rows) - 1
        rows[row].append(prompt)
        free[row] -= lengths[prompt]
    return PackingPlan(lengths, capacity, tuple(tuple(r) for r in rows))


def packed_inputs(plan: PackingPlan, prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, ...]:
    """The packed prefill's inputs for ``prompts`` (their lengths must be the plan's)."""
    if tuple(len(p) for p in prompts) != plan.lengths:
        raise ValueError(f"prompt lengths {[len(p) for p in prompts]} are not the plan's {list(plan.lengths)}")
    shape = (len(plan.rows), plan.capacity)
    ids = torch.full(shape, pad_id, dtype=torch.int64)
    positions = torch.zeros(shape, dtype=torch.int64)
    segments = torch.full(shape, -1, dtype=torch.int64)
    last = torch.zeros(plan.batch, dtype=torch.int64)
    cache_index = torch.full((plan.batch, plan.prompt_len), -1, dtype=torch.int64)
    for prompt, (row, offset) in enumerate(plan.placements()):
        length = plan.lengths[prompt]
        span = slice(offset, offset + length)
        ids[row, span] = torch.as_tensor(list(prompts[prompt]), dtype=torch.int64)
        positions[row, span] = torch.arange(length)
        segments[row, span] = prompt
        flat = row * plan.capacity + offset + torch.arange(length)
        last[prompt] = flat[-1]
        cache_index[prompt, plan.prompt_len - length:] = flat  # right-aligned, as left padding leaves it
    return ids, positions, segments, last, cache_index


INPUT_NAMES = ["input_ids", "position_ids", "segment_ids", "last_index", "cache_index"]


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[R, 1, C, C]`` boolean: query ``q`` may attend to key ``k`` iff ``k <= q`` in the same segment.

    The empty tail of a row (segment -1) attends causally within itself, so no
    query row is all masked (an all-masked SDPA row is NaN)."""
    index = torch.arange(segment_ids.shape[1], device=segment_ids.device)
    causal = index[None, :] <= index[:, None]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None]


def unpack_cache(packed: torch.Tensor, cache_index: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[R, H, C, D]`` packed keys (or values) -> ``[B, H, max_len, D]``, slot ``s`` of prompt ``b`` from
    token ``cache_index[b, s]``, zero where the index is -1 and at slots ``>= P``."""
    rows, heads, capacity, dim = packed.shape
    batch, prompt_len = cache_index.shape
    tokens = packed.transpose(1, 2).reshape(rows * capacity, heads, dim)
    gathered = tokens.index_select(0, cache_index.clamp(min=0).reshape(-1)).reshape(batch, prompt_len, heads, dim)
    gathered = torch.where((cache_index >= 0)[:, :, None, None], gathered, torch.zeros((), dtype=packed.dtype))
    return torch.nn.functional.pad(gathered.transpose(1, 2), (0, 0, 0, max_len - prompt_len))


def _recording_cache(layers: int):
    """A transformers ``Cache`` whose layers only keep the keys and values the prefill computes.

    A packed prefill has no past, so a layer's ``update`` returns the new keys
    and values as they are (attention over the row, under the block mask) and
    records them for the graph's outputs. ``trace`` has its own static-cache
    layer for the padded prefill and the decode step; this one is separate
    because it needs neither a write index nor padding to ``max_len``."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    class RecordingLayer(CacheLayerMixin):
        is_compileable = True
        is_sliding = False

        def __init__(self):
            super().__init__()
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:
            return None

        def update(self, key_states, value_states, *args, **kwargs):
            self.keys, self.values = key_states, value_states
            return key_states, value_states

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return query_length, 0

        def get_seq_length(self) -> int:
            return 0  # position ids are always given

        def get_max_length(self) -> int:
            return -1  # unbounded: the layer holds whatever the prefill computes

    return Cache(layers=[RecordingLayer() for _ in range(layers)])


class PackedPrefill(torch.nn.Module):
    """The packed prefill: ``(input_ids, position_ids, segment_ids, last_index, cache_index) ->
    (logits [B, V], present_key_0, present_value_0, ...)`` with the cache in the batched layout of ``spec``."""

    def __init__(self, model: torch.nn.Module, spec: CacheSpec):
        super().__init__()
        self.model, self.spec = model, spec

    def forward(self, input_ids, position_ids, segment_ids, last_index, cache_index):
        rows, capacity = input_ids.shape
        cache = _recording_cache(self.spec.layers)
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=block_causal_mask(segment_ids),
                                       position_ids=position_ids, cache=cache, use_cache=True).last_hidden_state
        last = hidden.reshape(rows * capacity, hidden.shape[-1]).index_select(0, last_index)
        logits = self.model.get_output_embeddings()(last)
        return (logits, *(unpack_cache(t, cache_index, self.spec.max_len) for t in cache_tensors(cache)))


def check_prepackable(model: torch.nn.Module) -> None:
    """Raise ``PrepackError`` with the reason when ``model``'s prefill cannot be packed exactly."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(model, "base_model", model) is model:
        raise PrepackError(f"{type(model).__name__} is not a causal LM with a base model and an output "
                           "embedding: prepacking gathers the last hidden state of each prompt for the LM head")
    if "position_ids" not in inspect.signature(model.base_model.forward).parameters:
        raise PrepackError(f"{type(model.base_model).__name__}.forward takes no position_ids: packed prompts "
                           "need their positions restarted at 0")
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in MASKED_ATTENTION:
        raise PrepackError(f"attention implementation {attention!r} does not take a 4-D boolean mask as given "
                           f"(needs one of {', '.join(MASKED_ATTENTION)})")
    _probe(model)


def _probe(model: torch.nn.Module) -> None:
    """Two prompts packed in one row against each alone: same last logits and same keys and values."""
    lengths = (3, 2)
    vocab = model.config.vocab_size
    prompts = [torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(7 + n)).tolist()
               for n in lengths]
    plan = PackingPlan(lengths, sum(lengths), ((0, 1),))
    spec = cache_spec(model, batch=2, max_len=plan.prompt_len)
    with torch.no_grad():
        logits, *present = PackedPrefill(model.eval(), spec)(*packed_inputs(plan, prompts))
        for b, prompt in enumerate(prompts):
            alone = model(input_ids=torch.tensor([prompt]), use_cache=True)
            scale = alone.logits[0, -1].abs().max().clamp(min=1e-6)
            if (logits[b] - alone.logits[0, -1]).abs().max() > PROBE_TOLERANCE * scale:
                raise PrepackError("a prompt's logits change when another prompt shares its row: tokens mix "
                                   "outside attention (normalisation or convolution across tokens), or the "
                                   "logits are not the output embedding of the last hidden state")
            _compare_cache(present, alone.cache, b, plan.prompt_len - lengths[b])


def _compare_cache(present: Sequence[torch.Tensor], alone, prompt: int, start: int) -> None:
    alone_tensors = cache_tensors(alone)
    for packed, single in zip(present, alone_tensors):
        got = packed[prompt, :, start:start + single.shape[2]]
        if (got - single[0]).abs().max() > PROBE_TOLERANCE * single.abs().max().clamp(min=1e-6):
            raise PrepackError("a prompt's keys or values change when another prompt shares its row: the "
                               "attention mask or the position ids are not honoured")


def trace_prepacked_prefill(model: torch.nn.Module, plan: PackingPlan, *, max_len: int, name: str = "model",
                            seed: int = 0, check: bool = True) -> ModelGraph:
    """Export the packed prefill for ``plan``'s rows, with the cache of ``max_len`` slots of the decode step
    that ``trace.trace_generation(model, batch=plan.batch, prompt_len=plan.prompt_len, max_len=max_len)``
    exports; ``check``: run ``check_prepackable`` first."""
    if max_len < plan.prompt_len:
        raise ValueError(f"a cache of {max_len} slots cannot hold a prompt of {plan.prompt_len}")
    model = model.eval()
    if check:
        check_prepackable(model)
    spec = cache_spec(model, batch=plan.batch, max_len=max_len)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in plan.lengths]
    info = {"phase": "prefill", "prepacked": True, "rows": len(plan.rows), "capacity": plan.capacity,
            "prompt_lengths": list(plan.lengths), "prompt_len": plan.prompt_len, "max_len": max_len,
            "batch": plan.batch, "cache_layers": spec.layers,
            "cache_form": "static, one key and one value tensor per layer, prompts right-aligned"}
    return export_module(PackedPrefill(model, spec), packed_inputs(plan, prompts), name=f"{name}-prefill-packed",
                         input_names=INPUT_NAMES, output_names=["logits", *spec.names("present")], info=info)


def prefill_runner(run, inputs: tuple[torch.Tensor, ...]):
    """A prefill runner for ``greedy.greedy_generate`` that runs the packed prefill on ``inputs`` and ignores the
    padded ``(input_ids, attention_mask)`` it is handed (the loop still uses that mask for the decode steps)."""
    return lambda _padded: run(inputs)
