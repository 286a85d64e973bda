"""TVM's GEMM rate against the number of rows, with tfcompile's matmul schedule rule on this CPU.

Session 16's ``compare --explain-ops`` on TVM found the weight matmuls of minilm b8 s128 (1024 rows) and
vit-base (197 rows) running at 125-143 GFLOP/s, against 180-195 for the calibration's GEMMs. This times one
linear (K x N, a bias) compiled by ``backends.tvm`` at each row count M, its matmul kernel alone by the VM's
instrument (``backends.tvm.profile``; the lowest of three means of ``--runs`` runs, since the host's load
only adds time), and prints GFLOP/s. ``--chain L`` runs L distinct linears in a row instead (K -> N -> K ...),
weights L times as large, to tell a cache effect (weights streaming) from a shape effect of the schedule.

    .venv/bin/python benchmarks/tvm_matmul_rows.py
    .venv/bin/python benchmarks/tvm_matmul_rows.py --rows 1024 --chain 48
"""

from __future__ import annotations

import argparse

import torch

from tfcompile.backends import tvm
from tfcompile.backends.tvm import profile
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


def matmul_ms(rows: int, k: int, n: int, chain: int, runs: int) -> float:
    """Milliseconds per run in the matmul kernels of ``chain`` linears over [1, rows, k]."""
    x = torch.randn(1, rows, k)
    graph = export_module(Linears(k, n, chain).eval(), (x,), name=f"linears{chain}_m{rows}")
    module = tvm.compile_graph(graph)
    timed = [profile.profile_runs(module, (x,), runs=runs) for _ in range(3)]
    return min(sum(node.ms_per_run for node in run.nodes if "matmul" in node.name) for run in timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--k", type=int, default=768)
    parser.add_argument("--n", type=int, default=768)
    parser.add_argument("--chain", type=int, default=1, help="distinct linears in a row")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    threads = tvm.set_num_threads(args.threads)
    host = detect_host()
    print(f"host: {host.model}, {host.cores} cores; TVM threads {threads}; K {args.k}, N {args.n}, "
          f"{args.chain} linear(s), weights {args.chain * args.k * args.n * 4 / 2**20:.1f} MiB")
    for rows in args.rows:
        ms = matmul_ms(rows, args.k, args.n, args.chain, args.runs)
        flops = 2 * rows * args.k * args.n * args.chain
        print(f"M {rows:5d}: {ms:8.3f} ms, {flops / ms / 1e6:6.1f} GFLOP/s", flush=True)


if __name__ == "__main__":
    main()
