"""ONNX Runtime's CPU softmax over scores a mask hides: time against the share hidden (-inf), as a ratio.

The cost model prices hidden scores as a kind of their own (``tfcompile.cost_models.masked_scores``) because
ORT's softmax exponentiates -inf on a slow path. This measures it: one ONNX Softmax over a 12 x 512 x 512
fp32 tensor with none, 10 %, half and two thirds of each row at -inf, timed round-robin in one process, median
of each, and the ratio to the unmasked one.

    .venv/bin/python benchmarks/softmax_masked.py --repeat 30
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper

from tfcompile.backends.timing import measure_interleaved

HIDDEN_SHARES = (0.0, 0.1, 0.5, 2 / 3)


def softmax_session(shape: list[int], threads: int):
    import onnxruntime as ort

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], "softmax", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    shape = [1, 12, 512, 512]
    session = softmax_session(shape, args.threads)
    rng = np.random.default_rng(0)
    runs = {}
    for share in HIDDEN_SHARES:
        scores = rng.standard_normal(shape).astype(np.float32)
        scores[..., : int(shape[-1] * share)] = -np.inf
        runs[f"{share:.0%}"] = lambda scores=scores: session.run(None, {"x": scores})
    measured = measure_interleaved(runs, backend="ort", repeat=args.repeat)
    unmasked = measured["0%"].median_s
    print(f"ORT Softmax over {'x'.join(map(str, shape[1:]))} fp32, {args.threads} threads, median of {args.repeat}")
    for name, m in measured.items():
        print(f"  {name:>4s} hidden: {m.median_ms:6.2f} ms  ({m.median_s / unmasked:.2f}x the unmasked)")


if __name__ == "__main__":
    main()
