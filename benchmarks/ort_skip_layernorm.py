"""ONNX Runtime with and without its SkipLayerNormalization fusion: the same model file, two sessions, a ratio.

ORT fuses a residual add that only a LayerNorm reads into one SkipLayerNormalization node. On session 15's
Xeon (ORT 1.32) that node ran 4-9x slower than LayerNormalization at the same shape (calibration's
``residual_layernorm_*`` against ``layernorm_*`` micro-benchmarks), so the fusion may cost a post-norm model
(BERT, MiniLM) time. This measures it end to end: each model is exported once, loaded in a session as ORT
optimises it by default and in one with ``disabled_optimizers=["SkipLayerNormFusion"]``, both are checked to
give the same outputs, and they are timed round-robin in one process (``measure_interleaved``, median of
each); the speed-up is default over unfused.

    .venv/bin/python benchmarks/ort_skip_layernorm.py --repeat 20
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from tfcompile.backends import ort
from tfcompile.backends.ort_profile import ms_by_op_type, profile_runs
from tfcompile.backends.runner import interleave_block
from tfcompile.backends.timing import measure_interleaved
from tfcompile.frontend import LoadOptions, load_model

MODELS = (("bert-base", 1, 128), ("minilm", 1, 512), ("gpt2-small", 1, 128))
FUSION = "SkipLayerNormFusion"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    print(f"ORT, {args.threads} threads; median of {args.repeat}, round-robin; speed-up = default / unfused")
    for model, batch, seq in MODELS:
        graph = load_model(model, LoadOptions(batch=batch, seq=seq, seed=0))
        with tempfile.TemporaryDirectory(prefix="tfcompile-skipln-") as tmp:
            path = ort.export_onnx(graph, Path(tmp) / "model.onnx", external_data=True)
            models = {"default": ort.OrtModel(path, threads=args.threads),
                      "unfused": ort.OrtModel(path, threads=args.threads, disabled_optimizers=(FUSION,))}
            sessions = {k: m.session for k, m in models.items()}
            feeds = models["default"].feeds(graph.example_inputs)
            outputs = {k: s.run(None, feeds) for k, s in sessions.items()}
            worst = max(float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-12))
                        for a, b in zip(outputs["default"], outputs["unfused"]))
            fused = ms_by_op_type(profile_runs(path, graph.example_inputs, runs=2)).get("SkipLayerNormalization", 0.0)
            measured = measure_interleaved({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()},
                                           backend="ort", repeat=args.repeat, block=interleave_block("ort"))
        default, unfused = measured["default"].median_ms, measured["unfused"].median_ms
        print(f"{model} b{batch} s{seq}: default {default:7.2f} ms (SkipLayerNormalization {fused:5.2f} ms of it), "
              f"unfused {unfused:7.2f} ms, speed-up {default / unfused:.3f}x; outputs differ by {worst:.1e} relative")


if __name__ == "__main__":
    main()
