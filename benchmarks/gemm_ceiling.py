"""This host's FP32 GEMM ceiling, and ONNX Runtime's GEMM rate at GPT-2 small's shapes.

Why it exists: GPT-2 small at 128 tokens is ~98 % GEMM FLOPs, so no exact
graph rewrite can make ORT run it much faster unless ORT's GEMMs are far from
what the machine can do. Three measurements, each a median of interleaved runs:

- torch ``a @ b`` on 2048×2048 matrices with 1 and 2 threads (the ceiling);
- ORT chains of 8 ``Gemm`` nodes (M rows, K→N, weights [N, K], transB=1) at
  the model's shapes, with 1 and 2 intra-op threads;
- the same 768→2304 chain with the M rows split into two branches that ORT's
  parallel executor runs side by side (inter-op 2, intra-op 1), against the
  unsplit chain: does row parallelism across branches beat intra-op threads?

    .venv/bin/python benchmarks/gemm_ceiling.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

CHAIN = 8


def _median_s(fn, repeat: int) -> float:
    fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def torch_ceiling(size: int, repeat: int) -> dict[int, float]:
    a, b = torch.randn(size, size), torch.randn(size, size)
    rates = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        rates[threads] = 2 * size**3 / _median_s(lambda: a @ b, repeat) / 1e9
    return rates


def gemm_chain(rows: int, k: int, n: int, branches: int = 1) -> bytes:
    """CHAIN Gemm nodes k→n→n…; with branches > 1 the rows are split and concatenated back."""
    rng = np.random.default_rng(0)
    dims = [k] + [n] * CHAIN if k == n else [k if i % 2 == 0 else n for i in range(CHAIN + 1)]
    weights = [numpy_helper.from_array((rng.standard_normal((dims[i + 1], dims[i])) * 0.02).astype(np.float32),
                                       f"w{i}") for i in range(CHAIN)]
    nodes, outputs = [], []
    if branches > 1:
        split = numpy_helper.from_array(np.array([rows // branches] * branches, np.int64), "split")
        weights.append(split)
        nodes.append(helper.make_node("Split", ["x", "split"], [f"x{b}" for b in range(branches)], axis=0))
    for b in range(branches):
        current = "x" if branches == 1 else f"x{b}"
        for i in range(CHAIN):
            nodes.append(helper.make_node("Gemm", [current, f"w{i}"], [f"y{b}_{i}"], transB=1))
            current = f"y{b}_{i}"
        outputs.append(current)
    if branches > 1:
        nodes.append(helper.make_node("Concat", outputs, ["y"], axis=0))
        outputs = ["y"]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
                              [helper.make_tensor_value_info(outputs[0], TensorProto.FLOAT, None)], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString()


def chain_flops(rows: int, k: int, n: int) -> float:
    return 2.0 * rows * k * n * CHAIN


def session(model: bytes, intra: int, inter: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra
    if inter:
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        options.inter_op_num_threads = inter
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def interleaved(runs: dict[str, callable], rounds: int, block: int = 3) -> dict[str, float]:
    for run in runs.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            for _ in range(block):
                start = time.perf_counter()
                run()
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128, help="M: batch × tokens")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    x = np.random.default_rng(1).standard_normal

    ceiling = torch_ceiling(2048, repeat=7)
    print(f"torch 2048³ GEMM: {ceiling[1]:.0f} GFLOP/s on 1 thread, {ceiling[2]:.0f} on 2")

    shapes = [(768, 768), (768, 2304), (768, 3072)]  # attention out; QKV; FFN up+down alternating
    runs, flops = {}, {}
    for k, n in shapes:
        model = gemm_chain(args.rows, k, n)
        inputs = {"x": x((args.rows, k)).astype(np.float32)}
        for threads in (1, 2):
            sess = session(model, threads)
            runs[(k, n, threads)] = lambda sess=sess, inputs=inputs: sess.run(None, inputs)
            flops[(k, n, threads)] = chain_flops(args.rows, k, n)
    times = interleaved(runs, args.rounds)
    print(f"\nORT Gemm chains of {CHAIN}, M = {args.rows} (K→N alternating with N→K when they differ):")
    print("| K→N | 1 thread | 2 threads |\n|---|---:|---:|")
    for k, n in shapes:
        rate = {t: flops[(k, n, t)] / times[(k, n, t)] / 1e9 for t in (1, 2)}
        print(f"| {k}→{n} | {rate[1]:.0f} GFLOP/s | {rate[2]:.0f} GFLOP/s |")

    inputs = {"x": x((args.rows, 768)).astype(np.float32)}
    split = {"one chain, intra-op 2": session(gemm_chain(args.rows, 768, 2304), 2),
             "two row branches, inter-op 2 × intra-op 1": session(gemm_chain(args.rows, 768, 2304, 2), 1, 2)}
    reference = split["one chain, intra-op 2"].run(None, inputs)[0]
    for name, sess in split.items():
        assert np.allclose(sess.run(None, inputs)[0], reference, atol=1e-5), name
    times = interleaved({name: (lambda s=sess: s.run(None, inputs)) for name, sess in split.items()}, args.rounds)
    print("\n768→2304 chain, rows split across parallel branches:")
    for name, t in times.items():
        print(f"  {name}: {t * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
