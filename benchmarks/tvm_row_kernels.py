"""TVM's row kernels (session 21), fast log and column reductions (session 22) and index checks (session 23),
each against the build before.

Seven changes, each measured against what it replaced (the old rules kept here and patched in with
``unittest.mock``):

- ``injective``: before, every injective loop nest was flattened and vectorised by a width dividing the
  whole nest. Where the innermost row is 197 tokens (vit-base) or a local-attention tile's 385 keys, only 4
  divides it, a vector spans two rows and each lane computes its own floordiv/floormod of the flat index:
  TVM emits a gather per vector. Such rows now keep a loop of their own (``rules.ROW_LOOP_MIN``), and
  vectors only take widths that divide the row.
- ``reduction``: before, a row's max or sum (softmax, layer norm) ran as a scalar chain, every add waiting
  on the one before. Now it is factored into a vector of partial results (``rules._factor_reduction``).
- ``reassociation``: the host target lets LLVM reorder float additions (``target.host_target``), so it
  vectorises the reductions that cannot be factored (rows no vector width divides: 197 tokens, 385 keys).
- ``log`` (session 22; undone only when named): before, ``log`` was legalised to libm's ``logf``, a scalar
  call per element; token merging's attention bias, ``log`` of the keys' sizes, is fused into the add over
  the scores and so ran once per score element. Now ``fast_math`` legalises it to vectorisable arithmetic.
- ``log_fusion`` (session 22; undone only when named): the vectorised log as first built, fused by FuseOps
  into the add over the scores and so still computed once per score element; now it is opaque to FuseOps
  and runs once over its [B, K] input.
- ``column`` (session 22; undone only when named): before, a sum over middle axes (token merging's attention
  received per key, ``probs.sum((1, 2))``) ran as rows of the kept axes, each reading a float a row apart;
  now ``column_reduction.ColumnReduction`` keeps the innermost axis innermost.
- ``index_guard`` (session 23; undone only when named): before, gathers and scatters took their indices
  unchecked; now ``index_guard`` passes computed indices through a check kernel first. This one is a
  cost, not a speed-up: a ratio below 1.00x is what the check costs.

This compiles each chosen held-out variant of ``cost_model_accuracy.py`` as now and as before (``--before``:
which changes to undo, session 21's three by default), checks that the two agree on the outputs, and
times them interleaved in this process (``measure_interleaved``): per variant the median of each and the
median of the run-by-run ratio. ``--kernels`` also times, alone, every kernel the two schedule differently
(TVM's ``time_evaluator``, the best of five means).

    .venv/bin/python benchmarks/tvm_row_kernels.py
    .venv/bin/python benchmarks/tvm_row_kernels.py --before reassociation --variants "vit-base b1 baseline" --kernels
    .venv/bin/python benchmarks/tvm_row_kernels.py --before log --variants "minilm b1 s512 cleanup+tome_r16"
    .venv/bin/python benchmarks/tvm_row_kernels.py --before column --variants "minilm b8 s128 baseline" --kernels
    .venv/bin/python benchmarks/tvm_row_kernels.py --before index_guard --variants "minilm b1 s512 cleanup+tome_r16"
"""

from __future__ import annotations

import argparse
import contextlib
import os
from unittest import mock

import numpy as np
import torch
import tvm as tvm_lib

from tfcompile.backends import tvm
from tfcompile.backends.timing import measure_interleaved, ratio_spread
from tfcompile.backends.tvm import column_reduction, fast_math, index_guard, lowering
from tfcompile.backends.tvm import rules as tvm_rules
from tfcompile.backends.tvm.target import host_target, vector_lanes
from tfcompile.cost_models.device import detect_host

VARIANTS = ("vit-base b1 baseline", "minilm b1 s128 cleanup", "minilm b1 s512 cleanup",
            "minilm b1 s512 cleanup+local_w128", "bert-base b1 s512 baseline", "bert-base b1 s512 cleanup+local_w128",
            "llama-tiny b1 s512 cleanup", "llama-tiny b1 s512 cleanup+local_w128")


def flat_rule_of_before(sch, block, lanes: int) -> None:
    """The injective rule up to session 20: one flat loop, vectorised by a width dividing the whole nest."""
    loops = sch.get_loops(block)
    if loops:
        tvm_rules._fuse_and_vectorize(sch, loops, lanes)


ROW_CHANGES = ("injective", "reduction", "reassociation")
CHANGES = ROW_CHANGES + ("log", "log_fusion", "column", "index_guard")
_legalize_map_of_now = fast_math.legalize_map


def legalize_map_of_before() -> dict:
    """``fast_math.legalize_map`` up to session 21: ``log`` took TVM's default legalisation (libm's logf)."""
    return {op: legalize for op, legalize in _legalize_map_of_now().items() if op != "relax.log"}


def legalize_map_fusing_log() -> dict:
    """``fast_math.legalize_map`` with session 22's first log: vectorised, and fused like any elementwise op."""
    return {**_legalize_map_of_now(), "relax.log": fast_math._unary("log", fast_math._log)}


@tvm_lib.transform.module_pass(opt_level=0, name="Unguarded")
def unguarded(mod, _ctx):
    """``index_guard.guard_indices`` before session 23: indices went to the kernels unchecked."""
    return mod


def rules_of_before(undone: tuple[str, ...]) -> contextlib.ExitStack:
    """A context in which ``backends.tvm`` legalises and schedules as before where ``undone`` says so."""
    stack = contextlib.ExitStack()
    if "log" in undone:
        stack.enter_context(mock.patch.object(fast_math, "legalize_map", legalize_map_of_before))
    elif "log_fusion" in undone:
        stack.enter_context(mock.patch.object(fast_math, "legalize_map", legalize_map_fusing_log))
    if "column" in undone:  # the rule refuses every kernel: they fall to RowReduction, as before
        stack.enter_context(mock.patch.object(column_reduction.ColumnReduction, "apply", lambda *_: None))
    if "index_guard" in undone:
        stack.enter_context(mock.patch.object(index_guard, "guard_indices", unguarded))
    if "injective" in undone:
        stack.enter_context(mock.patch.object(tvm_rules, "_flat_parallel_vectorize", flat_rule_of_before))
    if "reduction" in undone:
        stack.enter_context(mock.patch.object(tvm_rules, "_factor_reduction", lambda *_: None))
    return stack


def target_of_before(undone: tuple[str, ...]):
    return host_target(reassociate="reassociation" not in undone)


def held_out_graphs(names: list[str]):
    """The named variants, built as ``benchmarks/cost_model_accuracy.py`` builds them (seed 0)."""
    import cost_model_accuracy as accuracy  # this script's own directory is on sys.path

    graphs = {}
    for config in accuracy.FULL:
        wanted = [n for n in names if n.startswith(config.label + " ")]
        if wanted:
            built, _, _ = accuracy.config_variants(config, 0)
            graphs.update({g.name: g for g in built if g.name in wanted})
    missing = [n for n in names if n not in graphs]
    if missing:
        raise SystemExit(f"no such held-out variant: {', '.join(missing)}")
    return [graphs[n] for n in names]


def kernel_us(func, target) -> float:
    """Best of five means of ``func`` (a scheduled PrimFunc) alone, on random inputs, in microseconds."""
    import tvm as tvm_lib

    func = func.with_attr("global_symbol", "main")
    library = tvm_lib.compile(tvm_lib.IRModule({"main": func}), target=target)
    device = tvm_lib.cpu()
    draw = np.random.default_rng(0)
    args = [tvm_lib.runtime.tensor(np.asarray(draw.random([int(d) for d in p.ty.shape])).astype(str(p.ty.dtype)),
                                   device) for p in func.params]
    timer = library.mod.time_evaluator("main", device, number=20, repeat=5)
    return min(timer(*args).results) * 1e6


def time_kernels(graph, target, undone: tuple[str, ...]) -> None:
    mod = lowering.legalize_and_fuse(lowering.import_graph(graph), target, pad_multiple=vector_lanes(target))
    before_target = target_of_before(undone)
    for name, func in lowering.primfuncs(mod).items():
        now, rule = tvm_rules.schedule_func(func, target)
        with rules_of_before(undone):
            before, _ = tvm_rules.schedule_func(func, target)
        if before.script() == now.script() and str(before_target) == str(target):
            continue
        before_us, now_us = kernel_us(before, before_target), kernel_us(now, target)
        print(f"  {name[:56]:56s} {rule:13s} before {before_us:9.1f} us  now {now_us:9.1f} us  "
              f"{before_us / now_us:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--before", nargs="+", choices=CHANGES, default=list(ROW_CHANGES),
                        help="which changes to undo for the build of before (default: session 21's three)")
    parser.add_argument("--kernels", action="store_true", help="also time each rescheduled kernel alone")
    args = parser.parse_args()
    host = detect_host()
    threads = int(os.environ.get("TVM_NUM_THREADS", host.cores))
    tvm.set_num_threads(threads)
    target = host_target()
    undone = tuple(args.before)
    print(f"host: {host.model}, {host.cores} cores; TVM {threads} threads; {args.repeat} interleaved runs each; "
          f"before: without {', '.join(undone)}")
    for graph in held_out_graphs(args.variants):
        now = tvm.compile_graph(graph, target=target, schedule="rules")
        with rules_of_before(undone):
            before = tvm.compile_graph(graph, target=target_of_before(undone), schedule="rules")
        for a, b in zip(now.run(graph.example_inputs), before.run(graph.example_inputs)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # a factored sum adds in another order
        timed = measure_interleaved({"before": before.runner(graph.example_inputs),
                                     "now": now.runner(graph.example_inputs)}, backend="tvm", repeat=args.repeat)
        ratio = ratio_spread(timed["before"], timed["now"])
        print(f"{graph.name:40s} before {timed['before'].median_ms:8.2f} ms  now {timed['now'].median_ms:8.2f} ms  "
              f"speed-up {ratio.median:.2f}x (p10-p90 {ratio.p10:.2f}-{ratio.p90:.2f})", flush=True)
        if args.kernels:
            time_kernels(graph, target, undone)


if __name__ == "__main__":
    main()
