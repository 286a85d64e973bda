"""TVM's GEMM rate against the number of rows, with tfcompile's matmul schedule rule on this CPU.

Session 16's ``compare --explain-ops`` on TVM found the weight matmuls of minilm b8 s128 (1024 rows) and
vit-base (197 rows) running at 125-143 GFLOP/s, against 180-195 for the calibration's GEMMs. This times one
linear (K x N, a bias) compiled by ``backends.tvm`` at each row count M, its matmul kernel alone by the VM's
instrument (``backends.tvm.profile``; the lowest of three means of ``--runs`` runs, since the host's load
only adds time), and prints GFLOP/s. ``--chain L`` runs L distinct linears in a row instead (K -> N -> K ...),
weights L times as large, to tell a cache effect (weights streaming) from a shape effect of the schedule.
``--against-tail`` also compiles each linear with the tile rule of before session 18 (6-row tiles and a
predicated last tile wherever 6 and 5 do not divide M) and times the two interleaved in this process:
``--rounds`` rounds, each one profiled mean of ``--runs`` runs of both, and prints the median ratio.

    .venv/bin/python benchmarks/tvm_matmul_rows.py
    .venv/bin/python benchmarks/tvm_matmul_rows.py --rows 1024 --chain 48
    .venv/bin/python benchmarks/tvm_matmul_rows.py --rows 256 1024 4096 --against-tail
"""

from __future__ import annotations

import argparse
import statistics
from unittest import mock

import torch

from tfcompile.backends import tvm
from tfcompile.backends.tvm import profile
from tfcompile.backends.tvm import rules as tvm_rules
from tfcompile.backends.tvm.target import max_rows
from tfcompile.cost_models.device import detect_host
from tfcompile.graph import export_module

ROWS = (512, 896, 1000, 1024, 1152, 1536, 2048)


class Linears(torch.nn.Module):
    def __init__(self, k: int, n: int, count: int):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(k, n) if i % 2 == 0 else torch.nn.Linear(n, k)
                                          for i in range(count))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def compiled(rows: int, k: int, n: int, chain: int):
    x = torch.randn(1, rows, k)
    graph = export_module(Linears(k, n, chain).eval(), (x,), name=f"linears{chain}_m{rows}")
    return tvm.compile_graph(graph), x


def kernel_ms(module, x, runs: int) -> float:
    """Milliseconds per run in ``module``'s matmul kernels: the VM instrument's mean over ``runs`` runs."""
    return sum(node.ms_per_run for node in profile.profile_runs(module, (x,), runs=runs).nodes
               if "matmul" in node.name)


def matmul_ms(rows: int, k: int, n: int, chain: int, runs: int) -> float:
    """Milliseconds per run in the matmul kernels of ``chain`` linears over [1, rows, k]."""
    module, x = compiled(rows, k, n, chain)
    return min(kernel_ms(module, x, runs) for _ in range(3))


def tail_tile_rows(rows: int, vectors: int, registers: int) -> int:
    """``target.tile_rows`` before session 18: 6 rows, or 5 where 5 divides M and 6 does not."""
    top = max(max_rows(vectors, registers), 1)
    if rows <= top:
        return max(rows, 1)
    return top - 1 if rows % top and top > 2 and rows % (top - 1) == 0 else top


def against_tail(rows: int, k: int, n: int, runs: int, rounds: int) -> tuple[float, float, float]:
    """Median ms of the tail-tile build, of this build, and the median of their per-round ratios."""
    current, x = compiled(rows, k, n, 1)
    with mock.patch.object(tvm_rules, "tile_rows", tail_tile_rows):
        tail, _ = compiled(rows, k, n, 1)
    tail_ms, current_ms = [], []
    for _ in range(rounds):
        tail_ms.append(kernel_ms(tail, x, runs))
        current_ms.append(kernel_ms(current, x, runs))
    ratios = [t / c for t, c in zip(tail_ms, current_ms)]
    return statistics.median(tail_ms), statistics.median(current_ms), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--k", type=int, default=768)
    parser.add_argument("--n", type=int, default=768)
    parser.add_argument("--chain", type=int, default=1, help="distinct linears in a row")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--against-tail", action="store_true",
                        help="time each linear against the 6-row tile with a predicated tail, interleaved")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds for --against-tail")
    args = parser.parse_args()
    threads = tvm.set_num_threads(args.threads)
    host = detect_host()
    print(f"host: {host.model}, {host.cores} cores; TVM threads {threads}; K {args.k}, N {args.n}, "
          f"{args.chain} linear(s), weights {args.chain * args.k * args.n * 4 / 2**20:.1f} MiB")
    for rows in args.rows:
        if args.against_tail:
            tail_ms, current_ms, ratio = against_tail(rows, args.k, args.n, args.runs, args.rounds)
            flops = 2 * rows * args.k * args.n
            print(f"M {rows:5d}: tail tile {tail_ms:8.3f} ms ({flops / tail_ms / 1e6:6.1f} GFLOP/s), this build "
                  f"{current_ms:8.3f} ms ({flops / current_ms / 1e6:6.1f} GFLOP/s), speed-up {ratio:.2f}x "
                  f"(median of {args.rounds} interleaved rounds)", flush=True)
            continue
        ms = matmul_ms(rows, args.k, args.n, args.chain, args.runs)
        flops = 2 * rows * args.k * args.n * args.chain
        print(f"M {rows:5d}: {ms:8.3f} ms, {flops / ms / 1e6:6.1f} GFLOP/s", flush=True)


if __name__ == "__main__":
    main()
