"""TVM on this CPU against torch eager and ONNX Runtime, full-size zoo models.

One run per model: torch eager, ONNX Runtime, TVM with tfcompile's schedule
rules, (with --with-none) TVM's unscheduled default, and (with --tune-trials N)
TVM with MetaSchedule records tuned in this run into a fresh database under
that trial budget (the tuning wall time is printed), each output checked
against torch, medians and ratios to ORT printed as one table. Backends are
timed in blocks of ``--repeat`` runs, not interleaved run by run (TVM's worker
threads spin for a while after each parallel region and would steal the cores
from whatever runs right after them), and the blocks go round ``--rounds``
times so that a change in the machine's load hits every backend alike. TVM
with the rules and TVM tuned share a thread pool and are interleaved run by
run within their block.

``--mcpu`` compiles TVM for another LLVM CPU than the host's (``haswell``: an
AVX2 build, runnable on an AVX-512 host); ``--json PATH`` writes the table.

    .venv/bin/python benchmarks/tvm_cpu.py --models bert-base,gpt2-small --seq 128 --threads 2 \
        [--with-none] [--tune-trials 256] [--mcpu haswell] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bert-base,gpt2-small")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--with-none", action="store_true", help="also time TVM's unscheduled loops (slow)")
    parser.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trial budget per model (0: no tuning)")
    parser.add_argument("--mcpu", default=None, help="compile TVM for this LLVM CPU (default: the host's)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()
    # Both runtimes size their thread pools once, on first use.
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import torch

    from tfcompile.backends import ort
    from tfcompile.backends import tvm as tvm_backend
    from tfcompile.backends.timing import measure, measure_interleaved
    from tfcompile.frontend import LoadOptions, load_model
    from tfcompile.passes import apply_pass

    from tvm.target import Target

    from tfcompile.backends.tvm.target import register_tile

    torch.set_num_threads(args.threads)
    target = tvm_backend.host_target() if args.mcpu is None else Target(
        {"kind": "llvm", "mcpu": args.mcpu, "num-cores": args.threads})
    tile = register_tile(target)
    print(f"host target: {tvm_backend.host_target()}  compiling for: {target}  threads: {args.threads}  "
          f"tile: {tile.mr}x{tile.nr} ({tile.registers_needed} of {tile.registers} registers)")
    rows = []
    for name in args.models.split(","):
        graph = load_model(name, LoadOptions(batch=args.batch, seq=args.seq))
        graph, _ = apply_pass(graph, "fold_constants")
        reference = graph.run()
        runs: dict[str, tuple[object, float, int]] = {}  # backend -> (run, max relative error, repeat)

        def add(label, run, outputs, repeat=args.repeat):
            error = max(((o - r).abs().max() / r.abs().max().clamp_min(1e-6)).item()
                        for o, r in zip(outputs, reference))
            runs[label] = (run, error, repeat)

        def eager():
            with torch.no_grad():
                return graph.gm(*graph.example_inputs)

        add("torch", eager, graph.run())
        with tempfile.TemporaryDirectory() as tmp:
            model = ort.OrtModel(ort.export_onnx(graph, Path(tmp) / "model.onnx"), threads=args.threads)
        add("ort", model.runner(graph.example_inputs), model.run(graph.example_inputs))
        database = Path(tempfile.mkdtemp(prefix=f"tfcompile-tune-{name}-"))
        if args.tune_trials:
            from tfcompile.backends.tvm.tuning import tune_graph

            def report_tuning(kernel, i, n, name=name):
                if kernel:
                    print(f"{name}: tuning {i + 1}/{n} {kernel}", flush=True)

            tuning = tune_graph(graph, target=target, root=database, max_trials=args.tune_trials,
                                progress=report_tuning)
            print(f"{name}: tuned {len(tuning.tuned)} kernels with a budget of {tuning.trial_budget} trials in "
                  f"{tuning.wall_s / 60:.1f} min; not reached: {len(tuning.skipped)} {tuning.skipped[:6]}", flush=True)
        schedules = ["rules"] + (["none"] if args.with_none else []) + (["tuned"] if args.tune_trials else [])
        for schedule in schedules:
            start = time.perf_counter()
            module = tvm_backend.compile_graph(graph, target=target, schedule=schedule, database_dir=database)
            compile_s = time.perf_counter() - start
            print(f"{name}: tvm-{schedule} compiled in {compile_s:.1f} s; untuned kernels: "
                  f"{len(module.untuned_kernels)} {module.untuned_kernels[:6]}", flush=True)
            add(f"tvm-{schedule}", module.runner(graph.example_inputs), module.run(graph.example_inputs),
                repeat=args.repeat if schedule != "none" else 1)
        samples: dict[str, list[float]] = {label: [] for label in runs}
        scheduled = [label for label in runs if label in ("tvm-rules", "tvm-tuned")]
        for _ in range(args.rounds):
            for label, (run, _error, repeat) in runs.items():
                if label == "tvm-none" and samples[label]:
                    continue  # tens of seconds a run: one is enough
                if label in scheduled[1:]:
                    continue  # timed with tvm-rules, below
                if label in scheduled and len(scheduled) > 1:
                    # TVM against TVM shares one thread pool: interleave run by run.
                    timed = measure_interleaved({s: runs[s][0] for s in scheduled}, backend="tvm", repeat=repeat,
                                                warmup=1)
                    for s in scheduled:
                        samples[s].extend(timed[s].samples_s)
                    continue
                samples[label].extend(measure(run, backend=label, repeat=repeat, warmup=1).samples_s)
        results = {label: (statistics.median(samples[label]), runs[label][1]) for label in runs}
        ort_s = results["ort"][0]
        for label, (median_s, error) in results.items():
            rows.append((name, label, median_s * 1e3, median_s / ort_s, error))
    print(f"\n{'model':<12} {'backend':<10} {'median ms':>10} {'x ORT':>7} {'max rel err':>12}")
    for name, label, median_ms, ratio, error in rows:
        print(f"{name:<12} {label:<10} {median_ms:>10.2f} {ratio:>7.2f} {error:>12.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"target": str(target), "threads": args.threads, "batch": args.batch, "seq": args.seq,
                       "tile": {"mr": tile.mr, "nr": tile.nr, "lanes": tile.lanes, "registers": tile.registers},
                       "rows": [dict(model=n, backend=b, median_ms=m, x_ort=r, max_rel_err=e)
                                for n, b, m, r, e in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
