"""Time to first token (TTFT) and time per output token (TPOT) on ONNX Runtime CPU, cache as I/O; and on torch.

The prefill and decode-step ONNX files of ``generation.trace`` are run as a
real greedy generation with ORT IO binding: every input and output is bound
once to a pre-allocated numpy buffer, so nothing is copied into or out of
the session between steps. The static cache has two buffer sets; the decode
step reads one and writes the other, and the next step swaps them
(ping-pong). Inside the step the graph is functional: one ``ScatterElements``
per cache tensor writes the whole cache into the other set, so every step
copies the cache once (about 12 MB per step for gpt2-small at 159 slots,
against 498 MB of weights). The loop only writes the new token, its position,
the slot index and one mask element into the bound input buffers.

TTFT = the prefill run plus the argmax of its logits (the first token), timed
per generation. TPOT = one decode step plus its argmax; with a static cache
every step attends over the same ``max_len`` slots, so all steps cost alike and
the spread is over every decode step of every timed generation. The tokens of
the last generation come back too, so a caller can check the bound path
generates what ``greedy.greedy_generate`` does.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tfcompile.backends.ort import OrtModel
from tfcompile.backends.timing import Spread
from tfcompile.generation.trace import CacheSpec


@dataclasses.dataclass(frozen=True)
class GenerationTiming:
    ttft_ms: Spread
    tpot_ms: Spread
    batch: int
    prompt_len: int
    new_tokens: int
    threads: int
    tokens: np.ndarray  # [B, new_tokens] of the last timed generation

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput over the batch at the median step time."""
        return self.batch * 1e3 / self.tpot_ms.median

    @property
    def generation_ms(self) -> float:
        """Median end-to-end time of one generation: TTFT + (new_tokens - 1) TPOT."""
        return self.ttft_ms.median + (self.new_tokens - 1) * self.tpot_ms.median

    def as_dict(self) -> dict:
        return {"ttft_ms": self.ttft_ms.as_dict(), "tpot_ms": self.tpot_ms.as_dict(), "batch": self.batch,
                "prompt_len": self.prompt_len, "new_tokens": self.new_tokens, "threads": self.threads,
                "tokens_per_s": self.tokens_per_s}


_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.float32}


class _Bound:
    """A session with its inputs and outputs bound to numpy buffers (CPU memory, no copies)."""

    def __init__(self, model: OrtModel, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]):
        self.session = model.session
        self.binding = model.session.io_binding()
        for name, array in inputs.items():
            self._check(array)
            self.binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        for name, array in outputs.items():
            self._check(array)
            self.binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)

    @staticmethod
    def _check(array: np.ndarray) -> None:
        if not array.flags["C_CONTIGUOUS"]:
            raise ValueError("bound buffers must be contiguous")

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)


class BoundGeneration:
    """Prefill and decode sessions bound to one set of buffers for prompts of a fixed shape."""

    def __init__(self, prefill: OrtModel, decode: OrtModel, spec: CacheSpec, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor):
        batch, prompt_len = input_ids.shape
        if batch != spec.batch:
            raise ValueError(f"the graphs were traced for batch {spec.batch}, not {batch}")
        self.spec, self.prompt_len = spec, prompt_len
        dtype = _NUMPY.get(spec.dtype, np.float32)
        vocab = prefill.session.get_outputs()[0].shape[-1]
        self.prompt_ids = np.ascontiguousarray(input_ids.numpy().astype(np.int64))
        self.prompt_mask = np.ascontiguousarray(attention_mask.numpy().astype(np.int64))
        self.logits = np.zeros((batch, vocab), dtype=dtype)
        cache_names = [f"{kind}_{i}" for i in range(spec.layers) for kind in ("key", "value")]
        self.caches = [[np.zeros(spec.shape, dtype=dtype) for _ in cache_names] for _ in range(2)]
        self.token = np.zeros((batch, 1), dtype=np.int64)
        self.position = np.zeros((batch, 1), dtype=np.int64)
        self.slot = np.zeros((1,), dtype=np.int64)
        self.mask = np.zeros((batch, spec.max_len), dtype=np.int64)
        self.prefill = _Bound(prefill, {"input_ids": self.prompt_ids, "attention_mask": self.prompt_mask},
                              {"logits": self.logits, **{f"present_{n}": a for n, a in zip(cache_names,
                                                                                           self.caches[0])}})
        step_inputs = {"input_ids": self.token, "position_ids": self.position, "write_index": self.slot,
                       "attention_mask": self.mask}
        self.steps = [_Bound(decode, {**step_inputs, **{f"past_{n}": a for n, a in zip(cache_names, self.caches[src])}},
                             {"logits": self.logits, **{f"present_{n}": a for n, a in zip(cache_names,
                                                                                          self.caches[1 - src])}})
                      for src in (0, 1)]

    def generate(self, new_tokens: int) -> tuple[np.ndarray, float, list[float]]:
        """Greedy tokens ``[B, new_tokens]``, the prefill's seconds and each decode step's seconds."""
        if self.prompt_len + new_tokens - 1 > self.spec.max_len:
            raise ValueError(f"prompt {self.prompt_len} + {new_tokens} new tokens exceed the cache's "
                             f"{self.spec.max_len} positions")
        tokens = np.zeros((self.spec.batch, new_tokens), dtype=np.int64)
        start = time.perf_counter()
        self.prefill.run()
        tokens[:, 0] = self.logits.argmax(-1)
        ttft = time.perf_counter() - start
        self.mask[:] = 0
        self.mask[:, : self.prompt_len] = self.prompt_mask
        self.position[:, 0] = self.prompt_mask.sum(-1)
        steps = []
        for i in range(1, new_tokens):
            start = time.perf_counter()
            slot = self.prompt_len + i - 1
            self.token[:, 0] = tokens[:, i - 1]
            self.slot[0] = slot
            self.mask[:, slot] = 1
            self.steps[(i - 1) % 2].run()  # even steps read cache set 0 and write set 1, odd the reverse
            tokens[:, i] = self.logits.argmax(-1)
            steps.append(time.perf_counter() - start)
            self.position += 1
        return tokens, ttft, steps


def measure_generation(prefill_path: Path, decode_path: Path, spec: CacheSpec, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None, *, new_tokens: int, repeat: int = 5,
                       warmup: int = 1, threads: int | None = None) -> GenerationTiming:
    """TTFT and TPOT of ``repeat`` timed greedy generations after ``warmup`` untimed ones."""
    files = {"model": (prefill_path, decode_path)}
    return measure_generations(files, spec, input_ids, attention_mask, new_tokens=new_tokens, repeat=repeat,
                               warmup=warmup, threads=threads)["model"]


# One greedy generation: its tokens [B, new_tokens], the prefill's seconds and each decode step's seconds.
Generate = Callable[[int], tuple[np.ndarray, float, list[float]]]


def _round_robin(generators: dict[str, tuple[Generate, int]], spec: CacheSpec, prompt_len: int, *,
                 new_tokens: int, repeat: int, warmup: int) -> dict[str, GenerationTiming]:
    """Time ``repeat`` generations of every variant after ``warmup`` untimed ones, round-robin: generation k
    of every variant runs before generation k + 1 of any, so a change in the machine's load touches every
    variant alike. ``generators``: name -> (generate, threads it runs on)."""
    if new_tokens < 2:
        raise ValueError("TPOT needs at least 2 new tokens (one decode step)")
    for _ in range(warmup):
        for generate, _threads in generators.values():
            generate(new_tokens)
    ttfts = {name: [] for name in generators}
    steps = {name: [] for name in generators}
    tokens = {}
    for _ in range(max(repeat, 1)):
        for name, (generate, _threads) in generators.items():
            tokens[name], ttft, step_s = generate(new_tokens)
            ttfts[name].append(ttft * 1e3)
            steps[name] += [s * 1e3 for s in step_s]
    return {name: GenerationTiming(Spread.of(ttfts[name]), Spread.of(steps[name]), spec.batch, prompt_len,
                                   new_tokens, threads, tokens[name])
            for name, (_, threads) in generators.items()}


def measure_generations(files: dict[str, tuple[Path, Path]], spec: CacheSpec, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None = None, *, new_tokens: int, repeat: int = 5,
                        warmup: int = 1, threads: int | None = None) -> dict[str, GenerationTiming]:
    """``measure_generation`` for several variants' ``(prefill, decode)`` files, round-robin in one process."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    generators = {}
    for name, (prefill_path, decode_path) in files.items():
        # Two sessions (four, with two variants) take turns on the same cores: a session whose idle workers
        # spin steals them from the one running (TTFT 139-157 ms in the loop against 94-104 ms without spinning,
        # gpt2-small, 2 cores, three runs each), so the workers sleep between runs.
        prefill = OrtModel(prefill_path, threads=threads, spinning=False)
        decode = OrtModel(decode_path, threads=threads, spinning=False)
        generators[name] = (BoundGeneration(prefill, decode, spec, input_ids, attention_mask).generate,
                            prefill.session.get_session_options().intra_op_num_threads)
    return _round_robin(generators, spec, input_ids.shape[1], new_tokens=new_tokens, repeat=repeat, warmup=warmup)


def measure_generations_torch(graphs: dict[str, tuple], spec: CacheSpec, input_ids: torch.Tensor,
                              attention_mask: torch.Tensor | None = None, *, new_tokens: int, repeat: int = 5,
                              warmup: int = 1) -> dict[str, GenerationTiming]:
    """TTFT and TPOT of each variant's ``(prefill, decode)`` ModelGraphs run by torch (the exported
    GraphModules, eager), round-robin in one process as ``measure_generations`` does on ONNX Runtime."""
    from tfcompile.generation.greedy import DecodeState

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)

    def generator(prefill, decode) -> Generate:
        def generate(new_tokens: int) -> tuple[np.ndarray, float, list[float]]:
            start = time.perf_counter()
            logits, *cache = prefill.run((input_ids, attention_mask))
            tokens = [logits.argmax(-1)]
            ttft = time.perf_counter() - start
            state, steps = DecodeState(spec, attention_mask, cache), []
            for _ in range(new_tokens - 1):
                start = time.perf_counter()
                logits, *cache = decode.run(state.step_inputs(tokens[-1]))
                state.advance(cache)
                tokens.append(logits.argmax(-1))
                steps.append(time.perf_counter() - start)
            return torch.stack(tokens, dim=1).numpy(), ttft, steps
        return generate

    generators = {name: (generator(prefill, decode), torch.get_num_threads())
                  for name, (prefill, decode) in graphs.items()}
    return _round_robin(generators, spec, input_ids.shape[1], new_tokens=new_tokens, repeat=repeat, warmup=warmup)


def profile_decode_step(decode_path: Path, spec: CacheSpec, prompt_len: int, *, steps: int = 10,
                        threads: int | None = None) -> dict[str, float]:
    """Milliseconds per decode step spent in each ONNX op type (ORT's profiler, kernel times), largest first.

    Where a step's time goes when it is far from the weight-streaming bound: the
    GEMVs that stream weights, the cache's Transpose/ScatterND copies, or the
    rest. Runs the step ``steps`` times at slot ``prompt_len`` on a zero cache
    (the values do not change the kernels' time)."""
    import onnx

    from tfcompile.backends.ort_profile import ms_by_op_type, profile_runs

    graph = onnx.load(str(decode_path), load_external_data=False).graph
    constants = {t.name for t in graph.initializer}
    mask = np.zeros((spec.batch, spec.max_len), dtype=np.int64)
    mask[:, : prompt_len + 1] = 1
    feeds = {"input_ids": np.zeros((spec.batch, 1), dtype=np.int64),
             "position_ids": np.full((spec.batch, 1), prompt_len, dtype=np.int64),
             "write_index": np.array([prompt_len], dtype=np.int64), "attention_mask": mask}
    dtype = _NUMPY.get(spec.dtype, np.float32)
    for name in [i.name for i in graph.input if i.name not in constants]:
        feeds.setdefault(name, np.zeros(spec.shape, dtype=dtype))
    return ms_by_op_type(profile_runs(decode_path, feeds, runs=steps, threads=threads))
