"""Micro-benchmarks for calibration: GEMM sweep, attention, norms, softmax,
elementwise ops and a launch floor, each a tiny traced model.

Each benchmark is measured on the backend being calibrated and costed with
the same kernel grouping the predictor uses, so the fit sees exactly the
FLOPs and bytes the predictions will use.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Callable

import torch

from tfcompile.backends.runner import lower
from tfcompile.backends.timing import measure
from tfcompile.graph import ModelGraph, export_module


@dataclasses.dataclass(frozen=True)
class MicroBenchmark:
    name: str
    build: Callable[[], tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]


class _Linear(torch.nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.fc = torch.nn.Linear(k, n)

    def forward(self, x):
        return self.fc(x)


class _Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


class _LayerNorm(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x)


class _Softmax(torch.nn.Module):
    def forward(self, x):
        return torch.softmax(x, dim=-1)


class _Gelu(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.gelu(x)


class _AddChain(torch.nn.Module):
    """``length`` dependent adds on a tiny tensor: measures per-kernel overhead."""

    def __init__(self, length):
        super().__init__()
        self.length = length

    def forward(self, x, y):
        for _ in range(self.length):
            x = x * y + y  # a mul and an add per step; backends may fuse them
            x = torch.relu(x)
        return x


def _randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def default_suite() -> list[MicroBenchmark]:
    suite = []
    for m in (1, 16, 128, 512):
        for k, n in ((768, 768), (768, 3072), (3072, 768), (256, 1024)):
            suite.append(MicroBenchmark(f"linear_m{m}_k{k}_n{n}",
                                        lambda m=m, k=k, n=n: (_Linear(k, n), (_randn(m, k),))))
    for s in (64, 128, 256, 512):
        suite.append(MicroBenchmark(f"sdpa_h12_s{s}_d64",
                                    lambda s=s: (_Attention(), tuple(_randn(1, 12, s, 64) for _ in range(3)))))
    for rows in (128, 512, 2048):
        suite.append(MicroBenchmark(f"layernorm_{rows}x768", lambda rows=rows: (_LayerNorm(768), (_randn(rows, 768),))))
    for s in (128, 256, 512):
        suite.append(MicroBenchmark(f"softmax_12x{s}x{s}", lambda s=s: (_Softmax(), (_randn(12, s, s),))))
    for numel in (1 << 14, 1 << 18, 1 << 21):
        suite.append(MicroBenchmark(f"gelu_{numel}", lambda numel=numel: (_Gelu(), (_randn(numel),))))
    for length in (1, 16, 64):
        suite.append(MicroBenchmark(f"chain_{length}", lambda length=length: (_AddChain(length),
                                                                             (_randn(16), _randn(16)))))
    return suite


@dataclasses.dataclass(frozen=True)
class Sample:
    name: str
    graph: ModelGraph
    measured_s: float


def run_suite(suite: list[MicroBenchmark], backend: str, *, repeat: int = 10,
              progress: Callable[[str], None] = lambda _: None) -> list[Sample]:
    samples = []
    with tempfile.TemporaryDirectory(prefix="tfcompile-calibrate-") as workdir:
        for i, bench in enumerate(suite, 1):
            progress(f"[{i}/{len(suite)}] {bench.name}")
            module, inputs = bench.build()
            graph = export_module(module, inputs, name=bench.name)
            lowered = lower(graph, backend, Path(workdir))
            result = measure(lowered.run, backend=backend, warmup=3, repeat=repeat, max_total_s=10.0)
            samples.append(Sample(bench.name, graph, result.median_s))
    return samples
