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

With ``--tvm`` it also times TVM's rules (no tuning) on the GEMM kernel classes
of BERT-base / GPT-2 small at M rows (QKV, attention output, FFN up + GELU, FFN
down, LM head, and the batched attention products), each as a fraction of the
ceiling; ``--mcpu`` compiles them for another CPU (e.g. ``haswell``: an AVX2
build on an AVX-512 host, to be compared with ``ATEN_CPU_CAPABILITY=avx2
MKL_ENABLE_INSTRUCTIONS=AVX2``, which hold torch and MKL to their AVX2 kernels).
``--json PATH`` writes the figures.

    .venv/bin/python benchmarks/gemm_ceiling.py [--tvm [--mcpu haswell]] [--skip-ort] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
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


# GEMM kernel classes of BERT-base / GPT-2 small: (name, batch, K, N, GELU epilogue, constant weight)
KERNEL_CLASSES = (
    ("qkv 768→2304", 1, 768, 2304, False, True),
    ("attn-out 768→768", 1, 768, 768, False, True),
    ("ffn-up 768→3072 +gelu", 1, 768, 3072, True, True),
    ("ffn-down 3072→768", 1, 3072, 768, False, True),
    ("lm-head 768→50257", 1, 768, 50257, False, True),
    ("scores q·kᵀ 12×(64→128)", 12, 64, 128, False, False),
    ("context p·v 12×(128→64)", 12, 128, 64, False, False),
)


class _Kernel(torch.nn.Module):
    """One GEMM kernel class as a module: x @ W (+ bias, GELU) or a batched x @ y."""

    def __init__(self, k: int, n: int, gelu: bool, constant: bool):
        super().__init__()
        self.linear = torch.nn.Linear(k, n) if constant else None
        self.gelu = gelu

    def forward(self, x, y=None):
        out = self.linear(x) if self.linear is not None else x @ y
        return torch.nn.functional.gelu(out) if self.gelu else out


def tvm_kernels(rows: int, mcpu: str | None, threads: int, repeat: int) -> list[dict]:
    """GFLOP/s of TVM's rules and of torch on each kernel class at ``rows`` rows."""
    from tvm.target import Target

    from tfcompile.backends import tvm as tvm_backend
    from tfcompile.backends.tvm.target import register_tile
    from tfcompile.graph import export_module

    target = tvm_backend.host_target() if mcpu is None else Target(
        {"kind": "llvm", "mcpu": mcpu, "num-cores": threads})
    tile = register_tile(target)
    print(f"\nTVM rules for {target.attrs['mcpu']}: tile {tile.mr}×{tile.nr} ({tile.lanes} lanes, "
          f"{tile.registers_needed} of {tile.registers} registers)")
    torch.manual_seed(0)
    cases = []
    for name, batch, k, n, gelu, constant in KERNEL_CLASSES:
        module = _Kernel(k, n, gelu, constant).eval()
        inputs = (torch.randn(batch, rows, k),) if constant else (torch.randn(batch, rows, k), torch.randn(batch, k, n))
        with torch.no_grad():
            reference = module(*inputs)

        def eager(inputs=inputs, module=module):
            with torch.no_grad():
                return module(*inputs)

        # torch first, for every kernel: TVM's workers spin after each run and would steal its cores.
        cases.append((name, 2.0 * batch * rows * k * n, module, inputs, reference, _median_s(eager, repeat)))
    results = []
    for name, flops, module, inputs, reference, torch_s in cases:
        graph = export_module(module, inputs, name=name.split()[0])
        compiled = tvm_backend.compile_graph(graph, target=target, schedule="rules")
        error = (compiled.run(inputs)[0] - reference).abs().max().item() / reference.abs().max().item()
        tvm_s = _median_s(compiled.runner(inputs), repeat)
        results.append({"kernel": name, "tvm_ms": tvm_s * 1e3, "tvm_gflops": flops / tvm_s / 1e9,
                        "torch_ms": torch_s * 1e3, "torch_gflops": flops / torch_s / 1e9, "max_rel_err": error,
                        "rules": compiled.kernel_rules, "untuned": compiled.untuned_kernels})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128, help="M: batch × tokens")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="threads for the ceiling line and TVM")
    parser.add_argument("--tvm", action="store_true", help="time TVM's rules per GEMM kernel class")
    parser.add_argument("--mcpu", default=None, help="compile TVM for this LLVM CPU (default: the host's)")
    parser.add_argument("--skip-ort", action="store_true", help="skip the ORT Gemm-chain measurements")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # TVM sizes its pool once, on first use
    x = np.random.default_rng(1).standard_normal

    ceiling = torch_ceiling(2048, repeat=7)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch 2048³ GEMM ({capability}): {ceiling[1]:.0f} GFLOP/s on 1 thread, {ceiling[2]:.0f} on 2")
    report = {"torch_capability": capability, "mkl_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS"),
              "ceiling_gflops": {str(t): r for t, r in ceiling.items()}, "rows": args.rows, "threads": args.threads}
    if args.tvm:
        torch.set_num_threads(args.threads)
        kernels = tvm_kernels(args.rows, args.mcpu, args.threads, repeat=max(args.rounds * 3, 10))
        top = ceiling[args.threads]
        print(f"\n| kernel class (M = {args.rows}) | TVM rules | of ceiling | torch | max rel err |")
        print("|---|---:|---:|---:|---:|")
        for row in kernels:
            row["tvm_of_ceiling"] = row["tvm_gflops"] / top
            print(f"| {row['kernel']} | {row['tvm_ms']:.2f} ms, {row['tvm_gflops']:.0f} GFLOP/s | "
                  f"{row['tvm_of_ceiling']:.2f} | {row['torch_gflops']:.0f} GFLOP/s | {row['max_rel_err']:.1e} |")
        report.update(mcpu=args.mcpu or "host", kernels=kernels)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.skip_ort:
        return

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
