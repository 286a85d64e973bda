"""How fast one TVM build of a held-out variant runs, process by process.

Session 22's accuracy runs measured vit-base b1 at 198-201 ms where session 21's third run had 225 and
a profile the same morning 183, while the reference layers timed around each config read 0.98-1.03x of
calibration speed. This script separates the process from the host: it starts ``--processes`` fresh
Python processes one after another; each builds the variant as ``cost_model_accuracy.py`` does, compiles
it ``--copies`` times (weights and buffers at other addresses), runs each copy once to warm up, then
times the copies interleaved, ``--repeat`` runs each. Per process it prints each copy's median and the
CPU time its threads used (from ``/proc``), so a slow process shows whether the threads computed slower
or waited. ``--windows N`` instead keeps one process and one copy and times ``--repeat`` runs in each of N
windows ``--gap`` seconds apart: whether a slow spell belongs to the process or to the time.

    .venv/bin/python benchmarks/tvm_process_speed.py --variant "vit-base b1 baseline" --processes 6
    .venv/bin/python benchmarks/tvm_process_speed.py --variant "vit-base b1 baseline" --windows 10 --repeat 5
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import subprocess
import sys
import time


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) each of this process's threads has used."""
    ticks = os.sysconf("SC_CLK_TCK")
    used = {}
    for task in glob.glob("/proc/self/task/*"):
        fields = open(f"{task}/stat").read().rsplit(")", 1)[1].split()
        used[os.path.basename(task)] = (int(fields[11]) + int(fields[12])) / ticks
    return used


def child(variant: str, copies: int, repeat: int) -> None:
    from tfcompile.backends import tvm
    from tfcompile.cost_models.device import detect_host
    from tvm_row_kernels import held_out_graphs  # this script's own directory is on sys.path

    tvm.set_num_threads(int(os.environ.get("TVM_NUM_THREADS", detect_host().cores)))
    graph = held_out_graphs([variant])[0]
    runners = []
    for _ in range(copies):
        runner = tvm.compile_graph(graph, schedule="rules").runner(graph.example_inputs)
        runner()
        runners.append(runner)
    times = [[] for _ in runners]
    before = thread_cpu_s()
    for run in range(repeat):
        order = range(copies) if run % 2 == 0 else reversed(range(copies))
        for i in order:
            start = time.perf_counter()
            runners[i]()
            times[i].append(time.perf_counter() - start)
    after = thread_cpu_s()
    busy = sorted((after[t] - before.get(t, 0.0) for t in after), reverse=True)
    medians = " ".join(f"{statistics.median(t) * 1e3:7.1f}" for t in times)
    print(f"pid {os.getpid()}: copies' medians (ms) {medians}; busiest threads' CPU s "
          f"{' '.join(f'{b:.2f}' for b in busy[:3])} over {copies * repeat} runs", flush=True)


def windows(variant: str, count: int, repeat: int, gap_s: float) -> None:
    from tfcompile.backends import tvm
    from tfcompile.cost_models.device import detect_host
    from tvm_row_kernels import held_out_graphs

    tvm.set_num_threads(int(os.environ.get("TVM_NUM_THREADS", detect_host().cores)))
    graph = held_out_graphs([variant])[0]
    runner = tvm.compile_graph(graph, schedule="rules").runner(graph.example_inputs)
    runner()
    began = time.perf_counter()
    for _ in range(count):
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            runner()
            times.append(time.perf_counter() - start)
        print(f"t = {time.perf_counter() - began:5.0f} s: median {statistics.median(times) * 1e3:7.1f} ms, "
              f"fastest {min(times) * 1e3:7.1f} ms", flush=True)
        time.sleep(gap_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="vit-base b1 baseline")
    parser.add_argument("--processes", type=int, default=6)
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument("--windows", type=int, default=0, help="time one process in this many windows instead")
    parser.add_argument("--gap", type=float, default=8.0, help="seconds between windows")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.variant, args.copies, args.repeat)
        return
    from tfcompile.cost_models.device import detect_host

    host = detect_host()
    if args.windows:
        print(f"host: {host.model}, {host.cores} cores; {args.variant}; one process, {args.windows} windows "
              f"{args.gap:.0f} s apart, {args.repeat} runs each", flush=True)
        windows(args.variant, args.windows, args.repeat, args.gap)
        return
    print(f"host: {host.model}, {host.cores} cores; {args.variant}; {args.processes} processes, "
          f"{args.copies} copies each, {args.repeat} interleaved runs per copy", flush=True)
    for _ in range(args.processes):
        subprocess.run([sys.executable, __file__, "--child", "--variant", args.variant, "--copies",
                        str(args.copies), "--repeat", str(args.repeat)], check=True, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
