"""Calibration of the torch device backend (issue 24): micro-benchmarks timed as the variants will be.

What: ``device_suite(device)`` lists micro-benchmarks for a GPU (cuda) or, at
smaller sizes, for this CPU: a GEMM M/N/K sweep with skinny M (1 to 8192
rows on cuda), SDPA at several (batch, heads, seq, dim), LayerNorm and
RMSNorm, softmax, elementwise ops, and a launch floor (chains of tiny ops).
``run_device_suite`` runs each through ``torch_device.lower_device`` and
``measure_device`` (CUDA events on cuda, wall time on cpu) in the requested
mode and precision; ``calibrate_torch`` fits them with ``fit_checked`` into a
profile that records the GPU's name and the torch options
(``cost_model_for(..., torch_options=...)`` loads it back).

Why: the CPU suite (``calibrate.default_suite``) is timed through
``runner.lower``, which runs torch on cpu in eager fp32; a GPU's costs differ
by mode (an eager kernel launch costs ~8 us, a CUDA-graph replay ~1 us) and
by precision (bf16 GEMMs run on tensor cores), so each (device, mode,
precision) is fitted and saved on its own. Each sample is costed as the cast
graph that ran (``cast_graph``), so the fit sees the dtypes' bytes.

The suite keeps to under ~2 minutes on an H100 in eager or graphs mode and on
2 CPU cores (compile mode compiles every micro-benchmark and takes longer).
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Callable

import torch

from tfcompile.backends.torch_device import cast_graph, check_request, lower_device, measure_device
from tfcompile.calibrate import MicroBenchmark
from tfcompile.cost_models.calibration import Profile, Sample, fit_checked, gpu_name_here
from tfcompile.cost_models.device import detect_host, host_identity
from tfcompile.errors import BackendError
from tfcompile.graph import export_module
from tfcompile import micro_models as micro
from tfcompile.micro_models import seeded_randn as randn


@dataclasses.dataclass(frozen=True)
class SuiteSizes:
    gemm_rows: tuple[int, ...]
    gemm_shapes: tuple[tuple[int, int], ...]  # (K, N)
    attention: tuple[tuple[int, int, int, int], ...]  # (batch, heads, seq, head dim)
    norms: tuple[tuple[int, int, bool], ...]  # (rows, width, rms)
    softmax: tuple[tuple[int, int], ...]  # (rows of a score matrix, seq)
    elementwise: tuple[int, ...]  # numel
    chains: tuple[int, ...] = (1, 16, 64)
    view_chains: tuple[int, ...] = (8, 32, 96)


# cuda: the skinny-M sweep at BERT/GPT-2 and Llama-7B widths; attention from BERT to long context.
CUDA_SIZES = SuiteSizes(
    gemm_rows=(1, 16, 128, 512, 2048, 8192),
    gemm_shapes=((768, 768), (768, 3072), (3072, 768), (4096, 4096)),
    attention=((1, 12, 128, 64), (8, 12, 128, 64), (8, 12, 512, 64), (1, 16, 1024, 64), (4, 32, 2048, 128),
               (1, 32, 4096, 128)),
    norms=((4096, 768, False), (32768, 768, False), (8192, 4096, False), (4096, 4096, True), (32768, 768, True)),
    softmax=((12 * 128, 128), (96 * 512, 512), (32 * 2048, 2048)),
    elementwise=(1 << 16, 1 << 20, 1 << 24, 1 << 26))
# cpu: sizes a 2-core machine times in about a minute.
CPU_SIZES = SuiteSizes(
    gemm_rows=(1, 16, 128, 512),
    gemm_shapes=((256, 256), (256, 1024), (1024, 256)),
    attention=((1, 4, 64, 32), (2, 4, 128, 32), (1, 8, 256, 64)),
    norms=((128, 256, False), (1024, 512, False), (512, 256, True)),
    softmax=((4 * 64, 64), (8 * 256, 256)),
    elementwise=(1 << 12, 1 << 16, 1 << 20))


def device_suite(device: str, sizes: SuiteSizes | None = None) -> list[MicroBenchmark]:
    """The micro-benchmarks for ``device`` (``sizes``: CUDA_SIZES on cuda, CPU_SIZES on cpu), classes
    interleaved so that ``fit_checked``'s every-4th held-out set draws from each."""
    sizes = sizes or (CUDA_SIZES if device == "cuda" else CPU_SIZES)
    gemms = [MicroBenchmark(f"linear_m{m}_k{k}_n{n}", lambda m=m, k=k, n=n: (micro.Linear(k, n), (randn(m, k),)))
             for m in sizes.gemm_rows for k, n in sizes.gemm_shapes]
    others = [MicroBenchmark(f"sdpa_b{b}_h{h}_s{s}_d{d}",
                             lambda b=b, h=h, s=s, d=d: (micro.Attention(), tuple(randn(b, h, s, d) for _ in range(3))))
              for b, h, s, d in sizes.attention]
    others += [MicroBenchmark(f"{'rmsnorm' if rms else 'layernorm'}_{rows}x{width}",
                              lambda rows=rows, width=width, rms=rms: (micro.Norm(width, rms), (randn(rows, width),)))
               for rows, width, rms in sizes.norms]
    others += [MicroBenchmark(f"softmax_{rows}x{seq}",
                              lambda rows=rows, seq=seq: (micro.Softmax(), (randn(rows, seq),)))
               for rows, seq in sizes.softmax]
    others += [MicroBenchmark(f"gelu_{n}", lambda n=n: (micro.Gelu(), (randn(n),))) for n in sizes.elementwise]
    others += [MicroBenchmark(f"add_{n}", lambda n=n: (micro.Add(), (randn(n), randn(n)))) for n in sizes.elementwise]
    others += [MicroBenchmark(f"chain_{length}",
                              lambda length=length: (micro.TinyChain(length), (randn(16), randn(16))))
               for length in sizes.chains]
    others += [MicroBenchmark(f"views_{length}",
                              lambda length=length: (micro.ViewChain(length), (randn(8, 8), randn(8, 8))))
               for length in sizes.view_chains]
    # One GEMM after every other benchmark while both last, then the rest of the GEMMs.
    mixed = [b for pair in zip(gemms, others) for b in pair]
    pairs = min(len(gemms), len(others))
    return mixed + gemms[pairs:] + others[pairs:]


@dataclasses.dataclass
class SuiteRun:
    samples: list[Sample]
    skipped: dict[str, str]  # name -> why (lowering refused or failed)


def run_device_suite(suite: list[MicroBenchmark], *, device: str, mode: str, precision: str, repeat: int = 20,
                     max_s_per_benchmark: float = 1.0,
                     progress: Callable[[str], None] = lambda _: None) -> SuiteRun:
    """Each micro-benchmark exported, cast to ``precision``, lowered in ``mode`` on ``device``, its outputs
    checked against cpu fp32 (the precision's tolerance) and timed: median of ``repeat`` runs after 3 warm-up
    runs, or of the runs that fit ``max_s_per_benchmark`` (at least 3). A benchmark this torch cannot run
    (a kernel refused at that precision) is skipped with its reason instead of ending the calibration."""
    check_request(device, mode, precision)
    samples, skipped = [], {}
    for i, bench in enumerate(suite, 1):
        progress(f"[{i}/{len(suite)}] {bench.name}")
        module, inputs = bench.build()
        graph = export_module(module, inputs, name=bench.name)
        try:
            cast = cast_graph(graph, precision)
            lowered = lower_device(graph, device=device, mode=mode, precision=precision, cast=cast)
        except BackendError as exc:
            skipped[bench.name] = str(exc)
            continue
        timed = measure_device({bench.name: lowered}, warmup=3, repeat=repeat, max_total_s=max_s_per_benchmark)
        samples.append(Sample(bench.name, cast, timed[bench.name].median_s))
        del lowered
        if device == "cuda":  # pragma: no cover - needs a GPU
            gc.collect()
            torch.cuda.empty_cache()  # the largest GEMMs' buffers are not needed by the next benchmark
    return SuiteRun(samples, skipped)


def calibrate_torch(target: str, torch_options: dict[str, str], *, repeat: int = 20,
                    suite: list[MicroBenchmark] | None = None,
                    progress: Callable[[str], None] = lambda _: None) -> tuple[Profile, SuiteRun]:
    """Run the device suite with ``torch_options`` (device, mode, precision) and fit a checked profile for
    (``target``, torch, options), recording the GPU's name on cuda and this host's identity on cpu."""
    device = torch_options["device"]
    run = run_device_suite(suite if suite is not None else device_suite(device), repeat=repeat, progress=progress,
                           **torch_options)
    if len(run.samples) < 4:
        raise BackendError(f"only {len(run.samples)} micro-benchmarks ran on torch {' '.join(torch_options.values())}"
                           f" (too few to fit); first refusal: {next(iter(run.skipped.values()), 'none')}")
    label = f"torch {torch.__version__} {torch_options['mode']} {torch_options['precision']}"
    if device == "cuda":  # pragma: no cover - needs a GPU
        gpu_name = gpu_name_here()
        host, host_id = f"{gpu_name}, {label}", ""
    else:
        cpu = detect_host()
        gpu_name, host, host_id = "", f"{cpu.model}, {cpu.cores} cores, {label}", host_identity()
    profile = fit_checked(run.samples, target, "torch", host=host, host_id=host_id, torch_options=torch_options,
                          gpu_name=gpu_name)
    return profile, run

