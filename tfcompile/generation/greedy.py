"""Greedy generation over a prefill runner and a decode-step runner (see ``generation.trace``).

A runner is any callable from a tuple of input tensors to a tuple of output
tensors in the traced graphs' order: ``ModelGraph.run`` (the torch
GraphModule), ``backends.ort.OrtModel.run`` (ONNX Runtime), or a TVM module.
The loop owns what the graphs leave to their caller: the cache mask, the
position ids and the slot each step writes. It mirrors Hugging Face
``generate(do_sample=False)``: the prefill yields the first new token, each
decode step one more (so ``new_tokens`` tokens cost ``new_tokens - 1`` decode
steps), and with left padding a token's position is the count of real tokens
before it. No end-of-sequence stop: every sequence gets ``new_tokens`` tokens.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from tfcompile.generation.trace import CacheSpec

Runner = Callable[[tuple[torch.Tensor, ...]], Sequence[torch.Tensor]]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, longest]`` with every prompt right-aligned."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), longest), dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, longest - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.int64)
            mask[row, longest - len(prompt):] = 1
    return ids, mask


class DecodeState:
    """What the loop carries between steps: the cache tensors, the cache mask and the next positions."""

    def __init__(self, spec: CacheSpec, attention_mask: torch.Tensor, cache: Sequence[torch.Tensor]):
        batch, prompt_len = attention_mask.shape
        if batch != spec.batch:
            raise ValueError(f"the graphs were traced for batch {spec.batch}, not {batch}")
        self.spec = spec
        self.mask = torch.zeros((batch, spec.max_len), dtype=torch.int64)
        self.mask[:, :prompt_len] = attention_mask
        self.positions = attention_mask.long().sum(-1, keepdim=True)  # real tokens so far = the next position
        self.slot = prompt_len  # the next cache slot to write
        self.cache = tuple(cache)

    def step_inputs(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Inputs of the decode step that feeds ``tokens`` ``[B]`` (marks their slot as valid first)."""
        if self.slot >= self.spec.max_len:
            raise ValueError(f"the static cache holds {self.spec.max_len} positions; it is full")
        self.mask[:, self.slot] = 1
        return (tokens.reshape(-1, 1).to(torch.int64), self.positions.clone(),
                torch.tensor([self.slot], dtype=torch.int64), self.mask.clone(), *self.cache)

    def advance(self, cache: Sequence[torch.Tensor]) -> None:
        self.cache = tuple(cache)
        self.positions = self.positions + 1
        self.slot += 1


def greedy_generate(prefill: Runner, decode: Runner, spec: CacheSpec, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, *, new_tokens: int) -> torch.Tensor:
    """The ``[B, new_tokens]`` greedy tokens after the (left-padded) prompts ``input_ids``."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if new_tokens < 1:
        raise ValueError("new_tokens must be at least 1")
    if input_ids.shape[1] + new_tokens - 1 > spec.max_len:
        raise ValueError(f"prompt {input_ids.shape[1]} + {new_tokens} new tokens exceed the cache's "
                         f"{spec.max_len} positions")
    logits, *cache = prefill((input_ids, attention_mask))
    tokens = [torch.as_tensor(logits).argmax(-1)]
    state = DecodeState(spec, attention_mask, cache)
    for _ in range(new_tokens - 1):
        logits, *cache = decode(state.step_inputs(tokens[-1]))
        state.advance(cache)
        tokens.append(torch.as_tensor(logits).argmax(-1))
    return torch.stack(tokens, dim=1)


def hf_greedy(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
              new_tokens: int) -> torch.Tensor:
    """Hugging Face ``generate(do_sample=False)``'s new tokens, never stopping at an end-of-sequence token."""
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=0, eos_token_id=None,
                             pad_token_id=0)
    return out[:, input_ids.shape[1]:]
